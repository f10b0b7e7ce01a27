"""What every bench script shares: the command line it prints above its tables, and how it
writes its block into docs/results.md."""
from __future__ import annotations

import os
import re
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


def write_block(start: str, end: str, lines: list[str], section: str,
                before: str | None = None) -> Path:
    """Put `lines` between the markers `start` and `end` of docs/results.md; with no markers
    yet, as a new `section` (its heading line) before the heading `before`, else at the end.
    Written atomically; returns the path."""
    path = ROOT / "docs" / "results.md"
    text = path.read_text() if path.exists() else "# Results\n"
    block = start + "\n" + "\n".join(lines).rstrip() + "\n" + end
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text,
                      flags=re.S)
    else:
        new = f"{section}\n\n{block}\n\n"
        at = re.search("^" + re.escape(before), text, flags=re.M) if before else None
        text = (text[:at.start()] + new + text[at.start():] if at
                else text.rstrip("\n") + "\n\n" + new)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
