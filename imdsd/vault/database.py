"""The vault's file: an SQLite database in WAL mode, a table of (key, sealed row).

Why SQLite (the standard library's): a seal writes only the rows that changed, a page or two
each, and its commit is atomic: a SIGKILL at any instant leaves the last committed seal (WAL
frames past the last commit are ignored when the file is next opened). Exclusive locking: one
process uses the file, and no shared-memory index (-shm) is made. synchronous = NORMAL: the
WAL is fsynced at its checkpoints, not at each commit, so a power cut may take back the last
seals (as the 5 s between seals already may), never the file's consistency; a crash of the
process loses nothing committed. A new file is written whole (built in memory, written to a
temporary file, renamed over) once: the first seal of a process that found no usable
file. Only sealed bytes ever reach this module. Never imports aiohttp.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from imdsd.files import fsync_directory, temporary_beside

HEADER = b"SQLite format 3\0"  # a file without it is the previous version's single sealed file
APPLICATION_ID = 0x696D6473  # "imds": this is a vault, not any SQLite file
USER_VERSION = 2  # the rows' format (1 was the single sealed file)
PAGE_SIZE = 4096
CACHE_KIB = 1024  # seals touch a few pages; a full scan happens once, at start
_SCHEMA = "CREATE TABLE rows (key TEXT PRIMARY KEY, sealed BLOB NOT NULL)"
# An update in place keeps the rowid, so only the table's leaf page changes, not the index
_UPSERT = ("INSERT INTO rows (key, sealed) VALUES (?, ?)"
           " ON CONFLICT (key) DO UPDATE SET sealed = excluded.sealed")  # fmt: skip


class Database:
    """An open vault file (one connection, used by one thread at a time: the caller locks)."""

    def __init__(self, path: Path) -> None:
        # mode=rw: an existing file only (made whole by write_whole(), so 0600 from the start)
        self._connection = sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True,
                                           isolation_level=None, check_same_thread=False,
                                           timeout=0)  # fmt: skip
        try:
            for pragma in ("locking_mode = EXCLUSIVE", "journal_mode = WAL",
                           "synchronous = NORMAL", f"cache_size = -{CACHE_KIB}"):  # fmt: skip
                self._connection.execute(f"PRAGMA {pragma}")
        except BaseException:
            self._connection.close()
            raise

    def rows(self) -> dict[str, bytes]:
        """Every row, once the file is checked whole and shown to be a vault of this format;
        sqlite3.DatabaseError (or ValueError) if it is not."""
        checked = self._one("PRAGMA integrity_check")
        if checked != "ok":
            raise ValueError("integrity_check")
        if (self._one("PRAGMA application_id"), self._one("PRAGMA user_version")) != (
            APPLICATION_ID,
            USER_VERSION,
        ):
            raise ValueError("not a vault of this format")
        return dict(self._connection.execute("SELECT key, sealed FROM rows"))

    def apply(self, upserts: dict[str, bytes], deletes: Iterable[str]) -> None:
        """One transaction: these rows written, those removed; all or nothing."""
        c = self._connection
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany(_UPSERT, upserts.items())
            c.executemany("DELETE FROM rows WHERE key = ?", ((k,) for k in deletes))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close; the last connection's close checkpoints the WAL into the file and removes it."""
        self._connection.close()

    def _one(self, sql: str) -> object:
        return self._connection.execute(sql).fetchone()[0]


def write_whole(path: Path, rows: Iterable[tuple[str, bytes]]) -> None:
    """Replace the file at `path` with a database holding just these rows (0600; atomically:
    a SIGKILL leaves the old file or the new one). Built in a temporary file beside it, row
    by row (never one big copy in memory, which would hold the GIL for milliseconds), then
    fsynced and renamed over. A WAL or index left beside the old file belongs to it and is
    removed first: replayed onto the new file it would corrupt it."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a write a crash interrupted
        stale.unlink(missing_ok=True)
    temporary = temporary_beside(path)
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        os.chmod(temporary, 0o600)  # whatever the umask
        _build(temporary, rows)
        for suffix in ("-wal", "-shm", "-journal"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path)


def _build(path: Path, rows: Iterable[tuple[str, bytes]]) -> None:
    """The rows into a new database at `path` (no journal: a crash discards the file), fsynced,
    marked WAL (the mode every later open uses)."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        for pragma in (f"page_size = {PAGE_SIZE}", f"application_id = {APPLICATION_ID}",
                       f"user_version = {USER_VERSION}", "journal_mode = OFF",
                       "synchronous = FULL"):  # fmt: skip
            connection.execute(f"PRAGMA {pragma}")
        connection.execute(_SCHEMA)
        connection.execute("BEGIN")
        connection.executemany("INSERT INTO rows (key, sealed) VALUES (?, ?)", rows)
        connection.execute("COMMIT")
        connection.execute("PRAGMA journal_mode = WAL")
    finally:
        connection.close()
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
