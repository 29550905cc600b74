"""Invariant 9: who-is-who never waits. An etcd watch batch takes effect before the next guest
request is read, whatever the upstream is doing; the sessions it needs are issued behind it.
The upstream here accepts every AssumeRole and never answers (10 s timeout)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from imdsd.config.inventory import EtcdConfig, endpoint
from imdsd.fleet.client import open_client
from imdsd.fleet.records import Layout
from tests.fakes import StalledUpstream, sts_backend
from tests.fleet.etcd import Etcd
from tests.fleet.test_fleet import (
    CREDENTIALS,
    POLLING,
    add_vm,
    fleet,
    host,
    ok,
    profiles,
    role,
    within,
)
from tests.helpers import ROLE_A, host_sections, http
from tests.process import Proc

pytestmark = pytest.mark.slow  # a real etcd, 10,000 records, daemon processes

VM_A, VM_B, VM_C = "i-0a000000000000a1a", "i-0b000000000000b2b", "i-0c000000000000c3c"
GUEST_A, GUEST_C = "127.0.0.71", "127.0.0.73"
COLD_START = 10_000
OPTIONAL = {"http_tokens": "optional"}


def stalled_host(etcd: Etcd, prefix: str, directory: Path, upstream: str, extra: str = "") -> str:
    directory.mkdir(parents=True, exist_ok=True)
    return ('[imds]\nlisteners = ["127.0.0.1:0"]\n' + host_sections(directory, metrics="")
            + POLLING + etcd.section("host-a", prefix) + sts_backend(upstream) + extra)  # fmt: skip


async def test_an_address_handed_to_a_new_vm_is_the_new_vm_within_a_second(
    etcd: Etcd, prefix: str, tmp_path: Path, stalled: StalledUpstream, host_keys: None
) -> None:
    """Invariant 9 (and 1): with C's new association hanging on the upstream, A is removed and
    B added with A's address: within a second of the write, that address is B (instance-id,
    identity document) and its iam/ is B's (no association: 404), never A's role."""
    config = stalled_host(etcd, prefix, tmp_path / "a", stalled.url)
    daemon = await asyncio.to_thread(Proc, tmp_path / "a", config)
    try:
        profiles(etcd, prefix)
        add_vm(etcd, prefix, "host-a", VM_A, GUEST_A)
        add_vm(etcd, prefix, "host-a", VM_C, GUEST_C)
        ok(fleet(etcd, prefix, "associate", "--instance", VM_A, "--profile", "web"))
        await within(
            15.0, lambda: _is(role(daemon.url, GUEST_A), "role-a")
        )  # set-up, not the property
        ok(fleet(etcd, prefix, "associate", "--instance", VM_C, "--profile", "db"))  # hangs
        ok(fleet(etcd, prefix, "instances", "remove", VM_A))
        add_vm(etcd, prefix, "host-a", VM_B, GUEST_A)
        await within(1.0, lambda: _is(_text(daemon.url, "/latest/meta-data/instance-id"), VM_B))
        document = await http(daemon.url, "/latest/dynamic/instance-identity/document",
                              source=GUEST_A)  # fmt: skip
        assert json.loads(document.body)["instanceId"] == VM_B
        assert await role(daemon.url, GUEST_A) is None
        assert stalled.calls >= 2  # A's and C's issues really are hanging on the upstream
    finally:
        daemon.stop()


async def test_one_transaction_hands_an_address_over_and_replaces_every_association(
    etcd: Etcd, prefix: str, tmp_path: Path
) -> None:
    """One transaction removes A, adds B with A's address and replaces 110 associations (more
    keys than one reconcile step, scheduler.RECONCILE_STEP, so their sessions are reconciled
    in steps behind the change; the embedded issuer answers at once): within a second the
    address is B's with no role, every one of the 110 guests is listed its new role, and each
    gets that role's credentials (Code Success); none is left on the old one."""
    from imdsd.scheduler import RECONCILE_STEP

    count = RECONCILE_STEP + 10  # 3 + count operations: etcd allows 128 in one transaction
    daemon = await asyncio.to_thread(host, etcd, prefix, "host-a", tmp_path / "a")
    layout = Layout(prefix, "host-a")
    writer = _writer(etcd, prefix)
    try:
        await writer.connect()
        profiles(etcd, prefix)
        records = {layout.instance(VM_A): {"addresses": [GUEST_A], "metadata_options": OPTIONAL},
                   layout.association(VM_A): {"profile": "web"}}  # fmt: skip
        for n in range(count):
            records[layout.instance(_vm(n))] = {"addresses": [_address(n)],
                                                "metadata_options": OPTIONAL}  # fmt: skip
            records[layout.association(_vm(n))] = {"profile": "web"}
        for key, value in records.items():
            await writer.put(key.encode(), json.dumps(value).encode())
        await within(15.0, lambda: _is(role(daemon.url, _address(count - 1)), "role-a"))
        t = writer.transactions
        moved = json.dumps({"addresses": [GUEST_A], "metadata_options": OPTIONAL}).encode()
        ops = [t.delete(layout.instance(VM_A).encode()),
               t.delete(layout.association(VM_A).encode()),
               t.put(layout.instance(VM_B).encode(), moved)]  # fmt: skip
        ops += [t.put(layout.association(_vm(n)).encode(), b'{"profile": "db"}')
                for n in range(count)]  # fmt: skip
        await writer.transaction(compare=[], success=ops, failure=[])
        await within(1.0, lambda: _is(_text(daemon.url, "/latest/meta-data/instance-id"), VM_B))
        assert await role(daemon.url, GUEST_A) is None

        async def all_served_role_b() -> bool:
            codes = await asyncio.gather(*(_code(daemon.url, _address(n), "role-b")
                                           for n in range(count)))  # fmt: skip
            return set(codes) == {"Success"}

        await within(5.0, all_served_role_b)
        roles = await asyncio.gather(*(role(daemon.url, _address(n)) for n in range(count)))
        assert set(roles) == {"role-b"}
    finally:
        await writer.close()
        daemon.stop()


async def _code(url: str, source: str, name: str) -> str | None:
    """The Code of the credentials a guest is served for role `name` (None: not 200)."""
    reply = await http(url, CREDENTIALS + name, source=source)
    return json.loads(reply.body)["Code"] if reply.status == 200 else None


async def test_a_cold_start_follows_etcd_before_priming_ends(
    etcd: Etcd, prefix: str, tmp_path: Path, stalled: StalledUpstream, host_keys: None
) -> None:
    """Invariant 8 and 9: a cold start (no fleet-inventory.json) of 10,000 associations with
    the upstream stalled: the watch is open and `status` says connected while priming still
    waits on the upstream (before READY), and nothing says etcd was not reached."""
    await _write_fleet(etcd, prefix, COLD_START)
    extra = '[rotation]\nstartup_deadline = "60s"\n'
    config = stalled_host(etcd, prefix, tmp_path / "a", stalled.url, extra)
    daemon = await asyncio.to_thread(Proc, tmp_path / "a", config, until="listening")
    try:
        socket = tmp_path / "a" / "admin.sock"
        status: dict[str, Any] = {}
        for _ in range(600):
            status = await _status(socket)
            if status.get("inventory", {}).get("connected"):
                break
            await asyncio.sleep(0.05)
        assert status["inventory"]["connected"] is True, status
        assert status["associations"] == {"etcd": COLD_START}
        events = {e.get("event") for e in daemon.events()}
        assert "ready" not in events  # priming is still waiting on the upstream
        assert "fleet inventory: etcd not reached at start" not in events
        reply = await http(daemon.url, "/latest/meta-data/instance-id",
                           source=_address(COLD_START - 1))  # fmt: skip
        assert reply.text == _vm(COLD_START - 1)
    finally:
        daemon.stop()


def _address(n: int) -> str:
    return f"127.1.{n // 250}.{1 + n % 250}"


def _vm(n: int) -> str:
    return f"i-{n + 1:017x}"


def _writer(etcd: Etcd, prefix: str) -> Any:
    """An etcd client of the test's own, writing host-a's records straight to etcd (the fleet
    CLI writes one record per call: too slow for ten thousand, and never a transaction)."""
    c = etcd.client
    config = EtcdConfig(endpoints=(endpoint(etcd.url),), prefix=prefix, host="host-a",
                        ca_file=c.ca, cert_file=c.cert, key_file=c.key)  # fmt: skip
    return open_client(config)


async def _write_fleet(etcd: Etcd, prefix: str, count: int) -> None:
    """`count` instances of host-a, each associated with one profile."""
    layout = Layout(prefix, "host-a")
    writer = _writer(etcd, prefix)
    await writer.connect()
    records: dict[str, object] = {layout.profile("web"): {"role_arn": ROLE_A}}
    for n in range(count):
        records[layout.instance(_vm(n))] = {
            "addresses": [_address(n)],
            "metadata_options": OPTIONAL,
        }
        records[layout.association(_vm(n))] = {"profile": "web"}
    items = list(records.items())
    try:
        for start in range(0, len(items), 500):
            await asyncio.gather(*(writer.put(k.encode(), json.dumps(v).encode())
                                   for k, v in items[start:start + 500]))  # fmt: skip
    finally:
        await writer.close()


async def _status(socket: Path) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as client,
        client.get("http://imdsd/v1/status") as reply,
    ):
        return await reply.json()  # type: ignore[no-any-return]


async def _text(url: str, path: str) -> str:
    return (await http(url, path, source=GUEST_A)).text


async def _is(value: Any, expected: object) -> bool:
    return bool(await value == expected)
