"""What a booting guest configures itself from (issue 17): network/interfaces/macs/,
public-keys/ and block-device-mapping/, byte for byte as EC2 lays them out; every listed path
answers; iam/ lists what EC2 lists; bad keys and interfaces are refused with their key path."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from imdsd.cli.client import request
from imdsd.config import parse
from imdsd.daemon import Daemon, running
from imdsd.errors import ConfigError, Refused
from tests.fakes import FakeClock
from tests.helpers import VM_A, config_text, http, token_for
from tests.imds.test_golden import check, transcript

VM_E = "i-0eeeeeeeeeeeeeeee"
E = "127.0.0.6"
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKo3w7NPk/WVpdfeHQxxCs0oDHhy2zVSNa8vcTa4Khvx"
ECDSA = (
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBGFBn/EJ3KgYFRS2Ch"
    "+bthuvTmTMdMO8gvUQRO7iI5hQfIVPPwPNAUkAYhs8SHbnH4Z1vi/ysCWDLykr7xzwaX4="
)
MAC0, MAC1 = "02:aa:00:00:00:01", "02:aa:00:00:00:02"
FULL = f"""
[[instances]]
id = "{VM_E}"
addresses = ["{E}"]
region = "eu-west-1"
account_id = "123456789012"
metadata_options = {{ http_tokens = "optional" }}
public_keys = ["{ED25519} ops@example", "{ECDSA}"]
block_device_mapping = {{ ephemeral0 = "/dev/vdb", swap = "vdc" }}
network_interfaces = [
  {{ mac = "{MAC0}", addresses = ["10.0.0.5", "10.0.0.6"], subnet = "10.0.0.0/24",
     vpc_cidr = "10.0.0.0/16", ipv6 = ["fd00:ec2::5"], security_groups = ["web", "ssh"] }},
  {{ mac = "{MAC1}", device_number = 1, addresses = ["10.1.0.5"],
     interface_id = "eni-0123456789abcdef0" }},
]

[[associations]]
instance = "{VM_E}"
profile = "profile-a"
"""
NET = f"/latest/meta-data/network/interfaces/macs/{MAC0}/"
NET_KEYS = (
    "device-number",
    "interface-id",
    "ipv6s",
    "local-hostname",
    "local-ipv4s",
    "mac",
    "owner-id",
    "security-group-ids",
    "security-groups",
    "subnet-id",
    "subnet-ipv4-cidr-block",
    "subnet-ipv6-cidr-blocks",
    "vpc-id",
    "vpc-ipv4-cidr-block",
    "vpc-ipv4-cidr-blocks",
)
NEW_PATHS = [
    "/latest/meta-data/",
    "/latest/meta-data/mac",
    "/latest/meta-data/local-ipv4",
    "/latest/meta-data/hostname",
    "/latest/meta-data/iam/",
    "/latest/meta-data/network/",
    "/latest/meta-data/network/interfaces/",
    "/latest/meta-data/network/interfaces/macs/",
    NET,
    *(NET + key for key in NET_KEYS),
    f"/latest/meta-data/network/interfaces/macs/{MAC1}/",
    f"/latest/meta-data/network/interfaces/macs/{MAC1}/interface-id",
    f"/latest/meta-data/network/interfaces/macs/{MAC1}/local-hostname",
    "/latest/meta-data/public-keys",
    "/latest/meta-data/public-keys/",
    "/latest/meta-data/public-keys/0/",
    "/latest/meta-data/public-keys/0/openssh-key",
    "/latest/meta-data/public-keys/1/openssh-key",
    "/latest/meta-data/block-device-mapping/",
    "/latest/meta-data/block-device-mapping/ami",
    "/latest/meta-data/block-device-mapping/ephemeral0",
    "/latest/meta-data/block-device-mapping/root",
    "/latest/meta-data/block-device-mapping/swap",
]


@pytest.fixture
async def full() -> AsyncIterator[Daemon]:
    """The real daemon with VM E: two interfaces (one with IPv6), two keys, block devices."""
    async with running(parse(config_text(FULL)), FakeClock()) as daemon:
        yield daemon


async def test_golden_devices(full: Daemon) -> None:
    """The new paths of a fully configured instance, byte for byte: newline-separated values,
    trailing "/" on directories, "N=name" for keys (the comment, else key-N), iam/ without
    security-credentials-extended."""
    check("vm_e.txt", await transcript(full.urls[0], full, E, VM_E, NEW_PATHS))


async def test_every_listed_path_answers(full: Daemon) -> None:
    """cloud-init drops all metadata when a listed path fails: a walk of every listing of a
    fully configured instance requests each entry, and each answers 200."""
    url, seen = full.urls[0], []
    headers = {"X-aws-ec2-metadata-token": await token_for(url, E)}
    todo = ["/latest/"]
    while todo:
        path = todo.pop()
        reply = await http(url, path, source=E, headers=headers)
        assert reply.status == 200, path
        seen.append(path)
        if not path.endswith("/"):
            continue
        for entry in reply.text.split("\n"):
            name = entry.split("=", 1)[0] + "/" if "=" in entry else entry
            child = path + name
            todo.append(child if child.endswith("/") or path != "/latest/" else child + "/")
    assert len(seen) > 60 and f"{NET}ipv6s" in seen and "/latest/user-data" not in seen


async def test_the_default_interface_is_the_instance(full: Daemon) -> None:
    """An instance with no network_interfaces gets one: its mac (meta-data/mac) with its
    addresses, in the /24 of its address (the documented default)."""
    url = full.urls[0]
    mac = (await http(url, "/latest/meta-data/mac", source="127.0.0.2")).text
    base = f"/latest/meta-data/network/interfaces/macs/{mac}/"
    assert (
        await http(url, "/latest/meta-data/network/interfaces/macs/", source="127.0.0.2")
    ).text == mac + "/"
    assert (await http(url, base + "local-ipv4s", source="127.0.0.2")).text == "127.0.0.2"
    assert (
        await http(url, base + "subnet-ipv4-cidr-block", source="127.0.0.2")
    ).text == "127.0.0.0/24"
    assert (await http(url, "/latest/meta-data/public-keys/", source="127.0.0.2")).status == 404


@pytest.mark.parametrize(
    ("table", "path"),
    [
        ('public_keys = ["ssh-ed25519 AAAAnotbase64!"]', "instances[4].public_keys[0]"),
        ('public_keys = ["ssh-dss AAAAB3NzaC1kc3MAAACBAP"]', "instances[4].public_keys[0]"),
        ('public_keys = ["0 0"]', "instances[4].public_keys[0]"),  # an unknown key type
        ('public_keys = "ssh-ed25519 AAAA"', "instances[4].public_keys"),
        (
            'network_interfaces = [{ mac = "02:00:00:00:00:01", addresses = ["10.0.1.5"], '
            'subnet = "10.0.0.0/24" }]',
            "instances[4].network_interfaces[0].addresses",
        ),
        (
            'network_interfaces = [{ mac = "02:00:00:00:00:01", device_number = 1 }]',
            "instances[4].network_interfaces",
        ),
        (
            'network_interfaces = [{ mac = "02:00:00:00:00:01" }, { mac = "02:00:00:00:00:01" }]',
            "instances[4].network_interfaces[1].mac",
        ),
        (
            'mac = "02:00:00:00:00:09"\nnetwork_interfaces = [{ mac = "02:00:00:00:00:01" }]',
            "instances[4].mac",
        ),
        (
            'block_device_mapping = { ephemeral99 = "/dev/vdb" }',
            "instances[4].block_device_mapping",
        ),
    ],
)
def test_bad_devices_and_keys_are_refused_naming_the_key(table: str, path: str) -> None:
    """A key that does not parse as OpenSSH, an address outside its subnet, no device 0, a MAC
    twice, a mac that is not device 0's, an unknown device name: one problem naming the key."""
    text = config_text(f'\n[[instances]]\nid = "{VM_E}"\naddresses = ["{E}"]\n{table}\n')
    with pytest.raises(ConfigError) as refused:
        parse(text)
    assert [p.path for p in refused.value.problems] == [path]


async def test_the_admin_api_refuses_a_bad_public_key(full: Daemon) -> None:
    """POST /v1/instances with a key that is not OpenSSH: 400, the key path named."""
    body = {"id": "i-0fffffffffffffff0", "addresses": ["127.0.0.7"], "public_keys": ["nope"]}
    with pytest.raises(Refused) as refused:
        await request(full.admin_socket, "POST", "/v1/instances", body)
    assert refused.value.http_status == 400
    assert any("public_keys[0]" in p for p in refused.value.problems)


async def test_added_instances_keep_their_devices_across_the_state_file(full: Daemon) -> None:
    """Keys and interfaces given to the admin API are served and written to the state file in
    a form that reads back as the same instance."""
    body = {"id": "i-0fffffffffffffff0", "addresses": ["127.0.0.7"], "public_keys": [ED25519],
            "network_interfaces": [{"mac": MAC1, "addresses": ["10.9.0.9"]}],
            "metadata_options": {"http_tokens": "optional"}}  # fmt: skip
    await request(full.admin_socket, "POST", "/v1/instances", body)
    key = await http(
        full.urls[0], "/latest/meta-data/public-keys/0/openssh-key", source="127.0.0.7"
    )
    assert key.text == ED25519
    state = full.inventory._state
    assert state is not None
    added = state.load().added["i-0fffffffffffffff0"]
    assert added == full.inventory.instance("i-0fffffffffffffff0")
    assert VM_A  # the shared config's instances are untouched
