"""Every admin verb through the real CLI (a separate process) against a running daemon, and
EC2's ordering guarantees: when a call returns, its effect is what the guests see."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from imdsd.backends.base import Backend
from imdsd.config import parse
from imdsd.daemon import Daemon, running
from imdsd.errors import BackendError
from imdsd.state import Overrides, StateFile
from tests.fakes import FakeClock, FlakyBackend, wrapping
from tests.helpers import ROLE_B, VM_A, VM_B, VM_D, config_text, http, make_config, token_for

CREDS = "/latest/meta-data/iam/security-credentials/"


@pytest.fixture
async def daemon(clock: FakeClock) -> AsyncIterator[Daemon]:
    async with running(make_config(), clock) as d:
        yield d


async def cli(daemon: Daemon | Path, *args: str) -> tuple[int, str, str]:
    """`python -m imdsd ARGS --socket S`, run while this loop keeps serving."""
    socket = daemon if isinstance(daemon, Path) else daemon.admin_socket
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imdsd", *args, "--socket", str(socket),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def ok_json(daemon: Daemon, *args: str) -> Any:
    code, out, err = await cli(daemon, *args, "--json")
    assert code == 0, err
    return json.loads(out)


async def test_lists_and_status(daemon: Daemon) -> None:
    """status, instances list/show, profiles list, sessions list: tables and --json."""
    status = await ok_json(daemon, "status")
    assert status["instances"] == {"config": 4} and status["sessions"] == {"fresh": 2}
    code, table, _ = await cli(daemon, "instances", "list")
    assert code == 0 and table.splitlines()[0].split() == [
        "INSTANCE",
        "ADDRESSES",
        "PROFILE",
        "TOKENS",
        "HOPS",
        "ENDPOINT",
        "SOURCE",
    ]
    assert f"{VM_B}  127.0.0.3,::1" in table
    shown = await ok_json(daemon, "instances", "show", VM_A)
    assert shown["profile"] == "profile-a" and shown["source"] == "config"
    profiles = await ok_json(daemon, "profiles", "list")
    assert [p["name"] for p in profiles] == ["profile-a", "profile-b"]
    code, sessions, _ = await cli(daemon, "sessions", "list")
    assert code == 0 and "****" in sessions and "fresh" in sessions
    entry = daemon.sessions.get(VM_A)
    assert entry is not None and entry.session.secret_access_key not in sessions + table
    assert entry.session.access_key_id not in sessions


async def test_add_instance_is_served_at_once_and_refusals_exit_1(daemon: Daemon) -> None:
    """instances add: the new VM is answered on its next request; a taken address, an existing
    id or a bad value is refused with exit status 1 and one line each."""
    code, _, err = await cli(daemon, "instances", "add", "--id", "i-12345678", "--address", "127.0.0.6",
                             "--region", "eu-north-1", "--http-tokens", "optional")  # fmt: skip
    assert code == 0, err
    reply = await http(daemon.urls[0], "/latest/meta-data/placement/region", source="127.0.0.6")
    assert (reply.status, reply.text) == (200, "eu-north-1")
    for args, message in [
        (
            ("--id", "i-87654321", "--address", "127.0.0.2"),
            "Conflict: address 127.0.0.2 already belongs to",
        ),
        (
            ("--id", "i-12345678", "--address", "127.0.0.7"),
            "Conflict: instance i-12345678 already exists",
        ),
        (("--id", "vm-1", "--address", "127.0.0.8"), 'InvalidParameter: instance.id: got "vm-1"'),
        (
            ("--id", "i-11111111", "--address", "127.0.0.9", "--hop-limit", "99"),
            "metadata_options.hop_limit: got 99",
        ),
    ]:
        code, _, err = await cli(daemon, "instances", "add", *args)
        assert code == 1 and message in err, err


async def test_associate_serves_a_session_before_returning(daemon: Daemon) -> None:
    """associate: when the command returns, the instance's iam/ tree serves credentials; a
    second associate is refused (exit 1)."""
    assert (await http(daemon.urls[0], "/latest/meta-data/iam/", source="127.0.0.5")).status == 404
    view = await ok_json(daemon, "associate", "--instance", VM_D, "--profile", "profile-b")
    assert view["state"] == "fresh"
    doc = json.loads((await http(daemon.urls[0], CREDS + "role-b", source="127.0.0.5")).body)
    assert doc["Code"] == "Success" and doc["AccessKeyId"].startswith("ASIA")
    code, _, err = await cli(daemon, "associate", "--instance", VM_D, "--profile", "profile-a")
    assert code == 1 and "already has an association (profile-b)" in err


async def test_replace_and_disassociate(daemon: Daemon) -> None:
    """replace-association: the new role is served and the old role's path is 404 when the
    command returns; disassociate: iam/ is gone and the session is dropped."""
    await ok_json(daemon, "replace-association", "--instance", VM_A, "--profile", "profile-b")
    url = daemon.urls[0]
    assert (await http(url, CREDS, source="127.0.0.2")).text == "role-b"
    assert (await http(url, CREDS + "role-a", source="127.0.0.2")).status == 404
    entry = daemon.sessions.get(VM_A)
    assert entry is not None and entry.role_arn == ROLE_B
    code, out, _ = await cli(daemon, "disassociate", "--instance", VM_A)
    assert (code, out.strip()) == (0, f"disassociated {VM_A}")
    assert (await http(url, "/latest/meta-data/iam/", source="127.0.0.2")).status == 404
    assert daemon.sessions.get(VM_A) is None
    code, _, err = await cli(daemon, "disassociate", "--instance", VM_A)
    assert code == 1 and "has no association" in err


async def test_remove_instance_forgets_it_and_its_session(daemon: Daemon) -> None:
    """instances remove: its address becomes a stranger (404) and its session is gone."""
    code, _, err = await cli(daemon, "instances", "remove", VM_A)
    assert code == 0, err
    assert (
        await http(daemon.urls[0], "/latest/meta-data/instance-id", source="127.0.0.2")
    ).status == 404
    assert daemon.sessions.get(VM_A) is None
    code, _, err = await cli(daemon, "instances", "show", VM_A)
    assert code == 1 and f"NotFound: instance {VM_A} does not exist" in err


async def test_modified_metadata_options_apply_to_the_next_request(daemon: Daemon) -> None:
    """modify-instance-metadata-options (EC2's ModifyInstanceMetadataOptions): next request."""
    url = daemon.urls[0]
    assert (await http(url, "/latest/meta-data/instance-id", source="127.0.0.2")).status == 200
    await ok_json(
        daemon, "modify-instance-metadata-options", "--instance", VM_A, "--http-tokens", "required"
    )
    assert (await http(url, "/latest/meta-data/instance-id", source="127.0.0.2")).status == 401
    token = await token_for(url, "127.0.0.2")
    reply = await http(
        url,
        "/latest/meta-data/instance-id",
        source="127.0.0.2",
        headers={"X-aws-ec2-metadata-token": token},
    )
    assert reply.text == VM_A
    await ok_json(
        daemon,
        "modify-instance-metadata-options",
        "--instance",
        VM_A,
        "--http-endpoint",
        "disabled",
    )
    assert (await http(url, "/latest/meta-data/instance-id", source="127.0.0.2")).status == 403
    shown = await ok_json(daemon, "instances", "show", VM_A)
    assert shown["source"] == "modified" and shown["metadata_options"]["http_tokens"] == "required"


async def test_rotate_now(daemon: Daemon) -> None:
    """rotate: a new session before the command returns; refused without an association."""
    before = daemon.sessions.get(VM_A)
    view = await ok_json(daemon, "rotate", "--instance", VM_A)
    after = daemon.sessions.get(VM_A)
    assert (
        before is not None
        and after is not None
        and after.session.access_key_id != before.session.access_key_id
    )
    assert view["access_key"] == "****" + after.session.access_key_id[-4:]
    code, _, err = await cli(daemon, "rotate", "--instance", VM_D)
    assert code == 1 and "no association" in err


async def test_no_daemon_exits_4(tmp_path: Path) -> None:
    """Every verb reports a missing daemon in one line with exit status 4."""
    code, out, err = await cli(tmp_path / "nothing.sock", "status")
    assert (
        (code, out) == (4, "")
        and err.startswith("imdsd: no imdsd daemon answers on")
        and len(err.splitlines()) == 1
    )


async def test_changes_survive_a_restart(clock: FakeClock) -> None:
    """Invariant 6: what the CLI changed is there after the daemon restarts on the same config."""
    config = make_config()
    async with running(config, clock) as first:
        await ok_json(
            first,
            "instances",
            "add",
            "--id",
            "i-22222222",
            "--address",
            "127.0.0.20",
            "--http-tokens",
            "optional",
        )
        await ok_json(first, "associate", "--instance", "i-22222222", "--profile", "profile-a")
        await ok_json(first, "disassociate", "--instance", VM_B)
    async with running(config, clock) as second:
        status = await ok_json(second, "status")
        assert status["instances"] == {"config": 4, "runtime": 1}
        assert status["associations"] == {"config": 1, "runtime": 1}
        reply = await http(second.urls[0], CREDS, source="127.0.0.20")
        assert reply.text == "role-a"
        assert second.inventory.association(VM_B) is None


DOMAIN_XML = """<domain type="kvm"><name>web-1</name>
  <metadata>
    <imdsd:instance xmlns:imdsd="https://github.com/imdsd/imdsd/1" id="i-0feedfeedfeedfeed"
                    profile="profile-a" http-tokens="optional">
      <imdsd:address>127.0.0.30</imdsd:address>
      <imdsd:public-key>{key}</imdsd:public-key>
    </imdsd:instance>
  </metadata>
  <devices><interface type="network"><mac address="52:54:00:AB:CD:EF"/></interface></devices>
</domain>"""
HOOK_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKo3w7NPk/WVpdfeHQxxCs0oDHhy2zVSNa8vcTa4Khvx ops"


async def test_libvirt_hook_registers_and_forgets(daemon: Daemon) -> None:
    """config/libvirt-hook-qemu, called as libvirt calls it: on `started` the VM is registered
    with its profile, its NIC's MAC and its SSH keys, and served; on `release` it is
    forgotten."""
    hook = Path(__file__).parents[2] / "config" / "libvirt-hook-qemu"
    env = {**os.environ, "IMDSD": str(Path(sys.executable).with_name("imdsd")),
           "IMDSD_ADMIN_SOCKET": str(daemon.admin_socket)}  # fmt: skip

    async def call(operation: str) -> int:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(hook), "web-1", operation, "begin", "-", env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        xml = DOMAIN_XML.format(key=HOOK_KEY).encode()
        _, err = await asyncio.wait_for(process.communicate(xml), 60)
        assert process.returncode == 0, err.decode()
        return process.returncode

    await call("started")
    reply = await http(daemon.urls[0], CREDS, source="127.0.0.30")
    assert (reply.status, reply.text) == (200, "role-a")
    mac = await http(daemon.urls[0], "/latest/meta-data/mac", source="127.0.0.30")
    key = await http(daemon.urls[0], "/latest/meta-data/public-keys/0/openssh-key",
                     source="127.0.0.30")  # fmt: skip
    assert (mac.text, key.text) == ("52:54:00:ab:cd:ef", HOOK_KEY)
    await call("release")
    assert (await http(daemon.urls[0], CREDS, source="127.0.0.30")).status == 404
    assert daemon.inventory.instance("i-0feedfeedfeedfeed") is None


async def test_rotate_that_fails_exits_1(clock: FakeClock) -> None:
    """rotate when the issuer refuses: exit 1 with the failure's code and message (it used to
    exit 0 and print the old session as if it were new); the old session is still served."""
    flaky: list[FlakyBackend] = []

    def wrap(backend: Backend) -> Backend:
        flaky.append(FlakyBackend(backend))
        return flaky[0]

    async with running(make_config(), clock, open_backend=wrapping(wrap)) as daemon:
        before = daemon.sessions.get(VM_A)
        flaky[0].failing = BackendError(
            "AccessDenied", "The issuer refused the role.", retryable=False
        )
        code, _, err = await cli(daemon, "rotate", "--instance", VM_A)
        assert daemon.sessions.get(VM_A) is before
    assert code == 1 and "RotationFailed: AccessDenied: The issuer refused the role." in err


class SlowDisk(StateFile):
    """A state file whose writes wait for a gate: a slow or stalled disk, on cue."""

    def __init__(self, real: StateFile) -> None:
        super().__init__(real.path.parent)
        self.gate = threading.Event()
        self.writing = threading.Event()

    def save(self, overrides: Overrides) -> None:
        self.writing.set()
        assert self.gate.wait(30)
        super().save(overrides)


async def test_persistence_is_off_the_loop_and_serialized(daemon: Daemon) -> None:
    """While an admin change waits on the disk, guests are still served and the change is not
    yet in effect (acknowledged only once persisted); a second change of the same instance
    waits for the first and is judged against its result (one succeeds, one is refused)."""
    disk = SlowDisk(daemon.inventory._state)  # type: ignore[arg-type]
    daemon.inventory._state = disk
    first = asyncio.create_task(
        cli(daemon, "associate", "--instance", VM_D, "--profile", "profile-a")
    )
    second = asyncio.create_task(
        cli(daemon, "associate", "--instance", VM_D, "--profile", "profile-b")
    )
    assert await asyncio.to_thread(disk.writing.wait, 30)
    reply = await http(daemon.urls[0], "/latest/meta-data/instance-id", source="127.0.0.5")
    assert (reply.status, reply.text) == (200, VM_D)  # the loop is free while the disk is not
    assert daemon.inventory.association(VM_D) is None  # not in effect before it is persisted
    disk.gate.set()
    results = sorted([(await first)[0], (await second)[0]])
    assert results == [0, 1]
    association = daemon.inventory.association(VM_D)
    assert association is not None and daemon.sessions.get(VM_D) is not None


async def test_remove_then_add_of_a_config_instance_serves_the_new_record(daemon: Daemon) -> None:
    """What the libvirt hook does on every stop and start: `instances remove` of a config
    instance, then `instances add` of the same id at a new address. The reply is the record
    in effect, the new address is served at once, the old one is a stranger."""
    assert (await cli(daemon, "instances", "remove", VM_D))[0] == 0
    added = await ok_json(daemon, "instances", "add", "--id", VM_D, "--address", "127.0.0.77",
                          "--http-tokens", "optional")  # fmt: skip
    assert added["addresses"] == ["127.0.0.77"] and added["source"] == "runtime"
    url = daemon.urls[0]
    assert (await http(url, "/latest/meta-data/instance-id", source="127.0.0.77")).text == VM_D
    assert (await http(url, "/latest/meta-data/instance-id", source="127.0.0.5")).status == 404


async def test_add_with_user_data_and_tags(daemon: Daemon, tmp_path: Path) -> None:
    """instances add --user-data-file --tag --instance-metadata-tags enabled: served at once,
    and the reply does not echo the user data."""
    (tmp_path / "user-data").write_bytes(b"#cloud-config\nhostname: web-7\n")
    code, out, err = await cli(daemon, "instances", "add", "--id", "i-0777777777777777a",
                               "--address", "127.0.0.77", "--http-tokens", "optional",
                               "--user-data-file", str(tmp_path / "user-data"), "--tag", "Name=web-7",
                               "--tag", "env=prod", "--instance-metadata-tags", "enabled", "--json")  # fmt: skip
    assert code == 0, err
    assert "hostname: web-7" not in out
    url = daemon.urls[0]
    assert (
        await http(url, "/latest/user-data", source="127.0.0.77")
    ).body == b"#cloud-config\nhostname: web-7\n"
    assert (
        await http(url, "/latest/meta-data/tags/instance", source="127.0.0.77")
    ).text == "Name\nenv"
    assert (
        await http(url, "/latest/meta-data/tags/instance/env", source="127.0.0.77")
    ).text == "prod"


async def test_instances_add_takes_keys_interfaces_and_block_devices(
    daemon: Daemon, tmp_path: Path
) -> None:
    """`instances add --public-key (or @FILE) --network-interface --block-device`: the guest
    is served them as EC2 serves them; a key that is not OpenSSH exits 1 naming public_keys."""
    keyfile = tmp_path / "id.pub"
    keyfile.write_text(HOOK_KEY + "\n")
    env = {**os.environ, "IMDSD_ADMIN_SOCKET": str(daemon.admin_socket)}
    ok = await _cli(env, "instances", "add", "--id", "i-0c11c11c11c11c11c", "--address", "127.0.0.31",
                    "--http-tokens", "optional", "--public-key", f"@{keyfile}",
                    "--network-interface", "mac=02:00:00:00:31:01,address=10.3.1.5,"
                    "address=10.3.1.6,subnet=10.3.1.0/24",
                    "--block-device", "ephemeral0=/dev/vdb")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    url, base = daemon.urls[0], "/latest/meta-data/"
    macs = base + "network/interfaces/macs/02:00:00:00:31:01/local-ipv4s"
    for path, expected in ((base + "public-keys/", "0=ops"), (macs, "10.3.1.5\n10.3.1.6"),
                           (base + "block-device-mapping/ephemeral0", "/dev/vdb")):  # fmt: skip
        assert (await http(url, path, source="127.0.0.31")).text == expected
    bad = await _cli(env, "instances", "add", "--id", "i-0c11c11c11c11c11d", "--address",
                     "127.0.0.32", "--public-key", "ssh-ed25519 nope")  # fmt: skip
    assert bad.returncode == 1 and "public_keys[0]" in bad.stderr


async def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "imdsd", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


async def test_libvirt_hook_passes_the_tap_as_host_interface(tmp_path: Path) -> None:
    """host-interface="target": the hook adds the instance with the domain's tap
    (<interface><target dev=...>) as its host_interface (a multi-tenant host's daemon, whose
    listeners are bound to devices, records it)."""
    config = config_text("").replace('listeners = ["127.0.0.1:0"]',
                                     'listeners = ["127.0.0.1:0"]\nbind_to_devices = true\n'
                                     'guest_devices = ["lo"]')  # fmt: skip
    async with running(parse(config), FakeClock()) as daemon:
        hook = Path(__file__).parents[2] / "config" / "libvirt-hook-qemu"
        env = {**os.environ, "IMDSD": str(Path(sys.executable).with_name("imdsd")),
               "IMDSD_ADMIN_SOCKET": str(daemon.admin_socket)}  # fmt: skip
        xml = DOMAIN_XML.format(key=HOOK_KEY).replace(
            'http-tokens="optional"', 'http-tokens="optional" host-interface="target"'
        ).replace('<mac address="52:54:00:AB:CD:EF"/>',
                  '<mac address="52:54:00:AB:CD:EF"/><target dev="vnet7"/>')  # fmt: skip
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(hook), "web-1", "started", "begin", "-"],
            input=xml, capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        added = daemon.inventory.instance("i-0feedfeedfeedfeed")
        assert added is not None and added.host_interface == "vnet7"


def test_the_instances_table_says_where_traffic_arrives() -> None:
    """On a host with scoped instances `instances list` shows an ARRIVES column (the device or
    namespace, "host" for the others, "(its device)" for a VM that is its whole tap); a host
    without any shows the table as before."""
    from imdsd.cli.tables import instances_table

    options = {"http_tokens": "required", "hop_limit": 1, "http_endpoint": "enabled"}
    rows: list[dict[str, Any]] = [
        {"id": "i-1", "addresses": [], "host_interface": "tap-vm1", "profile": None,
         "metadata_options": options, "source": "config"},
        {"id": "i-2", "addresses": ["10.0.0.5"], "profile": "web",
         "metadata_options": options, "source": "runtime"}]  # fmt: skip
    lines = instances_table(rows).splitlines()
    assert lines[0].split()[:3] == ["INSTANCE", "ADDRESSES", "ARRIVES"]
    assert lines[1].split()[:4] == ["i-1", "(its", "device)", "tap-vm1"]
    assert lines[2].split()[:3] == ["i-2", "10.0.0.5", "host"]
    assert "ARRIVES" not in instances_table(rows[1:])
