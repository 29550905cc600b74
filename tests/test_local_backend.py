"""The embedded issuer mints STS-shaped sessions whose tokens the key holder can open."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from imdsd.backends.local import LocalIssuer, open_backend
from imdsd.config import parse
from imdsd.errors import BackendError
from imdsd.model import InstanceProfile, Role
from tests.fakes import START, FakeClock

PROFILE = InstanceProfile(name="p", path="/", id="AIPAAAAAAAAAAAAAAAAAA",
                          role=Role.from_arn("arn:aws:iam::123456789012:role/app"))  # fmt: skip


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
    record = issuer.open_token(session.token)
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
    other = LocalIssuer(b"x" * 32, timedelta(hours=1), FakeClock())
    for token in (session.token, "garbage!", "AAAA"):
        with pytest.raises(BackendError):
            other.open_token(token)


async def test_open_backend_uses_configured_key() -> None:
    """A configured key makes tokens verifiable across restarts; none means a fresh random key."""
    config = parse(
        '[backend.local]\nkey = "' + "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=" + '"'
    )
    clock = FakeClock()
    async with (
        open_backend(config.backend, clock) as first,
        open_backend(config.backend, clock) as second,
    ):
        session = await first.issue(PROFILE, session_name="i-aaaaaaaa")
        assert second.open_token(session.token)["RoleSessionName"] == "i-aaaaaaaa"
    default = parse("").backend
    async with open_backend(default, clock) as one, open_backend(default, clock) as two:
        session = await one.issue(PROFILE, session_name="i-aaaaaaaa")
        with pytest.raises(BackendError):
            two.open_token(session.token)
    assert "key" not in repr(one).replace("key=<hidden>", "")
