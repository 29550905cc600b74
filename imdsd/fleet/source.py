"""The etcd inventory source as the daemon sees it: the last known records (from the state
directory's cache), their status, and following etcd while the daemon runs.

The etcd client (and gRPC) is imported only when following starts: a host on the file source
never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from imdsd import steps
from imdsd.clock import Clock
from imdsd.config.inventory import EtcdConfig
from imdsd.fleet.cache import Cache
from imdsd.fleet.records import Layout, Mirror

if TYPE_CHECKING:
    from imdsd.fleet.follower import Follower
    from imdsd.inventory import Inventory

log = structlog.get_logger("imdsd.etcd")
CACHED_START_SECONDS = 1.0  # with a cache to serve, start-up waits this long for etcd at most
Apply = Callable[[set[str]], None]  # follow an applied change at once, never waiting


class FleetSource:
    """This host's part of the fleet: what it serves before etcd answers, and the follower."""

    def __init__(self, etcd: EtcdConfig, state_directory: Path, clock: Clock) -> None:
        self.layout = Layout(etcd.prefix, etcd.host)
        self.mirror = Mirror(self.layout)
        self.cache = Cache(state_directory, self.layout)
        self.name = f"etcd ({self.layout.mine()})"
        self._etcd, self._clock = etcd, clock
        self._follower: Follower | None = None
        cached = self.cache.load()
        self.cached_at = cached[2] if cached else None
        if cached:
            self.mirror.reset(cached[0], cached[1])

    def status(self) -> dict[str, Any]:
        if self._follower is None:
            return {"source": "etcd", "prefix": self.layout.prefix, "host": self.layout.host}
        return self._follower.status()

    @asynccontextmanager
    async def following(
        self, inventory: Inventory, applied: Apply, *, deadline: float
    ) -> AsyncIterator[None]:
        """Follow etcd in the background until exit. Waits for the first load up to the
        start-up deadline (a second when a cached inventory is already being served). A batch
        takes effect before the next guest request is read: nothing in it awaits the upstream
        (the sessions it needs are issued behind it), so no batch waits on another's issues."""
        from imdsd.fleet.follower import Follower

        async def apply() -> None:
            # made in steps (the mirror does not change meanwhile), applied in one
            patch = await steps.between_turns(self.mirror.patch_in_steps())
            if patch is not None:  # a batch: at its own size
                try:
                    applied(inventory.patch(patch))
                    return
                except Exception as exc:  # a bug: the view may be half-patched; rebuild it
                    log.error("fleet patch failed; rebuilding the inventory",
                              error=exc.__class__.__name__, exc_info=exc)  # fmt: skip
                    self.mirror.patch_no_more()
            # a whole load: in bounded steps, the guest loop turning between them
            baseline = await steps.between_turns(self.mirror.baseline_in_steps())
            applied(await inventory.rebase(*baseline))

        started = self._clock.now()
        self._follower = follower = Follower(self._etcd, self.mirror, self.cache,
                                             apply, self._clock,
                                             stale_since=self.cached_at or started)  # fmt: skip
        task = asyncio.create_task(follower.run(), name="fleet inventory")
        try:
            try:
                await asyncio.wait_for(
                    follower.synced.wait(), CACHED_START_SECONDS if self.cached_at else deadline
                )
            except TimeoutError:
                saved = self.cached_at.isoformat() if self.cached_at else None
                log.warning("fleet inventory: etcd not reached at start", serving_cache_of=saved)
            yield
        finally:
            await stopped(task)


STOP_POLL = 0.5  # seconds between cancellations of a follower that has not ended


async def stopped(task: asyncio.Task[None]) -> None:
    """Cancel the follower and wait for it to end, cancelling it again every STOP_POLL
    seconds: the etcd client can lose a cancellation (aetcd waits for a watch to be created
    in asyncio.wait_for, which on Python 3.11 returns normally when the cancellation and the
    answer arrive together), and a stop must not then wait on the watch for ever."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_POLL)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()
