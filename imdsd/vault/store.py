"""Vault: the sealed file in the state directory, opened at start and written row by row.

load() reads it at start (or the previous version's single file, taken over once); commit()
seals rows and writes them in one transaction, or writes a new file whole. A file that was
tampered with, truncated or sealed under another key is ignored with one warning and the
start is cold; the first seal then writes a new one over it. Sessions issued under another
configuration (`issuing()`) are dropped at load with one info line. Never imports aiohttp.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sqlite3
import threading
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imdsd.config.backend import BackendConfig
from imdsd.files import write_atomically
from imdsd.vault.database import HEADER, Database, write_whole
from imdsd.vault.legacy import read as read_legacy
from imdsd.vault.rows import (
    INSTANCE,
    SESSION,
    STOPPED,
    TOKENS,
    Snapshot,
    instance_row,
    paced,
    read,
    seal,
    session_row,
    unseal,
)

FILE_NAME = "sessions.sealed"  # an SQLite database since format 2 (the name is kept: tools
KEY_NAME = "vault.key"  # and tests that watch the file still find it)
_TRANSPORT = ("timeout",)  # backend settings that do not change what a session is
DROPPED = "sessions sealed under another issuing configuration dropped; they are issued anew"
log = structlog.get_logger("imdsd.vault")
Rows = dict[str, bytes | None]  # row key -> plain text, or None: the row goes


@dataclass(frozen=True, slots=True)
class Held:
    """What the file held when load() read it, for the first seal to write only what differs."""

    rows: frozenset[str]
    snapshot: Snapshot  # as taken over (its `restored`: the sessions served from it)


class Vault:
    """The sealed file of one state directory, for sessions of one issuing configuration."""

    def __init__(self, directory: Path, key: bytes, backend: BackendConfig) -> None:
        self.path = directory / FILE_NAME
        self.issuing = issuing(backend)
        self.held: Held | None = None  # None: no usable file; the first seal writes it whole
        self._aead = AESGCM(key)
        self._lock = threading.Lock()  # a worker thread's seal, the shutdown's, close()
        self._database: Database | None = None  # opened by the first seal that is not whole

    def __repr__(self) -> str:
        return f"Vault({self.path}, key=<hidden>)"

    def load(self) -> Snapshot | None:
        """What the file holds, or None (absent; or unusable: one warning, a cold start)."""
        self.held = None
        try:
            with self.path.open("rb") as file:
                head = file.read(len(HEADER))
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("vault unreadable; starting cold", path=str(self.path), error=exc.strerror)
            return None
        try:
            return self._read() if head == HEADER else self._migrate()
        except (InvalidTag, ValueError, KeyError, TypeError, sqlite3.Error):
            log.warning("vault tampered with, truncated or sealed under another key; starting"
                        " cold", path=str(self.path))  # fmt: skip
            return None

    def commit(self, rows: Rows, *, whole: bool = False) -> int:
        """Seal these rows and write them (and remove those given None) in one transaction;
        `whole`: replace the file with one holding just them. Returns the sealed bytes.
        OSError or sqlite3.Error if the disk says no (nothing of this commit is then kept)."""
        sealed = {k: seal(self._aead, k, v) for k, v in paced(rows.items()) if v is not None}
        with self._lock:
            if whole:
                self._close()
                write_whole(self.path, paced(sealed.items()))
            else:
                if self._database is None:
                    self._database = Database(self.path)
                self._database.apply(sealed, [k for k, v in rows.items() if v is None])
        return sum(len(v) for v in sealed.values())

    def save(self, snapshot: Snapshot) -> None:
        """Write a snapshot as a whole new file, marked as a clean stop's."""
        rows: Rows = {TOKENS: snapshot.token_key, STOPPED: b""}
        for iid, subject in snapshot.subjects.items():
            rows[INSTANCE + iid] = instance_row(subject, snapshot.launched[iid])
        for iid, (role_arn, session) in snapshot.sessions.items():
            rows[SESSION + iid] = session_row(role_arn, session, self.issuing)
        self.commit(rows, whole=True)

    def close(self) -> None:
        """Close the file (its WAL is checkpointed into it); a later commit opens it again."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._database is not None:
            self._database.close()
            self._database = None

    def _read(self) -> Snapshot:
        database = Database(self.path)
        try:
            sealed = database.rows()
        finally:
            database.close()
        got = read({k: unseal(self._aead, k, v) for k, v in sealed.items()}, self.issuing)
        if got.foreign:
            log.info(DROPPED, dropped=got.foreign)
        if not got.stopped:
            log.info("the previous process stopped without its last seal (a crash, a SIGKILL or"
                     " a power cut): its last seconds of changes were not kept")  # fmt: skip
        self.held = Held(frozenset(sealed), got.snapshot)
        return got.snapshot

    def _migrate(self) -> Snapshot:
        taken, digest = read_legacy(self.path.read_bytes(), self._aead)
        log.info("vault of the previous version taken over; the first seal rewrites it in the"
                 " new format", path=str(self.path))  # fmt: skip
        if digest != self.issuing:
            log.info(DROPPED, dropped=len(taken.sessions))
            taken.sessions = {}
        return taken


def vault_key(path: Path) -> bytes:
    """The key at `path` (32 raw bytes, or their base64), generated (0600) if there is none."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = secrets.token_bytes(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, raw, 0o600)
    if len(raw) != 32:
        raw = base64.b64decode(raw.strip(), validate=True)
    if len(raw) != 32:
        raise ValueError("the vault key must be 32 bytes")
    return raw


def issuing(backend: BackendConfig) -> str:
    """A digest of what makes a session what it is: the backend's kind and its own section
    (endpoint, region, host profile, lifetime, scope, tags, source identity ...), the local
    issuer's key by a digest of it only; not transport settings (timeout). A local issuer
    with no key configured generates one at each start: "none configured" is then the same
    configuration from one start to the next, as before the digest existed."""
    section = backend.section
    values: dict[str, Any] = {"kind": backend.kind}
    for f in fields(section):
        if f.name not in _TRANSPORT:
            values[f.name] = getattr(section, f.name)
    if isinstance(values.get("key"), bytes):
        values["key"] = hashlib.sha256(b"imdsd local issuer key\0" + values["key"]).hexdigest()
    canonical = json.dumps(values, sort_keys=True, default=_canonical)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _canonical(value: object) -> object:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Path):  # the Roles Anywhere section's files
        return str(value)
    raise TypeError(f"no canonical form for {type(value).__name__}")
