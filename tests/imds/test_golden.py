"""Golden bodies: every path of one instance's tree, byte for byte as EC2 lays it out.

The daemon runs on a fake clock, so every body is fixed except the freshly minted keys,
which are replaced by placeholders before comparing. Regenerate after a deliberate change
with IMDSD_UPDATE_GOLDEN=1 and review the diff against ../shared/imds-protocol.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from imdsd.daemon import Daemon
from tests.helpers import VM_A, VM_B, http, token_for

GOLDEN = Path(__file__).parent.parent / "golden"
PATHS = [
    "/",
    "/latest",
    "/latest/",
    "/latest/meta-data",
    "/latest/meta-data/",
    "/latest/meta-data/ami-id",
    "/latest/meta-data/ami-launch-index",
    "/latest/meta-data/hostname",
    "/latest/meta-data/instance-id",
    "/latest/meta-data/instance-life-cycle",
    "/latest/meta-data/instance-type",
    "/latest/meta-data/local-hostname",
    "/latest/meta-data/local-ipv4",
    "/latest/meta-data/mac",
    "/latest/meta-data/placement/",
    "/latest/meta-data/placement/availability-zone",
    "/latest/meta-data/placement/region",
    "/latest/meta-data/services/",
    "/latest/meta-data/services/domain",
    "/latest/meta-data/services/partition",
    "/latest/meta-data/iam/",
    "/latest/meta-data/iam/info",
    "/latest/meta-data/iam/security-credentials",
    "/latest/meta-data/iam/security-credentials/",
    "/latest/meta-data/iam/security-credentials/role-a",
    "/latest/meta-data/iam/security-credentials-extended/",
    "/latest/meta-data/iam/security-credentials-extended/role-a",
    "/latest/dynamic/",
    "/latest/dynamic/instance-identity/",
    "/latest/dynamic/instance-identity/document",
    "/2021-07-15/meta-data/instance-id",
    "/latest/meta-data/nope",
    "/latest/meta-data/iam/security-credentials/role-b",
    "/1999-01-01/meta-data/",
]


def scrub(body: str, daemon: Daemon, key: str) -> str:
    entry = daemon.sessions.get(key)
    assert entry is not None
    s = entry.session
    for value, name in (
        (s.secret_access_key, "SECRET"),
        (s.token, "TOKEN"),
        (s.access_key_id, "ASIAKEYID"),
    ):
        body = body.replace(value, f"<{name}>")
    return body


async def transcript(url: str, daemon: Daemon, source: str, key: str, paths: list[str]) -> str:
    token = await token_for(url, source)
    parts = []
    for path in paths:
        reply = await http(url, path, source=source, headers={"X-aws-ec2-metadata-token": token})
        head = f"### GET {path} -> {reply.status} {reply.headers['content-type']} server={reply.headers['server']}"
        parts.append(head + "\n" + scrub(reply.text, daemon, key))
    return "\n".join(parts) + "\n"


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("IMDSD_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


async def test_golden_tree_instance_a(daemon: Daemon, url: str) -> None:
    """Every path of VM A (eu-west-1, profile-a): listings, documents, field order, errors."""
    check("vm_a.txt", await transcript(url, daemon, "127.0.0.2", VM_A, PATHS))


async def test_golden_tree_instance_b(daemon: Daemon, url: str) -> None:
    """VM B: a profile with a path and a given id, a role with a path, us-east-1 defaults."""
    paths = ["/latest/meta-data/iam/info", "/latest/meta-data/iam/security-credentials/",
             "/latest/meta-data/iam/security-credentials/role-b", "/latest/meta-data/hostname",
             "/latest/dynamic/instance-identity/document"]  # fmt: skip
    check("vm_b.txt", await transcript(url, daemon, "127.0.0.3", VM_B, paths))
