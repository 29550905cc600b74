"""The follower's load reads the profiles and this host's records as of one revision, and its
watch goes on from the next one: etcd moving on in the middle of a load is neither lost nor
replayed over the newer state."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from imdsd.clock import SystemClock
from imdsd.config.inventory import EtcdConfig, endpoint
from imdsd.fleet.cache import Cache
from imdsd.fleet.client import Client, open_client
from imdsd.fleet.follower import Follower
from imdsd.fleet.records import Layout, Mirror
from tests.fleet.etcd import Etcd

VM1 = "i-0c0aac7000000001a"
WEB = b'{"role_arn": "arn:aws:iam::123456789012:role/web"}'
DB = b'{"role_arn": "arn:aws:iam::123456789012:role/db"}'
READS = ("get", "get_prefix", "get_range", "transaction", "snapshot")


@dataclass
class MovesOnAfterFirstRead:
    """Fault injection, not a stand-in: the follower's real client, except that right after
    its first read returns (and before the follower can make another call) a second real
    client writes to etcd. With two reads in a load this lands between them; with one, between
    the load and the watch. Every other call goes straight to the real client."""

    client: Client
    writes: Callable[[], Awaitable[None]]
    done: bool = False

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.client, name)
        if name not in READS or self.done:
            return real

        async def read(*args: Any, **kwargs: Any) -> Any:
            result = await real(*args, **kwargs)
            if not self.done:
                self.done = True
                await self.writes()
            return result

        return read


async def test_a_write_during_the_load_is_applied_once_and_in_order(
    etcd: Etcd, prefix: str, tmp_path: Path
) -> None:
    """etcd holds VM1 at 10.0.0.1, associated with profile web. Right after the follower's
    first read, VM1 moves to 10.0.0.2 then 10.0.0.3, profile db is created and VM1's
    association switches to db. The first state applied is etcd's state at one revision (VM1
    at 10.0.0.1 with web; before, profiles from before the writes and the host's records from
    after: an association to an unknown profile, so VM1 served with no role, a state etcd never
    had, and a false warning). Then every write is applied, none lost, and no older address is
    ever applied over a newer one (the watch starts after the loaded revision, not before it)."""
    c = etcd.client
    config = EtcdConfig(endpoints=(endpoint(etcd.url),), prefix=prefix, host="host-a",
                        ca_file=c.ca, cert_file=c.cert, key_file=c.key)  # fmt: skip
    layout = Layout(prefix, "host-a")
    writer = open_client(config)
    await writer.put(layout.profile("web").encode(), WEB)
    await writer.put(layout.instance(VM1).encode(), _addresses("10.0.0.1"))
    loaded = await writer.put(layout.association(VM1).encode(), b'{"profile": "web"}')
    last: list[int] = []

    async def writes() -> None:
        await writer.put(layout.instance(VM1).encode(), _addresses("10.0.0.2"))
        await writer.put(layout.instance(VM1).encode(), _addresses("10.0.0.3"))
        await writer.put(layout.profile("db").encode(), DB)
        done = await writer.put(layout.association(VM1).encode(), b'{"profile": "db"}')
        last.append(int(done.header.revision))

    mirror = Mirror(layout)
    applied: list[tuple[list[str], list[tuple[str, str]], int]] = []

    at_load: list[str] = []  # what was logged up to the first state applied

    async def apply() -> None:
        if not applied:
            at_load.extend(e["event"] for e in logs)
        instances, _, associations = mirror.baseline()
        applied.append(([str(a) for i in instances for a in i.addresses], associations,
                        mirror.revision))  # fmt: skip

    class Overtaken(Follower):
        async def _follow(self, client: Client) -> None:
            await super()._follow(MovesOnAfterFirstRead(client, writes))  # type: ignore[arg-type]

    follower = Overtaken(config, mirror, Cache(tmp_path, layout), apply, SystemClock(),
                         stale_since=datetime.now(UTC))  # fmt: skip
    with capture_logs() as logs:
        task = asyncio.create_task(follower.run())
        try:
            for _ in range(500):  # 10 s at most
                if applied and last and applied[-1][2] == last[0]:
                    break
                await asyncio.sleep(0.02)
        finally:
            task.cancel()
            await writer.close()
    assert applied[0] == (["10.0.0.1"], [(VM1, "web")], int(loaded.header.revision))
    assert applied[-1][:2] == (["10.0.0.3"], [(VM1, "db")])
    seen = [a[0][0] for a in applied]
    assert seen == sorted(seen), f"an older address applied over a newer one: {seen}"
    assert "fleet association to an unknown profile skipped" not in at_load


def _addresses(address: str) -> bytes:
    return b'{"addresses": ["%s"]}' % address.encode()
