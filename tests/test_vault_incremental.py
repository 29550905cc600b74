"""Invariants 8 and 9 for the vault at size: a seal writes what changed and nothing else, and
the loop's part of it is the changed keys' references (asserted on what it takes and on the
file's own size, never on time); a restart that changed nothing rewrites nothing."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from imdsd.imds import render
from imdsd.inventory import Inventory
from imdsd.model import Session
from imdsd.sessions import SessionCache
from imdsd.tokens import TokenIssuer
from imdsd.vault import FILE_NAME, Vault, restore, sealing
from imdsd.vault.database import PAGE_SIZE
from imdsd.vault.sealer import PENDING_SEAL, Sealer
from imdsd.vault.store import Rows
from tests.fakes import START, FakeClock
from tests.helpers import make_config

KEY = b"v" * 32
SIZE = 2_000
WAL_HEADER, FRAME = 32, 24 + PAGE_SIZE


def session(n: int, generation: int = 0) -> Session:
    return Session(access_key_id=f"ASIA{generation:04d}{n:012d}", secret_access_key="s" * 40,
                   token=f"t{n}-{generation}-" + "x" * 400, issued_at=START,
                   expiration=START + timedelta(hours=6))  # fmt: skip


def ids(count: int) -> list[str]:
    return [f"i-{n:017x}" for n in range(1, count + 1)]


def host(clock: FakeClock, count: int = SIZE) -> tuple[Inventory, SessionCache]:
    """`count` instances, each associated with profile-a, each with a session."""
    config = make_config()
    template = config.instances[0]
    instances = [replace(template, id=i, addresses=(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}",))
                 for n, i in enumerate(ids(count), 1)]  # fmt: skip
    inventory = Inventory(instances, config.profiles, [(i, "profile-a") for i in ids(count)],
                          clock)  # fmt: skip
    sessions = SessionCache(render.credentials, render.failure, render.read_credentials)
    rotate(inventory, sessions, range(count))
    return inventory, sessions


def rotate(inventory: Inventory, sessions: SessionCache, which: range, generation: int = 0) -> None:
    everyone = ids(max(which) + 1)
    for n in which:
        association = inventory.association(everyone[n])
        assert association is not None
        sessions.store(everyone[n], session(n, generation), association.profile.role)


def wal(directory: Path) -> int:
    path = directory / (FILE_NAME + "-wal")
    return path.stat().st_size if path.exists() else 0


def test_a_seal_after_one_change_writes_one_row(tmp_path: Path, clock: FakeClock) -> None:
    """2,000 sessions sealed (a new file, written whole), then one session rotates: the loop
    takes that one key's reference, the worker writes one page to the WAL and the file itself
    is not touched. Then an instance leaves and one comes: two subjects, one session gone."""
    inventory, sessions = host(clock)
    vault = Vault(tmp_path, KEY, make_config().backend)
    sealer = Sealer(vault, inventory, sessions, TokenIssuer(clock))
    first = sealer.take()
    assert first.everything and len(first.sessions) == len(first.subjects) == SIZE
    assert sealer.seal(first)
    sealer.settle(first, True)
    size, image = (tmp_path / FILE_NAME).stat().st_size, (tmp_path / FILE_NAME).read_bytes()
    assert size > SIZE * 500 and wal(tmp_path) == 0

    rotate(inventory, sessions, range(7, 8), generation=1)
    changes = sealer.take()
    for secret in (session(7, 1).secret_access_key, session(7, 1).token, KEY.decode()):
        assert secret not in repr(changes) and secret not in repr(vault)
    assert (dict(changes.sessions), changes.subjects, changes.everything) == (
        {ids(SIZE)[7]: sessions.get(ids(SIZE)[7])},
        {},
        False,
    )
    assert sealer.seal(changes)
    assert wal(tmp_path) == WAL_HEADER + FRAME  # one page of the table, nothing else
    assert (tmp_path / FILE_NAME).read_bytes() == image

    before = wal(tmp_path)
    gone, new = ids(SIZE)[3], f"i-{SIZE + 1:017x}"
    inventory.reload([*[i for i in inventory.instances() if i.id != gone],
                      replace(inventory.instances()[0], id=new, addresses=("10.9.9.9",))],
                     inventory.profiles(), [])  # fmt: skip
    sessions.drop(gone)
    changes = sealer.take()
    assert set(changes.subjects) == {gone, new} and changes.subjects[gone] is None
    assert dict(changes.sessions) == {gone: None}
    assert sealer.seal(changes)
    assert wal(tmp_path) - before <= 6 * FRAME  # the rows' pages and their index pages
    vault.close()
    taken = Vault(tmp_path, KEY, make_config().backend).load()
    assert taken is not None and gone not in taken.sessions and gone not in taken.subjects
    assert taken.sessions[ids(SIZE)[7]][1] == session(7, 1) and new in taken.subjects


def test_nothing_changed_nothing_taken(tmp_path: Path, clock: FakeClock) -> None:
    """After the first seal, a seal is due only when something was recorded; a failure
    recorded for a session (it keeps its session) is not a change."""
    inventory, sessions = host(clock, 10)
    sealer = Sealer(Vault(tmp_path, KEY, make_config().backend), inventory, sessions,
                    TokenIssuer(clock))  # fmt: skip
    assert sealer.due()
    sealer.settle(changes := sealer.take(), sealer.seal(changes))
    sessions.fail(ids(10)[0], "AccessDenied", "no", START)
    assert not sealer.due()
    assert sealer.take().sessions == {}


@pytest.mark.parametrize("keep_tokens", [True, False])
def test_a_warm_restart_that_changed_nothing_rewrites_nothing(
    tmp_path: Path, clock: FakeClock, keep_tokens: bool
) -> None:
    """The first seal after a warm restart compares with what the file held: with the same
    sessions, instances and token key it removes the clean-stop mark and writes no row;
    a new token key (keep_tokens = false), one re-issued session and one instance more are
    exactly what it writes."""
    inventory, sessions = host(clock)
    tokens = TokenIssuer(clock)
    backend = make_config().backend
    sealer = Sealer(Vault(tmp_path, KEY, backend), inventory, sessions, tokens)
    assert sealer.seal(sealer.take(final=True))  # a whole file, and a clean stop
    again = Vault(tmp_path, KEY, backend)
    taken = again.load()
    assert taken is not None
    config = make_config()
    inventory = Inventory([*inventory.instances()], config.profiles,
                          [(i, "profile-a") for i in ids(SIZE)], clock,
                          remembered=(taken.subjects, taken.launched))  # fmt: skip
    sessions = SessionCache(render.credentials, render.failure, render.read_credentials)
    restore(taken, inventory, sessions, clock)
    tokens = TokenIssuer(clock, taken.token_key if keep_tokens else None)
    sealer = Sealer(again, inventory, sessions, tokens)
    if keep_tokens:
        assert sealer.rows(sealer.take()) == {"stopped": None}
        return
    rotate(inventory, sessions, range(5, 6), generation=2)
    new = f"i-{SIZE + 1:017x}"
    inventory.reload([*inventory.instances(), replace(inventory.instances()[0], id=new,
                                                      addresses=("10.9.9.9",))],
                     config.profiles, [])  # fmt: skip
    rows = sealer.rows(sealer.take())
    assert sorted(rows) == sorted(["token-key", "stopped", f"session/{ids(SIZE)[5]}",
                                   f"instance/{new}"])  # fmt: skip


class FailingOnce(Vault):
    """A vault whose first incremental commit meets a full disk."""

    failed = False

    def commit(self, rows: Rows, *, whole: bool = False) -> int:
        if not whole and not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")
        return super().commit(rows, whole=whole)


async def test_what_a_failed_seal_did_not_write_the_next_one_does(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A seal the disk refused (one warning, naming no secret) leaves its keys recorded: the
    next seal writes them, and a restart finds the session that changed before the failure."""
    inventory, sessions = host(clock, 10)
    vault = FailingOnce(tmp_path, KEY, make_config().backend)
    with capture_logs() as logs:
        async with sealing(vault, inventory, sessions, TokenIssuer(clock), every=0.01):
            while not (tmp_path / FILE_NAME).exists():
                await asyncio.sleep(0.01)
            rotate(inventory, sessions, range(2, 3), generation=3)
            while wal(tmp_path) == 0:  # written by the seal after the failed one
                await asyncio.sleep(0.01)
            assert vault.failed
    assert [(e["event"], e["error"]) for e in logs] == [
        ("vault not written", "No space left on device")
    ]
    assert sessions.changed is None and inventory.changed is None  # nobody records any more
    taken = Vault(tmp_path, KEY, make_config().backend).load()
    assert taken is not None and taken.sessions[ids(10)[2]][1] == session(2, 3)


async def test_many_waiting_keys_are_sealed_before_their_time(
    tmp_path: Path, clock: FakeClock
) -> None:
    """PENDING_SEAL keys waiting make a seal due at once, not at the next tick (an hour away
    here): a host cycling through short-lived VMs keeps no more removed ids than that."""
    inventory, sessions = host(clock, PENDING_SEAL)
    async with sealing(Vault(tmp_path, KEY, make_config().backend), inventory, sessions,
                       TokenIssuer(clock), every=3600):  # fmt: skip
        rotate(inventory, sessions, range(PENDING_SEAL), generation=1)
        async with asyncio.timeout(10):  # the first seal: a new file
            while not (tmp_path / FILE_NAME).exists():
                await asyncio.sleep(0.01)
        rotate(inventory, sessions, range(PENDING_SEAL), generation=2)
        async with asyncio.timeout(10):  # the next: the WAL
            while wal(tmp_path) == 0:
                await asyncio.sleep(0.01)
        assert sessions.changed is not None and len(sessions.changed) < PENDING_SEAL
