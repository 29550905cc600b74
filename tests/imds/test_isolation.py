"""Invariant 1: a request is answered only for the instance it comes from.

Each VM is a distinct loopback source address talking to the real daemon over TCP.
"""

from __future__ import annotations

import json

import pytest

from imdsd.daemon import Daemon
from tests.helpers import ROLE_B, VM_A, VM_B, VM_D, http, token_for

A, B, D = "127.0.0.2", "127.0.0.3", "127.0.0.5"
CREDS = "/latest/meta-data/iam/security-credentials/"


def secrets_of(daemon: Daemon, key: str) -> list[str]:
    entry = daemon.sessions.get(key)
    assert entry is not None
    return [entry.session.access_key_id, entry.session.secret_access_key, entry.session.token]


async def test_each_instance_gets_its_own_role(daemon: Daemon, url: str) -> None:
    """A and B each see their own instance id, role and keys, and nothing of the other's."""
    token_b = await token_for(url, B)
    a = json.loads((await http(url, CREDS + "role-a", source=A)).body)
    b = json.loads(
        (
            await http(
                url, CREDS + "role-b", source=B, headers={"X-aws-ec2-metadata-token": token_b}
            )
        ).body
    )
    assert a["AccessKeyId"] == secrets_of(daemon, VM_A)[0]
    assert b["AccessKeyId"] == secrets_of(daemon, VM_B)[0]
    assert (await http(url, "/latest/meta-data/instance-id", source=A)).text == VM_A
    assert (await http(url, CREDS, source=A)).text == "role-a"


async def test_other_role_name_is_404(daemon: Daemon, url: str) -> None:
    """Asking for another instance's role by name is 404, as EC2 answers unknown roles."""
    reply = await http(url, CREDS + "role-b", source=A)
    assert reply.status == 404
    assert not any(s in reply.text for s in secrets_of(daemon, VM_B))


async def test_token_from_another_instance_is_401(daemon: Daemon, url: str) -> None:
    """A token minted for A, presented from B (required) or D (optional), is refused."""
    token_a = await token_for(url, A)
    for source in (B, D):
        reply = await http(url, "/latest/meta-data/instance-id", source=source,
                           headers={"X-aws-ec2-metadata-token": token_a})  # fmt: skip
        assert reply.status == 401


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-For": "127.0.0.3"},
        {"Forwarded": "for=127.0.0.3"},
        {"X-Real-IP": "127.0.0.3"},
        {"X-Originating-IP": "127.0.0.3"},
        {"Host": "127.0.0.3"},
        {"X-aws-ec2-metadata-instance-id": VM_B},
    ],
)
async def test_headers_cannot_claim_another_identity(
    daemon: Daemon, url: str, headers: dict[str, str]
) -> None:
    """Identity is the socket peer: no header makes A into B."""
    reply = await http(url, "/latest/meta-data/instance-id", source=A, headers=headers)
    assert reply.text == VM_A
    reply = await http(url, CREDS, source=A, headers=headers)
    assert reply.text == "role-a"


@pytest.mark.parametrize(
    "path",
    [
        CREDS + "../security-credentials/role-b",
        CREDS + "role-b/../role-b",
        CREDS + "%72ole-b",
        CREDS + "role-b%00",
        "/latest/meta-data/iam/security-credentials//role-b",
        "/latest/meta-data/iam/security-credentials/role-a/../role-b",
        "//latest/meta-data/iam/security-credentials/role-b",
        "/latest/meta-data/iam/security-credentials/" + ROLE_B,
        "/latest/meta-data/iam/security-credentials/role-a?instance=" + VM_B,
        "/latest/meta-data/iam/security-credentials/role-a#" + VM_B,
        "/%2e%2e/latest/meta-data/iam/security-credentials/role-b",
    ],
)
async def test_path_tricks_never_cross_instances(daemon: Daemon, url: str, path: str) -> None:
    """No path spelling reaches another instance's credentials."""
    reply = await http(url, path, source=A)
    assert not any(s in reply.text for s in secrets_of(daemon, VM_B))
    assert reply.status in (200, 400, 404)
    if reply.status == 200:
        assert json.loads(reply.body)["AccessKeyId"] == secrets_of(daemon, VM_A)[0]


async def test_unknown_caller_learns_nothing(daemon: Daemon, url: str) -> None:
    """An address that belongs to no instance gets a bare 404 for every path, token included."""
    for method, path in [
        ("GET", "/latest/meta-data/"),
        ("GET", CREDS + "role-a"),
        ("PUT", "/latest/api/token"),
    ]:
        reply = await http(url, path, method=method, source="127.0.0.9",
                           headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})  # fmt: skip
        assert reply.status == 404
        for secret in (VM_A, VM_B, "role-a", "role-b", *secrets_of(daemon, VM_A)):
            assert secret not in reply.text


async def test_instance_without_association_has_no_iam(daemon: Daemon, url: str) -> None:
    """iam/ exists only while the instance has an association."""
    listing = (await http(url, "/latest/meta-data/", source=D)).text.split("\n")
    assert "iam/" not in listing and "instance-id" in listing
    for path in ("/latest/meta-data/iam/", "/latest/meta-data/iam/info", CREDS, CREDS + "role-a"):
        assert (await http(url, path, source=D)).status == 404
    assert (await http(url, "/latest/meta-data/instance-id", source=D)).text == VM_D


async def test_replaced_association_serves_new_role(daemon: Daemon, url: str) -> None:
    """After replacing A's profile, A's tree shows the new role; the old role's path is 404."""
    inventory = daemon.inventory
    changed = await inventory.commit(lambda: inventory.replace_association(VM_A, "profile-b"))
    daemon.apply(changed)
    await daemon.settled(changed)
    assert (await http(url, CREDS, source=A)).text == "role-b"
    assert (await http(url, CREDS + "role-a", source=A)).status == 404
    doc = json.loads((await http(url, CREDS + "role-b", source=A)).body)
    assert doc["AccessKeyId"] == secrets_of(daemon, VM_A)[0]
    assert doc["AccessKeyId"] != secrets_of(daemon, VM_B)[0]
    info = json.loads((await http(url, "/latest/meta-data/iam/info", source=A)).body)
    assert info["InstanceProfileArn"].endswith("instance-profile/team/profile-b")
