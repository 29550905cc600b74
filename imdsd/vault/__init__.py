"""The warm-restart vault: what a restart must not lose, sealed with AES-GCM.

Sessions, the IMDSv2 token key, and each instance's token subject (its incarnation) and launch
time, so that after an upgrade or a SIGKILL the sessions that are still good are served at once
with no upstream call, guests' tokens still verify, and pendingTime does not move (DESIGN
invariant 8). The sessions are sealed with a digest of the configuration that issued them
(`issuing()`): a start under another one (another backend, endpoint, region, issuer key, tags
...) takes over the token key and incarnations but not the sessions, which are issued anew.
The vault's key lives apart from the data: its own 0600 file (generated on first use) or a
systemd credential. A file that is tampered with, truncated or sealed under another key is
ignored with one warning and the start is cold. Nothing is written in clear: the temporary
file of a write holds ciphertext only. It is re-sealed in a worker thread, never on the loop
that serves the guests. Never imports aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imdsd.clock import Clock
from imdsd.config.backend import BackendConfig
from imdsd.files import write_atomically
from imdsd.inventory import Inventory
from imdsd.model import Session
from imdsd.sessions import Served, SessionCache
from imdsd.tokens import TokenIssuer

VAULT_SECONDS = 5.0  # re-sealed at most this often: a SIGKILL loses at most that much
FILE_NAME = "sessions.sealed"
KEY_NAME = "vault.key"
_AAD = b"imdsd vault 1"
_NONCE = 12
_TRANSPORT = ("timeout",)  # backend settings that do not change what a session is
log = structlog.get_logger("imdsd.vault")


@dataclass(slots=True)
class Snapshot:
    """What a restart takes over."""

    token_key: bytes = field(repr=False)
    subjects: dict[str, bytes] = field(default_factory=dict)  # instance id -> token subject
    launched: dict[str, datetime] = field(default_factory=dict)
    sessions: dict[str, tuple[str, Session]] = field(default_factory=dict, repr=False)  # role


class Vault:
    """One sealed file in the state directory, for the sessions of one issuing configuration."""

    def __init__(self, directory: Path, key: bytes, backend: BackendConfig) -> None:
        self.path = directory / FILE_NAME
        self._aead = AESGCM(key)
        self._issuing = issuing(backend)

    def __repr__(self) -> str:
        return f"Vault({self.path}, key=<hidden>)"

    def load(self) -> Snapshot | None:
        """The last snapshot, or None (absent; or unusable: one warning, a cold start). Its
        sessions are dropped (one line) unless they were issued under this configuration; a
        vault sealed before sessions carried that digest counts as another configuration."""
        try:
            sealed = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("vault unreadable; starting cold", path=str(self.path), error=exc.strerror)
            return None
        try:
            plain = json.loads(self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], _AAD))
            taken = _snapshot(plain)
        except (InvalidTag, ValueError, KeyError, TypeError):
            log.warning("vault tampered with, truncated or sealed under another key; starting"
                        " cold", path=str(self.path))  # fmt: skip
            return None
        if plain.get("issuing") != self._issuing:
            log.info("sessions sealed under another issuing configuration dropped; they are"
                     " issued anew", dropped=len(taken.sessions))  # fmt: skip
            taken.sessions = {}
        return taken

    def save(self, snapshot: Snapshot) -> None:
        """Seal and replace atomically (write, fsync, rename); 0600 whatever the umask."""
        nonce = secrets.token_bytes(_NONCE)
        plain = json.dumps({**_plain(snapshot), "issuing": self._issuing}).encode()
        write_atomically(self.path, nonce + self._aead.encrypt(nonce, plain, _AAD), 0o600)


def restore(taken: Snapshot, inventory: Inventory, sessions: SessionCache, clock: Clock) -> None:
    """Serve the previous process's sessions that still belong to their association's role
    and are unexpired; the Rotator's priming then issues only what is missing or short."""
    now = clock.now()
    for key, (role_arn, session) in taken.sessions.items():
        association = inventory.association(key)
        if association and association.profile.role.arn == role_arn and now < session.expiration:
            sessions.store(key, session, association.profile.role)
    log.info("warm restart", sessions_taken_over=len(sessions.keys()), sealed=len(taken.sessions))


@asynccontextmanager
async def sealing(
    vault: Vault,
    inventory: Inventory,
    sessions: SessionCache,
    tokens: TokenIssuer,
    *,
    every: float = VAULT_SECONDS,
) -> AsyncIterator[None]:
    """Keep the vault current: re-sealed in a worker thread when something changed (at most
    `every` seconds, so a SIGKILL loses at most that much), and once more at the end, after
    the worker's seal in progress (if any) has finished, so the last seal is the newest."""

    def snapshot() -> tuple[Snapshot, dict[str, Served]]:
        """What to seal, taken on the event loop: references only (Served is immutable)."""
        subjects, launched = inventory.remembered()
        served = {k: s for k in sessions.keys() if (s := sessions.get(k))}
        return Snapshot(token_key=tokens.key, subjects=subjects, launched=launched), served

    def seal(taken: Snapshot, served: dict[str, Served]) -> None:
        # Each session is read back from its document here, in the worker thread: for 10,000
        # sessions that is ~50 ms of JSON the event loop serving the guests must not spend.
        kept = {k: (s.role_arn, s.session) for k, s in served.items()}
        try:
            vault.save(replace(taken, sessions=kept))
        except OSError as exc:  # a full disk costs the next restart its warmth, nothing more
            log.warning("vault not written", path=str(vault.path), error=exc.strerror)

    worker: asyncio.Task[None] | None = None  # the latest seal in a thread

    async def keep() -> None:
        nonlocal worker
        sealed = None
        while True:
            await asyncio.sleep(every)
            mark = (inventory.version, sessions.version)
            if mark != sealed:
                # Shielded: cancelling this loop must not abandon a thread that is still writing
                worker = asyncio.create_task(asyncio.to_thread(seal, *snapshot()))
                await asyncio.shield(worker)
                sealed = mark

    task = asyncio.create_task(keep(), name="vault")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if worker is not None:  # else its older snapshot could land after the last one
            with contextlib.suppress(Exception):  # its failure must not skip the final seal
                await worker
        seal(*snapshot())


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


def _plain(s: Snapshot) -> dict[str, Any]:
    return {
        "token_key": _b64(s.token_key),
        "subjects": {iid: _b64(v) for iid, v in s.subjects.items()},
        "launched": {iid: t.isoformat() for iid, t in s.launched.items()},
        "sessions": {
            iid: {
                "role": role,
                "id": x.access_key_id,
                "secret": x.secret_access_key,
                "token": x.token,
                "issued": x.issued_at.isoformat(),
                "expires": x.expiration.isoformat(),
            }
            for iid, (role, x) in s.sessions.items()
        },
    }


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _snapshot(d: dict[str, Any]) -> Snapshot:
    return Snapshot(
        token_key=base64.b64decode(d["token_key"]),
        subjects={iid: base64.b64decode(v) for iid, v in d["subjects"].items()},
        launched={iid: datetime.fromisoformat(t) for iid, t in d["launched"].items()},
        sessions={
            iid: (
                x["role"],
                Session(
                    access_key_id=x["id"],
                    secret_access_key=x["secret"],
                    token=x["token"],
                    issued_at=datetime.fromisoformat(x["issued"]),
                    expiration=datetime.fromisoformat(x["expires"]),
                ),
            )
            for iid, x in d["sessions"].items()
        },
    )
