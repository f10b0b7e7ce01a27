"""What every bench script shares: the command line it prints above its tables."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command_line() -> str:
    """This process's command line as a user would type it from the repository root."""
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    try:
        argv[0] = os.path.relpath(argv[0]) if argv[0].startswith(str(ROOT)) else argv[0]
    except ValueError:
        pass
    return shlex.join(argv)
