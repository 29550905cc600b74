"""Keeps this host's inventory in step with etcd, and serving through etcd's outages.

Load (profiles and this host's records, at one revision), then watch both prefixes from the
next revision; each batch of events is applied as one change. A compacted watch reloads; a lost
stream, or a TLS or password file that cannot be read, retries with backoff, trying each endpoint
in turn. Every applied state is written to the state directory, so a host restarted while etcd
is down serves its last known inventory. No etcd call is ever on the guest path: guests read the
inventory the last change left.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import structlog
from aetcd.exceptions import RevisionCompactedError
from aetcd.rtypes import EventKind

from imdsd.clock import Clock
from imdsd.config.inventory import EtcdConfig
from imdsd.errors import UnreadableFiles
from imdsd.fleet.cache import Cache
from imdsd.fleet.client import RESPONSE_END, Client, open_client
from imdsd.fleet.records import Mirror

log = structlog.get_logger("imdsd.etcd")
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 10.0  # seconds; doubled per failed attempt, jittered
Apply = Callable[[], Awaitable[None]]
EVENTS_STEP = 50  # watch events parsed per turn of the loop (~0.3 ms)


class Follower:
    """The watch loop, its connection state, and how stale the inventory may be. `backoff` is
    the first and the longest pause between attempts, in seconds (doubled per failed one)."""

    def __init__(self, config: EtcdConfig, mirror: Mirror, cache: Cache, apply: Apply,
                 clock: Clock, *, stale_since: datetime,
                 backoff: tuple[float, float] = (BACKOFF_FIRST, BACKOFF_MAX)) -> None:  # fmt: skip
        self._config, self._mirror, self._cache = config, mirror, cache
        self._apply, self._clock, self._backoff = apply, clock, backoff
        self.synced = asyncio.Event()  # the first full load from etcd has been applied
        self.connected = False
        self.stale_since: datetime | None = stale_since  # None while watching
        self._unreadable: set[tuple[str, str]] = set()  # (key, errno) of client files failing

    def status(self) -> dict[str, Any]:
        """For `imdsd status` and the metrics: where the inventory comes from, how fresh."""
        stale = 0.0
        if self.stale_since is not None:
            stale = (self._clock.now() - self.stale_since).total_seconds()
        return {"source": "etcd", "endpoints": [str(e) for e in self._config.endpoints],
                "prefix": self._config.prefix, "host": self._config.host,
                "revision": self._mirror.revision, "connected": self.connected,
                "stale_seconds": round(stale, 3)}  # fmt: skip

    async def run(self) -> None:
        """Forever: connect, follow; on any failure keep what is served and try again."""
        failures = 0
        while True:
            client = await self._client(failures)
            if client is not None:
                try:
                    await self._follow(client)
                except Exception as exc:
                    if _stopping():  # a stop, reported by the client as its own error
                        raise asyncio.CancelledError from exc
                    self._lost(exc, failures)
                finally:
                    with contextlib.suppress(Exception):
                        # shielded: a stop re-cancels us (source.stopped), not the close
                        await asyncio.wait_for(asyncio.shield(client.close()), 2)
            failures = 0 if self.connected else failures + 1
            self.connected = False
            first, most = self._backoff
            delay = min(most, first * 2 ** min(failures, 8))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 -- jitter

    async def _client(self, attempt: int) -> Client | None:
        """This attempt's client; None (backing off as from a lost etcd) while a TLS or password
        file cannot be read. Logged once per change: a warning per newly failing key and errno,
        one info when all are readable again. Never the files' contents. The files are read in a
        worker thread: a hung mount or a FIFO never stalls the guest loop."""
        try:
            client = await asyncio.to_thread(open_client, self._config, attempt)
        except UnreadableFiles as exc:
            new = set(exc.failures) - self._unreadable
            if not new:
                log.debug("fleet inventory: etcd client files still unreadable", attempt=attempt)
            for key, error in sorted(new):
                log.warning("fleet inventory: an etcd client file is unreadable; serving the last"
                            " known inventory until it is", key=key, errno=error,
                            revision=self._mirror.revision)  # fmt: skip
            self._unreadable = set(exc.failures)
            if self.stale_since is None:
                self.stale_since = self._clock.now()
            return None
        if self._unreadable:
            log.info("fleet inventory: the etcd client files are readable again",
                     keys=sorted({key for key, _ in self._unreadable}))  # fmt: skip
            self._unreadable = set()
        return client

    def _lost(self, exc: Exception, failures: int) -> None:
        if self.stale_since is None:
            self.stale_since = self._clock.now()
            log.warning("fleet inventory: etcd unreachable; serving the last known inventory",
                        error=exc.__class__.__name__, revision=self._mirror.revision)  # fmt: skip
        else:
            log.debug("fleet inventory: etcd still unreachable", attempt=failures + 1,
                      error=exc.__class__.__name__)  # fmt: skip

    async def _follow(self, client: Client) -> None:
        await client.connect()
        while True:
            revision = await self._load(client)
            try:
                await self._watch(client, revision)
            except RevisionCompactedError:
                log.info("fleet inventory: watch revision compacted; reloading", revision=revision)

    async def _load(self, client: Client) -> int:
        """Profiles and this host's records, both as of one revision (the watch goes on from
        the next, so no event is missed and none replayed over a newer state)."""
        layout = self._mirror.layout
        revision, kvs = await client.snapshot(layout.profiles, layout.mine())
        records = {kv.key.decode(errors="replace"): (kv.create_revision, kv.value) for kv in kvs}
        self._mirror.reset(records, revision)
        await self._changed()
        if self.stale_since is not None:
            log.info("fleet inventory in sync with etcd", revision=revision,
                     records=len(self._mirror.raw),
                     stale_seconds=self.status()["stale_seconds"])  # fmt: skip
        self.connected, self.stale_since = True, None
        self.synced.set()
        return revision

    async def _watch(self, client: Client, revision: int) -> None:
        layout = self._mirror.layout
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        watches = [await client.watch_prefix(p.encode(), start_revision=revision + 1)
                   for p in (layout.profiles, layout.mine())]  # fmt: skip
        readers = [asyncio.create_task(_forward(w, n, queue)) for n, w in enumerate(watches)]
        # A response's events come RESPONSE_STEP a turn: they are applied as one change once
        # every response begun (on either watch) has ended. A transaction on both prefixes
        # is two responses, one per watch, so two changes (imdsd's writer never does that).
        keys: set[str] = set()
        begun: set[int] = set()
        try:
            for n in itertools.count(1):
                which, event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                if event is RESPONSE_END:
                    begun.discard(which)
                    if keys and not begun:
                        await self._changed(keys)
                        keys = set()
                    continue
                begun.add(which)
                keys.add(self._event(event))  # parses the one record it writes
                if n % EVENTS_STEP == 0:  # the guests are served between steps; the
                    await asyncio.sleep(0)  # inventory changes only once, at the end
        finally:
            for reader in readers:
                reader.cancel()

    def _event(self, event: Any) -> str:
        key: str = event.kv.key.decode(errors="replace")
        if event.kind == EventKind.DELETE:
            self._mirror.delete(key)
        else:
            self._mirror.put(key, event.kv.value, event.kv.create_revision)
        self._mirror.revision = max(self._mirror.revision, int(event.kv.mod_revision))
        return key

    async def _changed(self, keys: set[str] | None = None) -> None:
        """Apply the mirror, then cache what changed: the batch's keys (None: everything)."""
        await self._apply()
        try:
            await asyncio.to_thread(self._cache.save, self._mirror, self._clock.now(), keys)
        except OSError as exc:
            log.warning("fleet inventory cache not written", path=str(self._cache.path),
                        error=exc.__class__.__name__)  # fmt: skip


async def _forward(watch: Any, which: int, queue: asyncio.Queue[tuple[int, Any]]) -> None:
    """One watch's events into the shared queue, tagged with `which`; its end or failure as an
    exception."""
    try:
        async for event in watch:
            queue.put_nowait((which, event))
        queue.put_nowait((which, ConnectionError("the watch ended")))
    except Exception as exc:
        queue.put_nowait((which, exc))


def _stopping() -> bool:
    """This task has been asked to stop (a cancellation the etcd client turned into an error
    of its own, or lost, still counts: Task.cancelling())."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
