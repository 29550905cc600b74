"""`make bench`, the vault at 10,000 sessions: bytes written per seal and the guest loop's
worst stall while one runs.

In this process, with the daemon's own parts (Inventory, SessionCache, the vault's Sealer) and
the loop as the daemon runs it: a seal takes what changed on the loop and seals it in a worker
thread (asyncio.to_thread), exactly as `sealing()` does every 5 s. 10,000 instances, each
with a session (a 700-character token, as STS's are), are sealed once (the first seal of a
cold start: a new file, written whole), then N sessions are rotated before each seal. Bytes
written are what the process passed to write() (/proc/self/io wchar), WAL frames and their
checkpoint into the file included (the vault is closed at the end of each row: everything the
row wrote is checkpointed and counted); last, a restart that changed nothing (load, restore,
first seal). The stall is the worst lateness of a probe callback the loop runs every
millisecond during a seal, beside its worst over an idle window of the same loop.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from imdsd.clock import SystemClock
from imdsd.config import parse
from imdsd.imds import render
from imdsd.inventory import Inventory
from imdsd.model import Session
from imdsd.sessions import SessionCache
from imdsd.tokens import TokenIssuer
from imdsd.vault import FILE_NAME, Vault, restore
from imdsd.vault.sealer import Sealer
from imdsd.vault.store import Rows
from tests.helpers import config_text

COUNT = 10_000
ROWS = ((1, 1_000), (10, 200), (100, 40), (1_000, 8))  # (sessions rotated per seal, seals)
STALL_GOAL_MS = 5.0
PROBE_SECONDS = 0.001


class Counted(Vault):
    """The vault, counting the sealed bytes it commits (the rows' own size)."""

    sealed = 0

    def commit(self, rows: Rows, *, whole: bool = False) -> int:
        written = super().commit(rows, whole=whole)
        self.sealed += written
        return written


class Probe:
    """A callback the loop runs every millisecond; its worst lateness is the loop's stall."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._loop = asyncio.get_running_loop()
        self._due = self._loop.time() + PROBE_SECONDS
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        self.worst = max(self.worst, now - self._due)
        self._due = now + PROBE_SECONDS
        self._handle = self._loop.call_at(self._due, self._tick)

    def stop(self) -> float:
        self._handle.cancel()
        return self.worst


def wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def session(n: int, rng: random.Random, now: datetime) -> Session:
    return Session(access_key_id=f"ASIA{rng.getrandbits(64):016X}", issued_at=now,
                   secret_access_key=secrets.token_urlsafe(30), token=secrets.token_urlsafe(525),
                   expiration=now + timedelta(hours=6))  # fmt: skip


def host() -> tuple[Inventory, SessionCache, list[str]]:
    """10,000 instances, each associated with one profile (the tests' config's first)."""
    config = parse(config_text())
    template, ids = config.instances[0], [f"i-{n:017x}" for n in range(1, COUNT + 1)]
    instances = [replace(template, id=i, addresses=(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}",))
                 for n, i in enumerate(ids, 1)]  # fmt: skip
    inventory = Inventory(instances, config.profiles, [(i, "profile-a") for i in ids],
                          SystemClock())  # fmt: skip
    sessions = SessionCache(render.credentials, render.failure, render.read_credentials)
    return inventory, sessions, ids


async def one_seal(sealer: Sealer) -> tuple[float, float]:
    """(the loop's part in ms, the worst probe lateness in ms) of one seal as sealing() runs it."""
    probe = Probe()
    await asyncio.sleep(0.005)
    started = time.perf_counter()
    changes = sealer.take()
    taken = time.perf_counter() - started
    written = await asyncio.to_thread(sealer.seal, changes)
    sealer.settle(changes, written)
    await asyncio.sleep(0.002)
    return taken * 1e3, probe.stop() * 1e3


async def idle() -> float:
    probe = Probe()
    await asyncio.sleep(2.0)
    return probe.stop() * 1e3


async def rows(directory: Path) -> list[str]:
    inventory, sessions, ids = host()
    rng, now = random.Random(20), datetime.now(UTC)
    role = inventory.profiles()[0].role
    for n, i in enumerate(ids):
        sessions.store(i, session(n, rng, now), role)
    key, backend = secrets.token_bytes(32), parse(config_text()).backend
    vault = Counted(directory, key, backend)
    tokens = TokenIssuer(SystemClock())
    sealer = Sealer(vault, inventory, sessions, tokens)
    lines = [f"probe lateness on the idle loop (2 s): worst {await idle():.2f} ms"]
    before = wchar()
    took, stall = await one_seal(sealer)
    size = (directory / FILE_NAME).stat().st_size
    lines.append(f"first seal of a cold start, {COUNT:,} sessions (a new file, whole): "
                 f"{wchar() - before:,} bytes written (file {size:,}); loop: {took:.2f} ms "
                 f"taking references, worst stall {stall:.2f} ms")  # fmt: skip
    for per_seal, seals in ROWS:
        before, vault.sealed, worst, worst_take = wchar(), 0, 0.0, 0.0
        for _ in range(seals):
            for n in rng.sample(range(COUNT), per_seal):
                sessions.store(ids[n], session(n, rng, now), role)
            took, stall = await one_seal(sealer)
            worst, worst_take = max(worst, stall), max(worst_take, took)
        await asyncio.to_thread(vault.close)  # what the row wrote, checkpointed into the file
        changed, written = per_seal * seals, wchar() - before
        bound = max(2 * vault.sealed, 8192 * changed)
        verdict = "within" if written <= bound else "OVER"
        lines.append(
            f"rotate {per_seal:>5,} per seal x {seals:>5,}: {written / changed:7,.0f} bytes per "
            f"changed session ({verdict} the goal: {bound / changed:,.0f} = max(2 x sealed "
            f"{vault.sealed / changed:,.0f}, 8 KiB)); loop: {worst_take:.2f} ms taken, worst "
            f"stall {worst:.2f} ms (goal <= {STALL_GOAL_MS:.0f} ms)"
        )
    await asyncio.to_thread(sealer.seal, sealer.take(final=True))  # a clean stop
    await asyncio.to_thread(vault.close)
    return [*lines, await warm(directory, key, inventory, tokens)]


async def warm(directory: Path, key: bytes, inventory: Inventory, tokens: TokenIssuer) -> str:
    """A clean restart that changed nothing: load, restore, and the first seal's bytes (the
    clean-stop mark removed)."""
    vault = Counted(directory, key, parse(config_text()).backend)
    taken = vault.load()
    assert taken is not None
    sessions = SessionCache(render.credentials, render.failure, render.read_credentials)
    restore(taken, inventory, sessions, SystemClock())
    before = wchar()
    took, stall = await one_seal(Sealer(vault, inventory, sessions, tokens))
    await asyncio.to_thread(vault.close)
    return (f"first seal after a clean restart that changed nothing: {wchar() - before:,} bytes "
            f"written; loop: {took:.2f} ms taking references, worst stall {stall:.2f} ms")  # fmt: skip


def table(directory: Path) -> list[str]:
    """The vault rows: the first seal of 10,000 sessions, then rotations of N per seal."""
    directory = directory / "vault"
    directory.mkdir(parents=True, exist_ok=True)
    logging = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings
    try:
        lines = asyncio.run(rows(directory))
    finally:
        structlog.configure(**logging)
    return [f"vault, {COUNT:,} sessions (one row each; WAL, one seal per 5 s in the daemon):",
            *lines]  # fmt: skip


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(table(Path(tmp))))
