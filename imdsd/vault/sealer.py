"""Keeping the vault current: what changed is taken on the loop and sealed in a worker thread.

The loop's part of a seal is O(changes): it swaps out the sets of keys SessionCache and
Inventory recorded since the last seal and looks each one up, taking references to immutable
values; nothing is serialised or encrypted there. The worker thread reads the sessions back
from their documents, seals one row per value and commits them in one transaction. The first
seal of a process takes references to everything instead (once) and writes only what differs
from what load() found: nothing but a mark after a warm restart where nothing changed, a new
file after a cold start. Never imports aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from imdsd.clock import Clock
from imdsd.inventory import Inventory
from imdsd.sessions import Served, SessionCache
from imdsd.tokens import TokenIssuer
from imdsd.vault.rows import (
    INSTANCE,
    SESSION,
    STOPPED,
    TOKENS,
    Snapshot,
    instance_row,
    paced,
    session_row,
)
from imdsd.vault.store import Rows, Vault

VAULT_SECONDS = 5.0  # sealed this often (if anything changed): a SIGKILL loses at most that
PENDING_SEAL = 256  # keys waiting that make a seal due before its time
log = structlog.get_logger("imdsd.vault")


class Pending(set[str]):
    """The keys a SessionCache or an Inventory records for the next seal. Past PENDING_SEAL of
    them the seal is due at once: a host cycling through short-lived VMs must not keep
    thousands of removed ids until the next tick (nor a priming its 10,000 keys)."""

    __slots__ = ("_full",)

    def __init__(self, full: asyncio.Event) -> None:
        super().__init__()
        self._full = full

    def add(self, key: str) -> None:
        super().add(key)
        if len(self) >= PENDING_SEAL:
            self._full.set()

    def update(self, *keys: Iterable[str]) -> None:
        super().update(*keys)
        if len(self) >= PENDING_SEAL:
            self._full.set()


@dataclass(slots=True)
class Changes:
    """What one seal writes, as taken on the loop: references only."""

    sessions: Mapping[str, Served | None]  # None: dropped
    subjects: Mapping[str, bytes | None]  # instance id -> token subject; None: gone
    launched: Mapping[str, datetime]  # for each instance with a subject
    everything: bool = False  # every current value (the first seal), not only what changed
    token_key: bytes | None = field(default=None, repr=False)  # with everything
    final: bool = False  # the shutdown's seal: it marks a clean stop


class Sealer:
    """Takes what changed (on the loop) and seals it (in a worker thread, or at shutdown)."""

    def __init__(self, vault: Vault, inventory: Inventory, sessions: SessionCache,
                 tokens: TokenIssuer) -> None:  # fmt: skip
        self._vault, self._inventory, self._sessions, self._tokens = (
            vault, inventory, sessions, tokens)  # fmt: skip
        self.full = asyncio.Event()  # PENDING_SEAL keys wait: seal now
        sessions.changed, inventory.changed = Pending(self.full), Pending(self.full)  # from now
        self._first = True
        self.issuing = vault.issuing

    def due(self) -> bool:
        return self._first or bool(self._sessions.changed) or bool(self._inventory.changed)

    def take(self, *, final: bool = False) -> Changes:
        """On the loop: the keys recorded since the last seal, looked up (or, for the first
        seal, references to everything: dict copies, once per process)."""
        keys, self._sessions.changed = self._sessions.changed or set(), Pending(self.full)
        ids, self._inventory.changed = self._inventory.changed or set(), Pending(self.full)
        if self._first:
            served = self._sessions.served()
            subjects, launched = self._inventory.remembered()
            return Changes(served, subjects, launched, everything=True,
                           token_key=self._tokens.key, final=final)  # fmt: skip
        inventory, gone = self._inventory, {i for i in ids if self._inventory.instance(i) is None}
        return Changes(
            {k: self._sessions.get(k) for k in keys},
            {i: None if i in gone else inventory.token_subject(i) for i in ids},
            {i: inventory.launched_at(i) for i in ids - gone},
            final=final,
        )

    def seal(self, changes: Changes) -> bool:
        """In a worker thread (or at shutdown): seal and commit; False (logged) if the disk
        said no, and the changes are then taken again by the next seal (settle())."""
        whole = changes.everything and self._vault.held is None
        try:
            self._vault.commit(self.rows(changes), whole=whole)
        except (OSError, sqlite3.Error) as exc:  # a full disk costs a restart its warmth
            error = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
            log.warning("vault not written", path=str(self._vault.path), error=error)
            return False
        if changes.everything:
            self._vault.held = None  # the file now holds this process's state
        return True

    def settle(self, changes: Changes, written: bool) -> None:
        """On the loop, after seal(): what was not written is taken again next time."""
        if written:
            self._first = self._first and not changes.everything
        elif not changes.everything:
            for pending, keys in ((self._sessions.changed, changes.sessions),
                                  (self._inventory.changed, changes.subjects)):  # fmt: skip
                if pending is not None:
                    pending.update(keys)

    def stop(self) -> None:
        """Nothing is recorded for the vault any more."""
        self._sessions.changed = self._inventory.changed = None

    def rows(self, changes: Changes) -> Rows:
        """The rows to write (plain) or remove (None): for the first seal, only those that
        differ from what load() found in the file."""
        held = self._vault.held if changes.everything else None
        before = held.snapshot if held else None
        rows: Rows = {}
        token_key = changes.token_key
        if token_key is not None and (before is None or before.token_key != token_key):
            rows[TOKENS] = token_key
        restored = before.restored if before else {}
        for k, served in paced(changes.sessions.items()):
            if served is None:
                rows[SESSION + k] = None
            elif restored.get(k) is not served:
                rows[SESSION + k] = session_row(served.role_arn, served.session, self.issuing)
        for i, subject in paced(changes.subjects.items()):
            if subject is None:
                rows[INSTANCE + i] = None
            elif before is None or (subject, changes.launched[i]) != _instance(before, i):
                rows[INSTANCE + i] = instance_row(subject, changes.launched[i])
        if held:  # what the file holds for what is gone, and the mark of the last stop
            rows.update(dict.fromkeys(_gone(held.rows, changes)))
        if changes.final:
            rows[STOPPED] = b""
        return rows


def _instance(taken: Snapshot, instance_id: str) -> tuple[bytes, datetime] | None:
    subject, launched = taken.subjects.get(instance_id), taken.launched.get(instance_id)
    return None if subject is None or launched is None else (subject, launched)


def _gone(rows: frozenset[str], everything: Changes) -> list[str]:
    """The rows of a file that no current value has (and its stop mark)."""
    current: dict[str, Mapping[str, object]] = {
        SESSION: everything.sessions,
        INSTANCE: everything.subjects,
    }
    gone = []
    for key in paced(rows):
        kind, _, i = key.partition("/")
        values = current.get(kind + "/")
        if key == STOPPED or (values is not None and i not in values):
            gone.append(key)
    return gone


def restore(taken: Snapshot, inventory: Inventory, sessions: SessionCache, clock: Clock) -> None:
    """Serve the previous process's sessions that still belong to their association's role
    and are unexpired; the Rotator's priming then issues only what is missing or short."""
    now = clock.now()
    for key, (role_arn, session) in taken.sessions.items():
        association = inventory.association(key)
        if association and association.profile.role.arn == role_arn and now < session.expiration:
            taken.restored[key] = sessions.store(key, session, association.profile.role)
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
    """Keep the vault current: what changed is sealed in a worker thread every `every`
    seconds (so a SIGKILL loses at most that much), sooner once PENDING_SEAL keys wait, and
    once more at the end, after the worker's seal in progress (if any) has finished, so the
    last seal is the newest."""
    sealer = Sealer(vault, inventory, sessions, tokens)
    worker: asyncio.Task[bool] | None = None  # the seal in a thread, until settled
    given = Changes({}, {}, {})

    async def keep() -> None:
        nonlocal worker, given
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the event is set, and this loop would then outlive the stop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await sealer.full.wait()
            sealer.full.clear()
            if sealer.due():
                given = sealer.take()
                # Shielded: cancelling this loop must not abandon a thread that is still writing
                worker = asyncio.create_task(asyncio.to_thread(sealer.seal, given))
                written = await asyncio.shield(worker)
                worker = None
                sealer.settle(given, written)

    task = asyncio.create_task(keep(), name="vault")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if worker is not None:  # else its older changes could land after the last ones
            written = False
            with contextlib.suppress(Exception):  # its failure must not skip the final seal
                written = await worker
            sealer.settle(given, written)
        try:
            sealer.seal(sealer.take(final=True))
        finally:
            sealer.stop()
            vault.close()
