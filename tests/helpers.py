"""Shared test helpers: a config builder and a curl-like raw HTTP client with a chosen source."""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from imdsd.config import Config, parse

ROLE_A = "arn:aws:iam::111111111111:role/role-a"
ROLE_B = "arn:aws:iam::222222222222:role/team/role-b"
VM_A, VM_B, VM_C, VM_D = (
    "i-0aaaaaaaaaaaaaaaa",
    "i-0bbbbbbbbbbbbbbbb",
    "i-0cccccccccccccccc",
    "i-dddddddd",
)

SCRATCH = Path(tempfile.mkdtemp(prefix="imdsd-tests-"))  # admin sockets and state, per run

BASE = """
[imds]
listeners = ["127.0.0.1:0"]

{host}

[rotation]
jitter = "0s"
max_rate = 10000  # tests move a fake clock through many refreshes; the cap has its own tests

[[instance_profiles]]
name = "profile-a"
role_arn = "{role_a}"

[[instance_profiles]]
name = "profile-b"
path = "/team/"
id = "AIPABBBBBBBBBBBBBBBBB"
role_arn = "{role_b}"

[[instances]]
id = "{vm_a}"
addresses = ["127.0.0.2"]
region = "eu-west-1"
metadata_options = {{ http_tokens = "optional" }}

[[instances]]
id = "{vm_b}"
addresses = ["127.0.0.3", "::1"]
metadata_options = {{ http_tokens = "required", hop_limit = 3 }}

[[instances]]
id = "{vm_c}"
addresses = ["127.0.0.4"]
metadata_options = {{ http_endpoint = "disabled" }}

[[instances]]
id = "{vm_d}"
addresses = ["127.0.0.5"]
metadata_options = {{ http_tokens = "optional" }}

[[associations]]
instance = "{vm_a}"
profile = "profile-a"

[[associations]]
instance = "{vm_b}"
profile = "profile-b"
"""


_SEQUENCE = itertools.count()


def host_sections(directory: Path, metrics: str = "127.0.0.1:0") -> str:
    """[state], [admin] and [metrics] inside `directory`, so that a test daemon never touches
    the host's /var/lib/imdsd, /run/imdsd or port 9169 (the production defaults)."""
    return (
        f'[state]\ndirectory = "{directory}/state"\n'
        f'[admin]\nsocket = "{directory}/admin.sock"\n'
        f'[metrics]\nlisten = "{metrics}"\n'
    )


def config_text(extra: str = "") -> str:
    """Four VMs: A (optional tokens, profile-a), B (required, profile-b, also ::1),
    C (endpoint disabled), D (no association)."""
    names = {
        "role_a": ROLE_A,
        "role_b": ROLE_B,
        "vm_a": VM_A,
        "vm_b": VM_B,
        "vm_c": VM_C,
        "vm_d": VM_D,
    }
    return BASE.format(**names, host=host_sections(SCRATCH / f"d{next(_SEQUENCE)}")) + extra


def make_config(extra: str = "") -> Config:
    return parse(config_text(extra))


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


async def http(
    url: str,
    path: str,
    *,
    method: str = "GET",
    source: str | None = "127.0.0.1",
    headers: dict[str, str] | None = None,
) -> Reply:
    """One HTTP/1.1 request written by hand, like curl --interface SOURCE."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(
        parts.hostname, parts.port, local_addr=(source, 0)
    )
    given = headers or {}
    lines = [f"{method} {path} HTTP/1.1", "Connection: close"]
    lines += [] if "Host" in given else [f"Host: {parts.netloc}"]
    lines += [f"{k}: {v}" for k, v in given.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return Reply(status=int(status_line.split()[1]), headers=found, body=body)


async def token_for(url: str, source: str | None, ttl: int = 21600) -> str:
    reply = await http(
        url,
        "/latest/api/token",
        method="PUT",
        source=source,
        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)},
    )
    assert reply.status == 200, reply
    return reply.text


# Two guests for the hostile-guest tests: one that misbehaves (127.0.0.2, IMDSv1 allowed) and
# one whose data must never reach it (127.0.0.3, its own role in its own account).
TWO_GUESTS = """
[imds]
listeners = ["127.0.0.1:0"]
{host}
[log]
level = "info"
{budgets}
[[instance_profiles]]
name = "web"
role_arn = "arn:aws:iam::123456789012:role/web"
[[instance_profiles]]
name = "secret"
role_arn = "arn:aws:iam::210987654321:role/victims-own-role"
[[instances]]
id = "i-0f100df100df100df"
addresses = ["127.0.0.2"]
metadata_options = {{ http_tokens = "optional" }}
[[instances]]
id = "i-0a1c71a1c71a1c71a"
addresses = ["127.0.0.3"]
[[associations]]
instance = "i-0f100df100df100df"
profile = "web"
[[associations]]
instance = "i-0a1c71a1c71a1c71a"
profile = "secret"
"""


def two_guests(directory: Path, budgets: str = "") -> str:
    """TWO_GUESTS with its state, admin socket (no metrics) in `directory`."""
    return TWO_GUESTS.format(host=host_sections(directory, metrics=""), budgets=budgets)


def isolate(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AWS credentials from this machine, and never a probe of a real metadata endpoint."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HOME", "/nonexistent")
