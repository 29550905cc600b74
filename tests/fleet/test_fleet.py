"""A fleet of hosts on one machine: two daemons (own ports, state and admin sockets) follow one
real etcd over mutual TLS; `imdsd fleet` writes the records; guests are loopback addresses."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.fleet.etcd import Etcd
from tests.helpers import ROLE_A, ROLE_B, host_sections, http
from tests.process import Proc

pytestmark = pytest.mark.slow  # a real etcd and two daemon processes

VM1, VM2 = "i-0f1ee70000000001a", "i-0f1ee70000000002b"
GUEST1, GUEST2 = "127.0.0.61", "127.0.0.62"
CREDENTIALS = "/latest/meta-data/iam/security-credentials/"
POLLING = "[budgets]\nrequests_per_second = 10000\nburst = 10000\n"  # guests that poll hard


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The imdsd command line, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "imdsd", *args],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def fleet(etcd: Etcd, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The fleet CLI, from its own config file."""
    config = etcd.directory / f"fleet{prefix.replace('/', '-')}.toml"
    config.write_text(etcd.section("unused", prefix))
    return cli("fleet", "--config", str(config), *args)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def host(etcd: Etcd, prefix: str, name: str, directory: Path) -> Proc:
    """One hypervisor's daemon, sourcing its inventory from the fleet: its own listener
    address (host-a 127.0.0.1, host-b 127.0.0.2), port, state and admin socket."""
    directory.mkdir(parents=True, exist_ok=True)
    listen = "127.0.0.2" if name == "host-b" else "127.0.0.1"
    config = (f'[imds]\nlisteners = ["{listen}:0"]\n' + host_sections(directory, metrics="")
              + POLLING + etcd.section(name, prefix))  # fmt: skip
    return Proc(directory, config)


def two_hosts(etcd: Etcd, prefix: str, directory: Path) -> tuple[Proc, Proc]:
    return host(etcd, prefix, "host-a", directory / "a"), host(
        etcd, prefix, "host-b", directory / "b"
    )


def restart(proc: Proc) -> Proc:
    proc.stop()
    return Proc(proc.directory, proc.config.read_text())


async def role(url: str, source: str) -> str | None:
    """The role a guest is served (its iam listing), None when it gets 404."""
    reply = await http(url, CREDENTIALS, source=source)
    assert reply.status in (200, 404), reply
    return reply.text if reply.status == 200 else None


async def within(seconds: float, check: Callable[[], Awaitable[bool]]) -> float:
    """Poll until check() holds; returns how long that took (fails past `seconds`)."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def add_vm(etcd: Etcd, prefix: str, on: str, vm: str, address: str) -> None:
    ok(fleet(etcd, prefix, "instances", "add", "--host", on, "--id", vm, "--address", address,
             "--http-tokens", "optional"))  # fmt: skip


def profiles(etcd: Etcd, prefix: str) -> None:
    ok(fleet(etcd, prefix, "profiles", "add", "--name", "web", "--role-arn", ROLE_A))
    ok(fleet(etcd, prefix, "profiles", "add", "--name", "db", "--role-arn", ROLE_B))


async def test_an_instance_is_served_by_its_host_alone_and_follows_a_move(
    etcd: Etcd, prefix: str, tmp_path: Path
) -> None:
    """Associated through `imdsd fleet` on host A: A serves it within 1 s, B does not. Moved
    (removed on A, added on B with the same id): B serves it within 1 s and A refuses it."""
    a, b = two_hosts(etcd, prefix, tmp_path)
    try:
        profiles(etcd, prefix)
        add_vm(etcd, prefix, "host-a", VM1, GUEST1)
        ok(fleet(etcd, prefix, "associate", "--instance", VM1, "--profile", "web"))
        await within(1.0, lambda: _is(role(a.url, GUEST1), "role-a"))
        assert (await http(b.url, CREDENTIALS, source=GUEST1)).status == 404
        ok(fleet(etcd, prefix, "instances", "remove", VM1))
        add_vm(etcd, prefix, "host-b", VM1, GUEST1)
        ok(fleet(etcd, prefix, "associate", "--instance", VM1, "--profile", "web"))
        await within(1.0, lambda: _is(role(b.url, GUEST1), "role-a"))
        assert (await http(a.url, "/latest/meta-data/instance-id", source=GUEST1)).status == 404
        listed = ok(fleet(etcd, prefix, "instances", "list"))
        assert f"{VM1}  {GUEST1}  web" in listed and listed.rstrip().endswith("host-b")
    finally:
        a.stop(), b.stop()


async def _is(value: Awaitable[str | None], expected: str | None) -> bool:
    return await value == expected


async def test_replace_and_disassociate_apply_within_a_second_and_never_go_back(
    etcd: Etcd, prefix: str, tmp_path: Path
) -> None:
    """A guest polling all along sees web, then db (within 1 s of the write), then nothing
    (within 1 s of disassociate): once an answer shows the new role, no later answer shows
    the old one, and the credentials served are the new role's."""
    a = host(etcd, prefix, "host-a", tmp_path / "a")
    seen: list[str | None] = []
    stop = asyncio.Event()

    async def watcher() -> None:
        while not stop.is_set():
            seen.append(await role(a.url, GUEST1))

    try:
        profiles(etcd, prefix)
        add_vm(etcd, prefix, "host-a", VM1, GUEST1)
        ok(fleet(etcd, prefix, "associate", "--instance", VM1, "--profile", "web"))
        await within(1.0, lambda: _is(role(a.url, GUEST1), "role-a"))
        polling = asyncio.create_task(watcher())
        ok(fleet(etcd, prefix, "replace-association", "--instance", VM1, "--profile", "db"))
        await within(1.0, lambda: _is(role(a.url, GUEST1), "role-b"))
        document = await http(a.url, CREDENTIALS + "role-b", source=GUEST1)
        assert document.status == 200 and json.loads(document.body)["Code"] == "Success"
        ok(fleet(etcd, prefix, "disassociate", "--instance", VM1))
        await within(1.0, lambda: _is(role(a.url, GUEST1), None))
        stop.set()
        await polling
        order = [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]
        assert order in (["role-a", "role-b", None], ["role-b", None]), order
    finally:
        a.stop()


async def test_etcd_down_keeps_every_host_serving_and_a_restart_uses_the_cache(
    own_etcd: Etcd, prefix: str, tmp_path: Path
) -> None:
    """etcd stopped: both hosts keep serving, status and metrics say stale; a host restarted
    while etcd is down serves its last known inventory; etcd back: a change made then is
    applied by both without a restart."""
    etcd = own_etcd
    a, b = two_hosts(etcd, prefix, tmp_path)
    try:
        profiles(etcd, prefix)
        add_vm(etcd, prefix, "host-a", VM1, GUEST1)
        add_vm(etcd, prefix, "host-b", VM2, GUEST2)
        for vm in (VM1, VM2):
            ok(fleet(etcd, prefix, "associate", "--instance", vm, "--profile", "web"))
        await within(1.0, lambda: _is(role(b.url, GUEST2), "role-a"))
        etcd.stop()
        a.wait_for("fleet inventory: etcd unreachable; serving the last known inventory")
        assert await role(a.url, GUEST1) == "role-a" and await role(b.url, GUEST2) == "role-a"
        socket = str(tmp_path / "a" / "admin.sock")
        status = json.loads(ok(cli("status", "--json", "--socket", socket)))["inventory"]
        assert status["connected"] is False and status["stale_seconds"] > 0
        b = restart(b)
        assert await role(b.url, GUEST2) == "role-a"  # from the cache: etcd is still down
        etcd.start()
        ok(fleet(etcd, prefix, "replace-association", "--instance", VM1, "--profile", "db"))
        ok(fleet(etcd, prefix, "replace-association", "--instance", VM2, "--profile", "db"))
        await within(15.0, lambda: _is(role(a.url, GUEST1), "role-b"))
        await within(15.0, lambda: _is(role(b.url, GUEST2), "role-b"))
        a.wait_for("fleet inventory in sync with etcd")
    finally:
        a.stop(), b.stop()


async def test_a_malformed_record_is_skipped_with_one_warning(
    etcd: Etcd, prefix: str, tmp_path: Path
) -> None:
    """A record another tool wrote badly is skipped with one warning naming its key; the
    host's other instances are served; the admin socket refuses changes with a pointer to
    `imdsd fleet`; a reload of the file leaves etcd's inventory in place; a state file left from
    a file-sourced past is ignored with one warning."""
    from imdsd.config.inventory import EtcdConfig, endpoint
    from imdsd.fleet.client import open_client

    profiles(etcd, prefix)
    add_vm(etcd, prefix, "host-a", VM1, GUEST1)
    ok(fleet(etcd, prefix, "associate", "--instance", VM1, "--profile", "web"))
    bad = f"{prefix}/hosts/host-a/instances/{VM2}"
    c = etcd.client
    client = open_client(EtcdConfig(endpoints=(endpoint(etcd.url),), ca_file=c.ca,
                                    cert_file=c.cert, key_file=c.key))  # fmt: skip
    await client.connect()
    await client.put(bad.encode(), b'{"addresses": ["127.0.0.62"], "hop_limit": 3}')
    (tmp_path / "a" / "state").mkdir(parents=True)
    (tmp_path / "a" / "state" / "state.json").write_text(
        '{"version": 2}'
    )  # from a file-sourced past
    a = host(etcd, prefix, "host-a", tmp_path / "a")
    try:
        assert await role(a.url, GUEST1) == "role-a"
        assert (await http(a.url, CREDENTIALS, source=GUEST2)).status == 404
        ignored = [e for e in a.events() if str(e.get("event")).startswith("state file ignored")]
        assert len(ignored) == 1
        await client.put(
            f"{prefix}/profiles/other".encode(), b'{"role_arn": "' + ROLE_B.encode() + b'"}'
        )
        await asyncio.sleep(0.3)
        warnings = [e for e in a.events() if e.get("event") == "fleet record skipped"]
        assert [w["record"] for w in warnings] == [bad], warnings
        assert "hop_limit: got an unknown key" in str(warnings[0]["problem"])
        refused = cli(
            "disassociate", "--instance", VM1, "--socket", str(tmp_path / "a" / "admin.sock")
        )
        assert refused.returncode == 1 and "change it with `imdsd fleet`" in refused.stderr
        before = len(a.events())
        a.process.send_signal(signal.SIGHUP)  # the file has no instances: etcd's stay served
        assert a.wait_for("reloaded", after=before)["instances"] == 1
        assert await role(a.url, GUEST1) == "role-a"
    finally:
        a.stop()
        await client.close()


def test_fleet_cli_refuses_what_ec2_refuses(etcd: Etcd, prefix: str) -> None:
    """Each refusal is one line and exit 1: a second association, replacing none, a profile
    in use, an id already on another host, an unknown profile, a record the daemons would
    refuse (with its key path); no etcd at all is exit 4, a bad [inventory.etcd] exit 3;
    --prefix reaches another fleet."""
    profiles(etcd, prefix)
    add_vm(etcd, prefix, "host-a", VM1, GUEST1)
    ok(fleet(etcd, prefix, "associate", "--instance", VM1, "--profile", "web"))
    cases = {
        ("associate", "--instance", VM1, "--profile", "db"): "Conflict: instance i-0f1ee70000000001a already has an association (web)",
        ("replace-association", "--instance", VM2, "--profile", "db"): f"NotFound: instance {VM2} is on no host of the fleet",
        ("profiles", "remove", "web"): "Conflict: instance profile 'web' is associated with i-0f1ee70000000001a",
        ("instances", "add", "--host", "host-b", "--id", VM1, "--address", "127.0.0.99"): "Conflict: instance i-0f1ee70000000001a already exists (on host host-a; remove it there first)",
        ("instances", "add", "--host", "host-a", "--id", VM2, "--address", GUEST1): f"Conflict: address {GUEST1} already belongs to {VM1}",
        ("replace-association", "--instance", VM1, "--profile", "nope"): "NotFound: instance profile 'nope' does not exist",
        ("instances", "add", "--host", "host-a", "--id", VM2, "--address", "127.0.0.99", "--hop-limit", "0"):
            f"InvalidParameterValue: {prefix}/hosts/host-a/instances/{VM2}.metadata_options.hop_limit: got 0; allowed: an integer from 1 to 64",
    }  # fmt: skip
    for args, message in cases.items():
        result = fleet(etcd, prefix, *args)
        assert (result.returncode, result.stderr) == (1, f"imdsd: {message}\n"), args
    ok(fleet(etcd, prefix, "disassociate", "--instance", VM1))
    ok(fleet(etcd, prefix, "profiles", "remove", "web"))
    assert "web" not in ok(fleet(etcd, prefix, "profiles", "list"))
    down = cli("fleet", "--endpoint", "http://127.0.0.1:9", "profiles", "list")
    assert down.returncode == 4 and "etcd unreachable at http://127.0.0.1:9" in down.stderr
    bad = etcd.directory / "bad.toml"
    bad.write_text('[inventory.etcd]\nendpoints = ["etcd:2379"]\n')
    refused = cli("fleet", "--config", str(bad), "profiles", "list")
    assert refused.returncode == 3 and refused.stderr.startswith(
        "imdsd: inventory.etcd.endpoints: got"
    )
    other = fleet(etcd, prefix, "--prefix", prefix + "-elsewhere/", "profiles", "list")
    assert ok(other).strip() == "PROFILE  ROLE  ID"  # an empty fleet under another prefix


def etcdctl(etcd: Etcd, *args: str) -> None:
    c = etcd.client
    subprocess.run([str(etcd.binary("etcdctl")), "--endpoints", etcd.url, "--cacert", str(c.ca),
                    "--cert", str(c.cert), "--key", str(c.key), "--user", "root:root-pw", *args],
                   check=True, capture_output=True, timeout=30)  # fmt: skip


async def test_etcd_rbac_user_and_password_file(
    own_etcd: Etcd, prefix: str, tmp_path: Path
) -> None:
    """With etcd's auth on, a host logs in as `user` with the password read from
    `password_file` and serves its records; the password never reaches its log. The CLI
    shows one instance in full as JSON."""
    etcd = own_etcd
    profiles(etcd, prefix)
    add_vm(etcd, prefix, "host-a", VM1, GUEST1)
    ok(fleet(etcd, prefix, "associate", "--instance", VM1, "--profile", "web"))
    shown = json.loads(ok(fleet(etcd, prefix, "--json", "instances", "show", VM1)))
    assert (shown["host"], shown["profile"], shown["addresses"]) == ("host-a", "web", [GUEST1])
    password = "s3cret-fleet-pw-71"
    (tmp_path / "password").write_text(password + "\n")
    etcdctl(etcd, "user", "add", "root", "--new-user-password=root-pw")
    etcdctl(etcd, "user", "add", "imdsd", f"--new-user-password={password}")
    etcdctl(etcd, "role", "add", "fleet")
    etcdctl(etcd, "role", "grant-permission", "fleet", "--prefix=true", "read", prefix + "/")
    etcdctl(etcd, "user", "grant-role", "imdsd", "fleet")
    etcdctl(etcd, "auth", "enable")
    directory = tmp_path / "a"
    directory.mkdir()
    login = f'user = "imdsd"\npassword_file = "{tmp_path / "password"}"\n'
    a = Proc(directory, '[imds]\nlisteners = ["127.0.0.1:0"]\n' + host_sections(directory, metrics="")
             + etcd.section("host-a", prefix) + login)  # fmt: skip
    try:
        assert await role(a.url, GUEST1) == "role-a"
        assert password not in a.log.read_text()
    finally:
        a.stop()
