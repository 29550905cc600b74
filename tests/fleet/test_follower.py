"""The follower against a real etcd, where a test must steer the timing: a compaction that
lands between the load and the watch."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from imdsd.clock import SystemClock
from imdsd.config.inventory import EtcdConfig, endpoint
from imdsd.fleet.cache import Cache
from imdsd.fleet.client import open_client
from imdsd.fleet.follower import Follower
from imdsd.fleet.records import Layout, Mirror
from imdsd.fleet.source import stopped
from tests.fleet.etcd import Etcd

VM1 = "i-0c0aac7000000001a"


async def test_a_compacted_watch_reloads_and_stays_correct(
    etcd: Etcd, prefix: str, tmp_path: Path
) -> None:
    """etcd moves on and compacts past the revision the follower loaded before its watch
    starts: the watch fails with a compaction, the follower reloads (one info line), and the
    records written meanwhile are applied and cached."""
    c = etcd.client
    config = EtcdConfig(endpoints=(endpoint(etcd.url),), prefix=prefix, host="host-a",
                        ca_file=c.ca, cert_file=c.cert, key_file=c.key)  # fmt: skip
    layout = Layout(prefix, "host-a")
    mirror, cache = Mirror(layout), Cache(tmp_path, layout)
    writer = open_client(config)
    await writer.connect()

    async def apply() -> None:
        pass

    class Overtaken(Follower):
        moved_on = False

        async def _load(self, client: Any) -> int:
            revision = await super()._load(client)
            if not self.moved_on:  # between this load and the watch, etcd moves on and compacts
                self.moved_on = True
                await writer.put(
                    layout.profile("web").encode(),
                    b'{"role_arn": "arn:aws:iam::123456789012:role/web"}',
                )
                done = await writer.put(
                    layout.instance(VM1).encode(), b'{"addresses": ["10.0.0.1"]}'
                )
                await writer.compact(done.header.revision)
            return int(revision)

    follower = Overtaken(config, mirror, cache, apply, SystemClock(), stale_since=datetime.now(UTC))
    with capture_logs() as logs:
        task = asyncio.create_task(follower.run())
        try:
            # The reload is done when its state is cached too (the last step of a change):
            # the mirror alone has it a moment earlier.
            for _ in range(250):
                if [i.id for i in mirror.baseline()[0]] == [VM1] and _cached(cache, VM1):
                    break
                await asyncio.sleep(0.02)
            assert [i.id for i in mirror.baseline()[0]] == [VM1]
        finally:
            task.cancel()
            await writer.close()
    assert [e["event"] for e in logs].count(
        "fleet inventory: watch revision compacted; reloading"
    ) == 1
    cached = cache.load()
    assert cached is not None and layout.instance(VM1) in cached[0]
    assert follower.status()["connected"] is True and follower.status()["stale_seconds"] == 0


def _cached(cache: Cache, iid: str) -> bool:
    found = cache.load()
    return found is not None and cache.layout.instance(iid) in found[0]


def test_status_reaches_the_metrics_and_stale_time_grows_while_disconnected(
    tmp_path: Path,
) -> None:
    """The etcd source's gauges: connected 0/1 and the seconds since the inventory was last
    known to match etcd (growing from the moment it was lost; 0 while watching)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from imdsd.metrics import Metrics
    from tests.fakes import FakeClock

    clock = FakeClock()
    layout = Layout("/imdsd", "h1")
    follower = Follower(EtcdConfig(), Mirror(layout), Cache(tmp_path, layout), _nothing, clock,
                        stale_since=clock.now())  # fmt: skip
    metrics = Metrics()
    metrics.watch_source(follower.status)

    def gauges() -> dict[str, float]:
        text = generate_latest(metrics.registry).decode()
        return {f.name: f.samples[0].value for f in text_string_to_metric_families(text)
                if f.name.startswith("imdsd_inventory")}  # fmt: skip

    clock.advance(timedelta(seconds=42))
    assert gauges() == {"imdsd_inventory_connected": 0.0, "imdsd_inventory_stale_seconds": 42.0}
    follower.connected, follower.stale_since = True, None
    assert gauges() == {"imdsd_inventory_connected": 1.0, "imdsd_inventory_stale_seconds": 0.0}


async def _nothing() -> None:
    pass


def test_an_unreadable_or_foreign_cache_is_ignored(tmp_path: Path) -> None:
    """A cache that is torn, or written for another prefix or host, is not served: a torn
    one with one warning (a cold start from etcd), a foreign one silently."""
    layout = Layout("/imdsd", "h1")
    cache = Cache(tmp_path, layout)
    mirror = Mirror(layout)
    mirror.put(layout.instance(VM1), b'{"addresses": ["10.0.0.1"]}', 3)
    cache.save(mirror, datetime.now(UTC))
    assert cache.load() is not None
    assert Cache(tmp_path, Layout("/imdsd", "h2")).load() is None
    cache.path.write_bytes(cache.path.read_bytes()[:-9])
    with capture_logs() as logs:
        assert cache.load() is None
    assert [e["event"] for e in logs] == ["fleet inventory cache unreadable; ignored"]


async def test_a_stop_the_etcd_client_reports_as_its_error_still_stops(
    etcd: Etcd, prefix: str, tmp_path: Path
) -> None:
    """aetcd can turn a cancellation into an error of its own (a cancelled gRPC call): the
    follower must take it as the stop it is, and end, not log etcd as lost and reconnect
    (the daemon's stop would wait on it). The conversion is injected: a real client does it
    only when the cancellation lands inside a call."""
    import aetcd

    c = etcd.client
    config = EtcdConfig(endpoints=(endpoint(etcd.url),), prefix=prefix, host="host-a",
                        ca_file=c.ca, cert_file=c.cert, key_file=c.key)  # fmt: skip
    layout = Layout(prefix, "host-a")
    inside = asyncio.Event()

    class Converting(Follower):
        async def _follow(self, client: Any) -> None:
            await client.connect()
            inside.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise aetcd.InternalError("cancelled") from None

    follower = Converting(config, Mirror(layout), Cache(tmp_path, layout), _nothing,
                          SystemClock(), stale_since=datetime.now(UTC))  # fmt: skip
    with capture_logs() as logs:
        task = asyncio.create_task(follower.run())
        await asyncio.wait_for(inside.wait(), 10)
        task.cancel()
        await asyncio.wait({task}, timeout=5)
    assert task.cancelled()
    assert not [e for e in logs if "unreachable" in e["event"]]


async def test_stopping_a_follower_that_lost_its_cancellation() -> None:
    """A follower that swallowed one cancellation (Python 3.11's wait_for inside aetcd can)
    is cancelled again until it ends: a stop never waits on it for ever. An error it ends with
    is not hidden."""
    swallowed = 0

    async def deaf() -> None:
        nonlocal swallowed
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed += 1  # lost, as in the race
        await asyncio.Event().wait()

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    await asyncio.wait_for(stopped(task), 5)
    assert task.cancelled() and swallowed == 1

    async def failing() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("closing failed") from None

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await stopped(task)


async def test_a_transaction_arrives_as_one_change_however_it_is_paced(
    etcd: Etcd, prefix: str, tmp_path: Path
) -> None:
    """A transaction of more than 2 x RESPONSE_STEP records (etcd allows 128 operations), which
    aetcd now hands over RESPONSE_STEP a turn: the follower applies it as one change, with
    every record of it in the mirror ("what arrived together is applied together")."""
    from imdsd.fleet.client import RESPONSE_STEP

    count = 2 * RESPONSE_STEP + 20
    c = etcd.client
    config = EtcdConfig(endpoints=(endpoint(etcd.url),), prefix=prefix, host="host-a",
                        ca_file=c.ca, cert_file=c.cert, key_file=c.key)  # fmt: skip
    layout = Layout(prefix, "host-a")
    mirror = Mirror(layout)
    seen: list[int] = []  # instances in the mirror at each change applied

    async def apply() -> None:
        seen.append(len(mirror.baseline()[0]))

    follower = Follower(config, mirror, Cache(tmp_path, layout), apply, SystemClock(),
                        stale_since=datetime.now(UTC))  # fmt: skip
    writer = open_client(config)
    await writer.connect()
    task = asyncio.create_task(follower.run())
    try:
        await asyncio.wait_for(follower.synced.wait(), 10)
        vm = [f"i-{n:017x}" for n in range(count)]
        ops = [writer.transactions.put(layout.instance(i).encode(), b'{"addresses": ["10.9.0.1"]}')
               for i in vm[:1]]  # fmt: skip
        ops += [writer.transactions.put(layout.instance(i).encode(),
                                        f'{{"addresses": ["10.8.{n // 250}.{n % 250 + 1}"]}}'.encode())
                for n, i in enumerate(vm[1:], 1)]  # fmt: skip
        await writer.transaction(compare=[], success=ops, failure=[])
        for _ in range(250):
            if len(seen) > 1:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # a second, partial change would have come by now
    finally:
        await stopped(task)
        await writer.close()
    assert seen == [0, count]
