"""Crash-safe file writes: a temporary file written and fsynced, renamed over the old one, and
the folder fsynced, so a SIGKILL at any instant leaves the old file or the new one. The mode
is set at creation and again explicitly, so it never depends on the umask (a key is never
readable by others, not even for an instant). Never imports aiohttp."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` (mode `mode`); OSError if the disk says no."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as out:
        os.fchmod(out.fileno(), mode)
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
