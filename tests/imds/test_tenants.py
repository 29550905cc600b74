"""Multi-tenant hosts (issue 18): VMs with the same address told apart by where their traffic
arrives. Each test builds its own hypervisor in network namespaces: the daemon runs in a "host"
namespace; each guest is a namespace of its own joined to it by a veth (a routed tap), or to a
bridge, or to a named tenant namespace; every address is link-local (169.254.0.0/16). Guests
speak raw HTTP from a thread that entered their namespace. Needs root (skipped without)."""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imdsd.cli.client import call as admin
from imdsd.config import parse
from imdsd.errors import ConfigError
from tests.helpers import ROLE_A, ROLE_B, host_sections
from tests.process import Proc

pytestmark = [
    pytest.mark.slow,  # network namespaces, veths and a daemon process per test
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]
MD = "169.254.169.254"
_RUN = itertools.count()
VM1, VM2, VM3 = "i-0a1a1a1a1a1a1a1a1", "i-0b2b2b2b2b2b2b2b2", "i-0c3c3c3c3c3c3c3c3"
VM4, VM5, VM6 = "i-0d4d4d4d4d4d4d4d4", "i-0e5e5e5e5e5e5e5e5", "i-0f6f6f6f6f6f6f6f6"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Hypervisor:
    """Namespaces and links made by one test, and removed after it (deleting a namespace
    deletes the veth ends inside it)."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 10000}{next(_RUN)}"
        self.host = self.ns("hv")
        ip("-n", self.host, "link", "set", "lo", "up")
        ip("-n", self.host, "addr", "add", f"{MD}/32", "dev", "lo")

    def ns(self, name: str) -> str:
        full = f"imdsd-{name}-{self.tag}"
        ip("netns", "add", full)
        self.made = [*getattr(self, "made", []), full]
        return full

    def guest(self, name: str, address: str, *, into: str | None = None,
              bridge: str | None = None, device: str | None = None,
              index: int | None = None) -> str:  # fmt: skip
        """A guest namespace with eth0 at `address`/24, its peer (`device`, default t-NAME) in
        the host namespace (or `into` another), enslaved to `bridge` if given."""
        guest = self.ns(name)
        outer, where = device or f"t{name}{self.tag}"[:15], into or self.host
        numbered = ["index", str(index)] if index is not None else []
        ip("-n", where, "link", "add", outer, *numbered, "type", "veth", "peer", "name", "eth0",
           "netns", guest)  # fmt: skip
        ip("-n", guest, "link", "set", "lo", "up")
        ip("-n", guest, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", guest, "link", "set", "eth0", "up")
        ip("-n", guest, "route", "add", f"{MD}/32", "dev", "eth0")
        if bridge:
            ip("-n", where, "link", "set", outer, "master", bridge)
        else:
            ip("-n", where, "addr", "add", address.rsplit(".", 1)[0] + ".1/24", "dev", outer)
        ip("-n", where, "link", "set", outer, "up")
        return guest

    def bridge(self, name: str, address: str) -> str:
        ip("-n", self.host, "link", "add", name, "type", "bridge")
        ip("-n", self.host, "addr", "add", f"{address}/24", "dev", name)
        ip("-n", self.host, "link", "set", name, "up")
        return name

    def remove(self) -> None:
        for name in reversed(getattr(self, "made", [])):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    made = Hypervisor()
    try:
        yield made
    finally:
        made.remove()


def call(guest: str, method: str, path: str, headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> tuple[int, str]:  # fmt: skip
    """One HTTP request to the metadata address from inside `guest`'s namespace: (status,
    body), or (0, the error) when nothing answers."""
    result: list[tuple[int, str]] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/run/netns/{guest}", "rb") as target:
            assert libc.setns(target.fileno(), 0x40000000) == 0
        lines = [f"{method} {path} HTTP/1.1", f"Host: {MD}", "Connection: close",
                 *(f"{k}: {v}" for k, v in (headers or {}).items()), "", ""]  # fmt: skip
        try:
            with socket.create_connection((MD, 80), timeout=timeout) as sock:
                sock.sendall("\r\n".join(lines).encode())
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError as exc:
            result.append((0, exc.__class__.__name__))
            return
        head, _, body = data.partition(b"\r\n\r\n")
        result.append((int(head.split()[1]), body.decode()))

    thread = threading.Thread(target=run)  # a thread of its own: it never leaves the guest
    thread.start()
    thread.join()
    return result[0]


async def guest_call(guest: str, method: str, path: str, **kw: Any) -> tuple[int, str]:
    return await asyncio.to_thread(call, guest, method, path, **kw)


async def token(guest: str) -> str:
    status, body = await guest_call(guest, "PUT", "/latest/api/token",
                                    headers={"X-aws-ec2-metadata-token-ttl-seconds": "600"})  # fmt: skip
    assert status == 200, body
    return body


async def read(guest: str, path: str, tok: str | None = None) -> tuple[int, str]:
    tok = tok if tok is not None else await token(guest)
    return await guest_call(guest, "GET", path, headers={"X-aws-ec2-metadata-token": tok})


PROFILES = (f'[[instance_profiles]]\nname = "a"\nrole_arn = "{ROLE_A}"\n'
            f'[[instance_profiles]]\nname = "b"\nrole_arn = "{ROLE_B}"\n')  # fmt: skip


def config(imds: str, instances: str, host: str = "") -> str:
    return f'[imds]\nlisteners = ["{MD}:80"]\n{imds}\n{host}{PROFILES}{instances}'


def daemon(directory: Path, hv: Hypervisor, imds: str, instances: str,
           sockets: dict[str, socket.socket] | None = None) -> Proc:  # fmt: skip
    text = config(imds, instances, host_sections(directory, metrics=""))
    return Proc(directory, text, netns=hv.host, until="listening", sockets=sockets)


def instance(iid: str, *, scope: str = "", addresses: str = "", profile: str = "a",
             extra: str = "") -> str:  # fmt: skip
    text = f'[[instances]]\nid = "{iid}"\n{scope}\n'
    if addresses:
        text += f"addresses = [{addresses}]\n"
    text += extra
    return text + f'[[associations]]\ninstance = "{iid}"\nprofile = "{profile}"\n'


def status(proc: Proc) -> dict[str, Any]:
    """The daemon's admin status (over its unix socket, from the test's namespace)."""
    result: dict[str, Any] = admin(proc.directory / "admin.sock", "GET", "/v1/status")
    return result


async def test_same_address_on_two_taps_is_two_instances(hv: Hypervisor, tmp_path: Path) -> None:
    """Two guests both at 169.254.10.2 on two routed taps get their own instance-id, their
    own role's keys and their own tokens: a token minted on one device and replayed from the
    other (same address) is 401; a third device no instance names gets no answer."""
    g1 = hv.guest("g1", "169.254.10.2", device=f"ta{hv.tag}")
    g2 = hv.guest("g2", "169.254.10.2", device=f"tb{hv.tag}")
    g3 = hv.guest("g3", "169.254.10.2", device=f"tc{hv.tag}")
    same = '"169.254.10.2"'
    proc = daemon(tmp_path, hv, "", instance(VM1, scope=f'host_interface = "ta{hv.tag}"', addresses=same)
                  + instance(VM2, scope=f'host_interface = "tb{hv.tag}"', addresses=same, profile="b"))  # fmt: skip
    try:
        assert (await read(g1, "/latest/meta-data/instance-id"))[1] == VM1
        assert (await read(g2, "/latest/meta-data/instance-id"))[1] == VM2
        keys = []
        for guest, role in ((g1, "role-a"), (g2, "role-b")):
            status_, body = await read(guest, f"/latest/meta-data/iam/security-credentials/{role}")
            assert status_ == 200, body
            keys.append(json.loads(body)["AccessKeyId"])
        assert keys[0] != keys[1]
        tok1 = await token(g1)
        assert (await read(g2, "/latest/meta-data/instance-id", tok1))[0] == 401
        assert (await read(g1, "/latest/meta-data/instance-id", tok1))[0] == 200
        nobody = await guest_call(g3, "GET", "/latest/meta-data/instance-id")
        assert nobody[0] in (0, 404)  # no listener on its device: refused, or a stranger
    finally:
        proc.stop()


async def test_a_recreated_tap_is_served_again_within_a_second(
    hv: Hypervisor, tmp_path: Path
) -> None:
    """The guest's tap is deleted: its listener closes, so another device that reuses the
    ifindex (a stranger at the same address) is never answered as that VM. The tap is made
    again (a new ifindex): its listener is rebound and the guest answered within a second;
    status shows the new ifindex."""
    tap = f"ta{hv.tag}"
    g1 = hv.guest("g1", "169.254.11.2", device=tap)
    proc = daemon(tmp_path, hv, "", instance(VM1, scope=f'host_interface = "{tap}"',
                                             addresses='"169.254.11.2"'))  # fmt: skip
    try:
        assert (await read(g1, "/latest/meta-data/instance-id"))[1] == VM1
        before = status(proc)["scoped_listeners"][0]["ifindex"]
        ip("netns", "del", g1)  # its tap goes too
        hv.made.remove(g1)
        while status(proc)["scoped_listeners"]:
            await asyncio.sleep(0.02)
        reuser = hv.guest("x1", "169.254.11.2", device=f"tq{hv.tag}", index=before)
        answer = await guest_call(reuser, "GET", "/latest/meta-data/instance-id")
        assert answer[0] in (0, 404) and VM1 not in answer[1]
        g1 = hv.guest("g1", "169.254.11.2", device=tap)
        started = time.monotonic()
        while (await read(g1, "/latest/meta-data/instance-id"))[1] != VM1:
            assert time.monotonic() - started < 1.0, "not served again within a second"
            await asyncio.sleep(0.05)
        now = status(proc)["scoped_listeners"]
        assert [x["ifindex"] for x in now] != [before] and len(now) == 1
    finally:
        proc.stop()


async def test_a_bridge_tells_its_guests_apart_by_address(hv: Hypervisor, tmp_path: Path) -> None:
    """Two guests on one bridge, each an instance with host_interface = the bridge and its own
    address; and the same address on another device's tap is a third instance."""
    bridge = hv.bridge(f"br{hv.tag}", "169.254.30.1")
    b1 = hv.guest("b1", "169.254.30.2", bridge=bridge)
    b2 = hv.guest("b2", "169.254.30.3", bridge=bridge)
    other = hv.guest("o1", "169.254.30.2", device=f"tz{hv.tag}")
    scope = f'host_interface = "{bridge}"'
    proc = daemon(tmp_path, hv, "", instance(VM1, scope=scope, addresses='"169.254.30.2"')
                  + instance(VM2, scope=scope, addresses='"169.254.30.3"')
                  + instance(VM3, scope=f'host_interface = "tz{hv.tag}"', addresses='"169.254.30.2"'))  # fmt: skip
    try:
        for guest, vm in ((b1, VM1), (b2, VM2), (other, VM3)):
            assert (await read(guest, "/latest/meta-data/instance-id"))[1] == vm
    finally:
        proc.stop()


async def test_namespace_and_unscoped_guests_beside_scoped_ones(
    hv: Hypervisor, tmp_path: Path
) -> None:
    """A guest behind a named tenant namespace is served by a listener opened inside it, with
    the same pipeline (tokens required); an instance without host_interface is served on the
    guest device [imds] guest_devices names, beside a tap-scoped instance; a VM that is its
    whole tap (no addresses) is served whatever address it sends from."""
    tenant = hv.ns("tenant")
    ip("-n", tenant, "link", "set", "lo", "up")
    ip("-n", tenant, "addr", "add", f"{MD}/32", "dev", "lo")
    n1 = hv.guest("n1", "169.254.40.2", into=tenant, device="tn0")
    u1 = hv.guest("u1", "169.254.50.2", device=f"tu{hv.tag}")
    w1 = hv.guest("w1", "169.254.60.2", device=f"tw{hv.tag}")
    whole = 'network_interfaces = [{ mac = "02:00:00:00:60:02", addresses = ["169.254.60.2"] }]\n'
    proc = daemon(tmp_path, hv, f'guest_devices = ["tu{hv.tag}"]',
                  instance(VM4, scope=f'host_netns = "{tenant}"', addresses='"169.254.40.2"')
                  + instance(VM5, addresses='"169.254.50.2"')
                  + instance(VM6, scope=f'host_interface = "tw{hv.tag}"', extra=whole))  # fmt: skip
    try:
        assert (await read(n1, "/latest/meta-data/instance-id"))[1] == VM4
        assert (await guest_call(n1, "GET", "/latest/meta-data/instance-id"))[0] == 401
        assert (await read(u1, "/latest/meta-data/instance-id"))[1] == VM5
        assert (await read(w1, "/latest/meta-data/instance-id"))[1] == VM6
        ip("-n", w1, "addr", "add", "169.254.61.9/24", "dev", "eth0")
        ip("-n", w1, "route", "replace", f"{MD}/32", "dev", "eth0", "src", "169.254.61.9")
        assert (await read(w1, "/latest/meta-data/local-ipv4"))[1] == "169.254.60.2"
        shown = {x.get("namespace") or x.get("device") for x in status(proc)["scoped_listeners"]}
        assert shown == {tenant, f"tu{hv.tag}", f"tw{hv.tag}"}
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("instances", "imds", "path"),
    [
        (
            instance(VM1, addresses='"169.254.1.2"') + instance(VM2, addresses='"169.254.1.2"'),
            "",
            "instances[1].addresses",
        ),
        (
            instance(VM1, scope='host_interface = "tap1"', addresses='"169.254.1.2"')
            + instance(VM2, scope='host_interface = "tap1"', addresses='"169.254.1.2"'),
            "",
            "instances[1].addresses",
        ),
        (
            instance(VM1, scope='host_interface = "tap1"', addresses='"169.254.1.2"')
            + instance(VM2, addresses='"169.254.1.3"'),
            "",
            "imds.guest_devices",
        ),
        (
            instance(VM1, scope='host_netns = "../etc"', addresses='"169.254.1.2"'),
            "",
            "instances[0].host_netns",
        ),
        (
            instance(VM1, scope='host_interface = "tap1"', addresses='"169.254.1.2"'),
            'guest_devices = ["tap1"]',
            "imds.guest_devices",
        ),
    ],
)
def test_check_config_refuses_what_cannot_be_served(instances: str, imds: str, path: str) -> None:
    """Two instances with one address and no scope (or the same scope); a scoped instance
    beside unscoped ones with no guest_devices (the kernel refuses a device-less listener
    beside device-bound ones); a namespace name that is a path; a device both ways."""
    with pytest.raises(ConfigError) as refused:
        parse(config(imds, instances))
    assert path in [p.path for p in refused.value.problems], refused.value.problems


async def test_a_namespace_listener_passed_by_systemd(hv: Hypervisor, tmp_path: Path) -> None:
    """Socket activation (imdsd-netns@.socket): the listener opened inside the tenant
    namespace by someone else and passed as FileDescriptorName=netns-NAME serves that
    namespace's instance; imdsd does not open (or enter) the namespace itself."""
    tenant = hv.ns("tenant")
    ip("-n", tenant, "link", "set", "lo", "up")
    ip("-n", tenant, "addr", "add", f"{MD}/32", "dev", "lo")
    n1 = hv.guest("n1", "169.254.41.2", into=tenant, device="tn0")
    opened: list[socket.socket] = []

    def open_inside() -> None:  # what systemd's NetworkNamespacePath= does for the socket unit
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/run/netns/{tenant}", "rb") as target:
            assert libc.setns(target.fileno(), 0x40000000) == 0
        opened.append(socket.create_server((MD, 80), backlog=64))

    thread = threading.Thread(target=open_inside)
    thread.start()
    thread.join()
    proc = daemon(tmp_path, hv, "", instance(VM4, scope=f'host_netns = "{tenant}"',
                                             addresses='"169.254.41.2"'),
                  sockets={f"netns-{tenant}": opened[0]})  # fmt: skip
    try:
        assert (await read(n1, "/latest/meta-data/instance-id"))[1] == VM4
        (entry,) = status(proc)["scoped_listeners"]
        assert entry["namespace"] == tenant and entry["socket_activated"] is True
    finally:
        proc.stop()
        opened[0].close()


async def test_one_same_address_vms_budget_does_not_throttle_the_other(
    hv: Hypervisor, tmp_path: Path
) -> None:
    """Budgets hold per instance, not per address: the VM on one tap spends its small budget
    (429), while the VM with the same address on the other tap is answered throughout."""
    g1 = hv.guest("g1", "169.254.12.2", device=f"ta{hv.tag}")
    g2 = hv.guest("g2", "169.254.12.2", device=f"tb{hv.tag}")
    same, optional = '"169.254.12.2"', 'metadata_options = { http_tokens = "optional" }\n'
    budgets = f"[budgets.instances.{VM1}]\nrequests_per_second = 1\nburst = 3\n"
    proc = daemon(tmp_path, hv, "",
                  instance(VM1, scope=f'host_interface = "ta{hv.tag}"', addresses=same, extra=optional)
                  + instance(VM2, scope=f'host_interface = "tb{hv.tag}"', addresses=same, extra=optional)
                  + budgets)  # fmt: skip
    try:
        flood = [await guest_call(g1, "GET", "/latest/meta-data/instance-id") for _ in range(8)]
        other = [await guest_call(g2, "GET", "/latest/meta-data/instance-id") for _ in range(8)]
        assert 429 in [code for code, _ in flood]
        assert other == [(200, VM2)] * 8
    finally:
        proc.stop()


async def test_a_namespace_that_appears_later_is_picked_up(hv: Hypervisor, tmp_path: Path) -> None:
    """An instance names a tenant namespace that does not exist yet: "no guest listener yet",
    no error; once the namespace appears (and its guest), it is served within about a second."""
    name = f"imdsd-late-{hv.tag}"
    proc = daemon(tmp_path, hv, "", instance(VM4, scope=f'host_netns = "{name}"',
                                             addresses='"169.254.42.2"'))  # fmt: skip
    try:
        assert status(proc)["scoped_listeners"] == []
        assert "no guest listener yet: not on this host" in {e.get("event") for e in proc.events()}
        ip("netns", "add", name)
        hv.made.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "addr", "add", f"{MD}/32", "dev", "lo")
        n1 = hv.guest("n1", "169.254.42.2", into=name, device="tn0")
        started, ttl = time.monotonic(), {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
        while True:
            code, tok = await guest_call(n1, "PUT", "/latest/api/token", headers=ttl)
            if code == 200 and (await read(n1, "/latest/meta-data/instance-id", tok))[1] == VM4:
                break
            assert time.monotonic() - started < 3.0, "the late namespace was not picked up"
            await asyncio.sleep(0.1)
    finally:
        proc.stop()
