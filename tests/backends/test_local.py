"""The embedded issuer mints STS-shaped sessions whose tokens the key holder can open."""

from __future__ import annotations

import base64
import json
import re
from datetime import timedelta
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imdsd.backends.local import LocalIssuer, open_backend
from imdsd.config import parse
from imdsd.model import InstanceProfile, Role
from tests.fakes import START, FakeClock

PROFILE = InstanceProfile(name="p", path="/", id="AIPAAAAAAAAAAAAAAAAAA",
                          role=Role.from_arn("arn:aws:iam::123456789012:role/app"))  # fmt: skip
CONFIGURED_KEY = "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s="  # base64 of 32 bytes of "k"


def open_token(key: bytes, token: str) -> dict[str, Any]:
    """Open a token as the key holder does, with `cryptography` alone (an independent reader
    of the documented format): base64 of version byte 1, a 12-byte nonce and the AES-GCM
    sealed JSON record, the version byte as associated data. InvalidTag under another key,
    ValueError for what is not such a token."""
    raw = base64.b64decode(token, validate=True)
    if raw[:1] != b"\x01":
        raise ValueError(f"not a version-1 token: {raw[:1]!r}")
    record: dict[str, Any] = json.loads(AESGCM(key).decrypt(raw[1:13], raw[13:], raw[:1]))
    return record


async def test_session_shape() -> None:
    """ASIA + 16 of [A-Z2-7], a 40-char secret, whole-second times, the configured lifetime."""
    clock = FakeClock(START.replace(microsecond=123456))
    issuer = LocalIssuer(b"k" * 32, timedelta(hours=6), clock)
    session = await issuer.issue(PROFILE, session_name="i-0123456789abcdef0")
    assert re.fullmatch(r"ASIA[A-Z2-7]{16}", session.access_key_id)
    assert len(session.secret_access_key) == 40
    assert session.issued_at == START and session.expiration == START + timedelta(hours=6)


async def test_sessions_are_distinct() -> None:
    """Every issue yields new keys."""
    issuer = LocalIssuer(b"k" * 32, timedelta(hours=1), FakeClock())
    a = await issuer.issue(PROFILE, session_name="i-aaaaaaaa")
    b = await issuer.issue(PROFILE, session_name="i-aaaaaaaa")
    assert a.access_key_id != b.access_key_id and a.secret_access_key != b.secret_access_key
    assert a.token != b.token


async def test_token_is_sealed_record() -> None:
    """The key holder opens the token: key id, role ARN, session name (instance id), times."""
    issuer = LocalIssuer(b"k" * 32, timedelta(hours=6), FakeClock())
    session = await issuer.issue(PROFILE, session_name="i-0123456789abcdef0")
    record = open_token(b"k" * 32, session.token)
    assert record == {
        "AccessKeyId": session.access_key_id,
        "RoleArn": "arn:aws:iam::123456789012:role/app",
        "RoleSessionName": "i-0123456789abcdef0",
        "IssuedAt": int(session.issued_at.timestamp()),
        "Expiration": int(session.expiration.timestamp()),
    }
    assert "i-0123456789abcdef0" not in session.token  # sealed, not merely encoded


async def test_other_key_cannot_open() -> None:
    """A token opens only under the key that sealed it; garbage is refused cleanly."""
    session = await LocalIssuer(b"k" * 32, timedelta(hours=1), FakeClock()).issue(
        PROFILE, session_name="i-aaaaaaaa"
    )
    assert open_token(b"k" * 32, session.token)["RoleSessionName"] == "i-aaaaaaaa"
    for token in (session.token, "garbage!", "AAAA"):
        with pytest.raises((InvalidTag, ValueError)):
            open_token(b"x" * 32, token)


async def test_open_backend_uses_configured_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A configured key makes tokens verifiable across restarts (every start seals under it);
    none means a fresh random 256-bit key per start, under which only that start's tokens open."""
    config = parse(f'[backend.local]\nkey = "{CONFIGURED_KEY}"')
    clock = FakeClock()
    async with (
        open_backend(config.backend, clock) as first,
        open_backend(config.backend, clock) as second,
    ):
        for issuer in (first, second):
            session = await issuer.issue(PROFILE, session_name="i-aaaaaaaa")
            record = open_token(base64.b64decode(CONFIGURED_KEY), session.token)
            assert record["RoleSessionName"] == "i-aaaaaaaa"
    generated: list[bytes] = []
    generate = AESGCM.generate_key

    def recorded(bit_length: int) -> bytes:  # the real generator; the test reads what it made
        generated.append(generate(bit_length))
        return generated[-1]

    monkeypatch.setattr(AESGCM, "generate_key", recorded)
    default = parse("").backend
    async with open_backend(default, clock) as one, open_backend(default, clock) as two:
        tokens = [(await b.issue(PROFILE, session_name="i-aaaaaaaa")).token for b in (one, two)]
    assert len(generated) == 2 and generated[0] != generated[1]
    for key, token, other in zip(generated, tokens, reversed(generated), strict=True):
        assert len(key) == 32 and open_token(key, token)["RoleSessionName"] == "i-aaaaaaaa"
        with pytest.raises(InvalidTag):
            open_token(other, token)
    assert "key" not in repr(one).replace("key=<hidden>", "")
