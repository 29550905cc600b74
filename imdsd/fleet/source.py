"""The etcd inventory source as the daemon sees it: the last known records (from the state
directory's cache), their status, and following etcd while the daemon runs.

The etcd client (and gRPC) is imported only when following starts: a host on the file source
never loads it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from imdsd.clock import Clock
from imdsd.files import write_atomically
from imdsd.fleet.records import Layout, Mirror

if TYPE_CHECKING:
    from imdsd.config import Config
    from imdsd.fleet.follower import Follower
    from imdsd.inventory import Inventory

log = structlog.get_logger("imdsd.etcd")
CACHE_NAME = "fleet-inventory.json"
CACHE_MODE, DIRECTORY_MODE = 0o640, 0o750
CACHED_START_SECONDS = 1.0  # with a cache to serve, start-up waits this long for etcd at most
Apply = Callable[[set[str]], None]  # follow an applied change at once, never waiting


class Cache:
    """The last applied records, in the state directory (kept for this prefix and host only)."""

    def __init__(self, directory: Path, layout: Layout) -> None:
        self.path, self.layout = directory / CACHE_NAME, layout

    def load(self) -> tuple[dict[str, tuple[int, bytes]], int, datetime] | None:
        """(records, revision, when saved), or None when there is none for this layout."""
        try:
            data = json.loads(self.path.read_bytes())
            if data["prefix"] != self.layout.prefix or data["host"] != self.layout.host:
                return None
            records = {k: (int(c), base64.b64decode(v)) for k, (c, v) in data["records"].items()}
            return records, int(data["revision"]), datetime.fromisoformat(data["saved_at"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("fleet inventory cache unreadable; ignored", path=str(self.path),
                        error=exc.__class__.__name__)  # fmt: skip
            return None

    def save(self, mirror: Mirror, now: datetime) -> None:
        self.path.parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        records = {k: [c, base64.b64encode(v).decode()] for k, (c, v) in mirror.raw.items()}
        data = {"prefix": self.layout.prefix, "host": self.layout.host, "saved_at": now.isoformat(),
                "revision": mirror.revision, "records": records}  # fmt: skip
        write_atomically(self.path, json.dumps(data).encode(), CACHE_MODE)


class FleetSource:
    """This host's part of the fleet: what it serves before etcd answers, and the follower."""

    def __init__(self, config: Config, clock: Clock) -> None:
        etcd = config.inventory.etcd
        self.layout = Layout(etcd.prefix, etcd.host)
        self.mirror = Mirror(self.layout)
        self.cache = Cache(config.host.state_directory, self.layout)
        self.name = f"etcd ({self.layout.mine()})"
        self._config, self._clock = config, clock
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
    async def following(self, inventory: Inventory, applied: Apply) -> AsyncIterator[None]:
        """Follow etcd in the background until exit. Waits for the first load up to the
        start-up deadline (a second when a cached inventory is already being served). A batch
        takes effect before the next guest request is read: nothing in it awaits the upstream
        (the sessions it needs are issued behind it), so no batch waits on another's issues."""
        from imdsd.fleet.follower import Follower

        async def apply() -> None:
            applied(inventory.reload(*self.mirror.baseline()))

        started = self._clock.now()
        self._follower = follower = Follower(self._config.inventory.etcd, self.mirror, self.cache,
                                             apply, self._clock,
                                             stale_since=self.cached_at or started)  # fmt: skip
        task = asyncio.create_task(follower.run(), name="fleet inventory")
        deadline = self._config.rotation.startup_deadline.total_seconds()
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
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
