"""Crash-safe file writes: a temporary file written and fsynced, renamed over the old one, and
the folder fsynced, so a SIGKILL at any instant leaves the old file or the new one. Each write
has a temporary file of its own (a random name, created exclusively), so two writers of the
same file at once (a worker thread's seal and the shutdown's) each rename a whole file, never
one half-written by the other. The mode is set at creation and again explicitly, so it never
depends on the umask (a key is never readable by others, not even for an instant). Never
imports aiohttp."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` (mode `mode`); OSError if the disk says no (the temporary
    file is then removed)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
