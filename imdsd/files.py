"""Files: crash-safe writes, and capped reads of regular files that never block.

Writes: a temporary file written and fsynced, renamed over the old one, and
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
import stat
from pathlib import Path
from typing import Any


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` (mode `mode`); OSError if the disk says no (the temporary
    file is then removed)."""
    temporary = temporary_beside(path)
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
    fsync_directory(path)


def temporary_beside(path: Path) -> Path:
    """A name of its own for a temporary file next to `path` (hidden, random: two writers
    never share one)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def fsync_directory(path: Path) -> None:
    """Make a rename of `path` durable: fsync the folder that holds it."""
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_regular(path: Any, limit: int) -> bytes:
    """A regular file's bytes; ValueError (saying why) for anything else, or for more than
    `limit` bytes. Opened without blocking (a FIFO does not wait for a writer) and checked
    with fstat before a byte is read (a device or directory is never read), then read with a
    cap (a file that grows is not read to its end)."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError("not a path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(exc.strerror or "cannot be opened") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "a special file")
            raise ValueError(f"{kind}, not a regular file")
        with open(fd, "rb", closefd=False) as file:
            data = file.read(limit + 1)
    except OSError as exc:
        raise ValueError(exc.strerror or "cannot be read") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"more than {limit} bytes")
    return data


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
