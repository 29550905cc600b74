"""cloud-init, the first and biggest reader of imdsd on a booting guest: Debian's package runs
its own EC2 datasource (`DataSourceEc2.get_data()`, then `network_config` and the SSH keys, as
a boot does) against a live daemon, from a guest network namespace whose NIC has the MAC the
daemon serves. The datasource runs under the system python, where the package is installed
(tests/e2e/cloudinit/driver.py); `make install` installs the package where apt-get is there.

The guest's link is a veth pair with link-local addresses (169.254.N.1 on the host end, where
the daemon listens; 169.254.N.2 in the guest), made and removed by the test.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.helpers import host_sections
from tests.process import Proc

pytestmark = pytest.mark.slow  # a daemon process, a network namespace, cloud-init in a subprocess

SYSTEM_PYTHON = "/usr/bin/python3"
DRIVER = Path(__file__).parent / "cloudinit" / "driver.py"
INSTANCE = "i-0c10d1a17c10d1a17"
MAC = "02:c1:0d:1a:17:01"  # the guest NIC's, and the instance's in the daemon's config
USER_DATA = gzip.compress(b"#cloud-config\nruncmd:\n  - [sh, -c, 'echo booted > /run/booted']\n")
CONFIG = """
[imds]
listeners = ["{host_address}:0"]
{host}
[log]
level = "debug"
[[instance_profiles]]
name = "web"
role_arn = "arn:aws:iam::123456789012:role/web"
[[instances]]
id = "{instance}"
addresses = ["{guest_address}"]
region = "eu-west-1"
mac = "{mac}"
user_data_base64 = "{user_data}"
public_keys = ["{public_key}"]
network_interfaces = [
  {{ mac = "{mac}", addresses = ["{guest_address}", "{secondary}"], subnet = "{subnet}" }},
]
metadata_options = {{ http_tokens = "required" }}
[[associations]]
instance = "{instance}"
profile = "web"
"""

# Reads the role's credentials as the guest (run inside its namespace): token, listing, document.
READ_CREDENTIALS = """
import json, sys, urllib.request
base = sys.argv[1]
put = urllib.request.Request(base + "/latest/api/token", method="PUT",
                             headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
token = urllib.request.urlopen(put, timeout=10).read().decode()
def get(path):
    request = urllib.request.Request(base + path, headers={"X-aws-ec2-metadata-token": token})
    return urllib.request.urlopen(request, timeout=10).read().decode()
prefix = "/latest/meta-data/iam/security-credentials"
role = get(prefix + "/").split()[0]
print(json.dumps([json.loads(get(prefix + "/" + role)),
                  json.loads(get(prefix + "-extended/" + role))]))
"""


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=check)


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux: the guest is a network namespace (ip netns)"
    if shutil.which("ip") is None:
        return "no `ip` (iproute2) to build the guest's network namespace"
    if not Path(SYSTEM_PYTHON).exists():
        return f"no {SYSTEM_PYTHON}, the python Debian's cloud-init package is installed for"
    probe = _run(SYSTEM_PYTHON, "-c", "import cloudinit.sources.DataSourceEc2", check=False)
    if probe.returncode != 0:
        return (
            f"Debian's cloud-init is not installed for {SYSTEM_PYTHON} (the Makefile's dev "
            "setup installs it where apt-get is available and it runs as root)"
        )
    return None


@dataclass(frozen=True)
class Guest:
    """A guest network namespace: its NIC (with the instance's MAC) and the host end's address."""

    namespace: str
    device: str
    host_address: str
    guest_address: str
    secondary: str
    subnet: str


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
    namespace, host_end, guest_end = f"imdsd-ci-{tag}", f"cih{tag}", f"cig{tag}"
    n, base = random.randrange(64, 192), 4 * random.randrange(1, 31)  # a /30 inside 169.254.n/24
    made = Guest(namespace=namespace, device=guest_end, host_address=f"169.254.{n}.{base + 1}",
                 guest_address=f"169.254.{n}.{base + 2}", secondary=f"169.254.{n}.{base + 130}",
                 subnet=f"169.254.{n}.0/24")  # fmt: skip
    try:
        _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", guest_end)
        _run("ip", "link", "set", guest_end, "netns", namespace)
        _run("ip", "addr", "add", f"{made.host_address}/30", "dev", host_end)
        _run("ip", "link", "set", host_end, "up")
        inside = ("ip", "-n", namespace)
        _run(*inside, "link", "set", guest_end, "address", MAC)
        _run(*inside, "addr", "add", f"{made.guest_address}/30", "dev", guest_end)
        _run(*inside, "link", "set", "lo", "up")
        _run(*inside, "link", "set", guest_end, "up")
        yield made
    finally:
        _run("ip", "netns", "del", namespace, check=False)  # removes the guest end, and the pair
        _run("ip", "link", "del", host_end, check=False)


@dataclass(frozen=True)
class Boot:
    """What cloud-init got from the daemon, and what the daemon gave the guest directly."""

    guest: Guest
    public_key: str
    seen: dict[str, Any]  # the driver's JSON
    credentials: list[dict[str, str]]  # the role's documents, read by the test as the guest


@pytest.fixture(scope="module")
def boot(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    directory = tmp_path_factory.mktemp("cloudinit")
    public_key = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
        + " cloudinit-e2e"
    )
    config = CONFIG.format(host=host_sections(directory, metrics=""), instance=INSTANCE, mac=MAC,
                           host_address=guest.host_address, guest_address=guest.guest_address,
                           secondary=guest.secondary, subnet=guest.subnet, public_key=public_key,
                           user_data=base64.b64encode(USER_DATA).decode())  # fmt: skip
    try:
        daemon = Proc(directory, config)
    except AssertionError as e:  # the config refused: mac, network_interfaces, public_keys
        pytest.fail(f"the daemon did not start with issue 17's instance keys:\n{e}")
    try:
        driven = _run("ip", "netns", "exec", guest.namespace, SYSTEM_PYTHON, str(DRIVER),
                      daemon.url, check=False)  # fmt: skip
        assert driven.returncode == 0, driven.stderr
        read = _run("ip", "netns", "exec", guest.namespace, sys.executable, "-c",
                    READ_CREDENTIALS, daemon.url, check=False)  # fmt: skip
        assert read.returncode == 0, read.stderr
        yield Boot(guest, public_key, json.loads(driven.stdout), json.loads(read.stdout))
    finally:
        daemon.stop()


def test_get_data_succeeds_over_imdsv2_with_tokens_required(boot: Boot) -> None:
    seen = boot.seen
    assert seen["cloud_name"] == "aws", "the replaced SMBIOS read did not make the cloud 'aws'"
    assert seen["success"], "get_data() failed"
    assert seen["instance_id"] == INSTANCE
    assert seen["identity"]["instanceId"] == INSTANCE
    assert seen["identity"]["region"] == "eu-west-1"
    puts = [r for r in seen["requests"] if r["method"] == "PUT"]
    gets = [r for r in seen["requests"] if r["method"] == "GET"]
    assert puts and all(r["path"] == "/latest/api/token" and r["status"] == 200 for r in puts)
    assert gets and all(r["token"] for r in gets), "a GET went without the IMDSv2 token"
    failed = [r for r in seen["requests"] if r["status"] != 200]
    assert not failed, "every path a listing names must answer 200"


def test_user_data_is_byte_equal(boot: Boot) -> None:
    assert base64.b64decode(boot.seen["userdata_raw"]) == USER_DATA


def test_network_config_matches_the_nic_by_mac(boot: Boot) -> None:
    seen, device = boot.seen, boot.guest.device
    assert seen["interfaces_by_mac"][MAC] == device  # the guest's own view of its NIC
    assert seen["metadata"].get("mac") == MAC
    assert MAC in seen["metadata"].get("network", {}).get("interfaces", {}).get("macs", {}), (
        "no network/interfaces/macs/ for the NIC's MAC"
    )
    config = seen["network_config"]
    assert config is not None, "cloud-init derived no network config"
    assert config["version"] == 2
    assert config["ethernets"][device]["match"] == {"macaddress": MAC}
    assert config["ethernets"][device]["set-name"] == device
    assert config["ethernets"][device]["dhcp4"] is True
    prefix = boot.guest.subnet.split("/")[1]
    assert config["ethernets"][device]["addresses"] == [f"{boot.guest.secondary}/{prefix}"]


def test_the_ssh_key_reaches_get_public_ssh_keys(boot: Boot) -> None:
    assert boot.seen["public_ssh_keys"] == [boot.public_key]


def test_the_tree_is_crawled_once(boot: Boot) -> None:
    """No second crawl: cloud-init 22.4's `network_config` walks the whole tree again on "aws"
    when the metadata has no `network` key."""
    seen = boot.seen
    assert seen["crawls_in_get_data"] == 1
    counts = Counter(r["path"] for r in seen["requests"] if r["method"] == "GET")
    # meta-data/instance-id is asked twice by design: the API version probe, then the crawl.
    again = {p: n for p, n in counts.items() if n > (2 if p.endswith("/instance-id") else 1)}
    assert seen["crawls"] == 1 and not again, f"crawled {seen['crawls']} times: {again}"


def test_no_credential_reaches_what_cloudinit_writes(boot: Boot) -> None:
    """instance-data.json is world-readable on the guest; the crawled metadata goes into its
    pickled cache. cloud-init skips only the listed `security-credentials`."""
    secrets = {
        document[key]
        for document in boot.credentials
        for key in ("AccessKeyId", "SecretAccessKey", "Token")
    }
    assert len(secrets) >= 3
    written = boot.seen["instance_data"]
    assert INSTANCE in written  # it is the instance-data of this boot
    leaked = sorted(s[:12] + "..." for s in secrets if s in written)
    assert not leaked, f"credentials in instance-data.json: {leaked}"
    crawled = json.dumps(boot.seen["metadata"])
    leaked = sorted(s[:12] + "..." for s in secrets if s in crawled)
    assert not leaked, f"credentials in the crawled metadata (cloud-init's cache): {leaked}"
