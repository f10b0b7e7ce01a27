"""Crash-safe writes of the small files that hold secrets and broker settings (keys,
passwords, ACLs): a crash leaves the old file or the new one, and the mode is right from the
first byte."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_file(path: Path, data: bytes, mode: int, group: int | None = None) -> None:
    """Write `data` to `path` via a temp file + fsync + rename, with `mode` (and `group`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if group is not None:
                os.fchown(f.fileno(), -1, group)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
