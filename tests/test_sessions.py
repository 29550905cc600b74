"""SessionCache: rendered once, served as the same bytes; never expired keys (invariant 3)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from imdsd.imds import render
from imdsd.model import Role, Session
from imdsd.sessions import PENDING_CODE, Served, SessionCache
from tests.fakes import START

ROLE = Role.from_arn("arn:aws:iam::123456789012:role/app")
OTHER = Role.from_arn("arn:aws:iam::123456789012:role/other")
SESSION = Session(access_key_id="ASIAAAAAAAAAAAAAAAAA", secret_access_key="s" * 40, token="t",
                  issued_at=START, expiration=START + timedelta(hours=6))  # fmt: skip


def counting_cache() -> tuple[SessionCache, list[int]]:
    calls: list[int] = []

    def renderer(session: Session, role: Role) -> tuple[bytes, bytes, bytes]:
        calls.append(1)
        return render.credentials(session, role)

    return SessionCache(renderer, render.failure, render.read_credentials), calls


def joined(cache: SessionCache, key: str, role_arn: str, *, extended: bool, now: datetime) -> bytes:
    """What the guest receives: the answer's parts, written one after the other."""
    return b"".join(cache.answer(key, role_arn, extended=extended, now=now))


def test_rendered_once_served_as_the_same_object() -> None:
    """The request path hands out the bytes made at store time: no rendering per request."""
    cache, calls = counting_cache()
    served = cache.store("i-1", SESSION, ROLE)
    for _ in range(100):
        legacy = cache.answer("i-1", ROLE.arn, extended=False, now=START)
        extended = cache.answer("i-1", ROLE.arn, extended=True, now=START)
        assert legacy[0] is extended[0] is served.fields
        assert (legacy[1], extended[1]) == (served.closing, served.extended_closing)
    assert len(calls) == 1


def test_a_session_keeps_its_bytes_once() -> None:
    """The legacy and the extended document share one rendered body (their closings differ,
    and the extended closing is one object per account, shared by every session of it); each
    joins to EC2's document with the fields in EC2's order."""
    cache, _ = counting_cache()
    one, other = cache.store("i-1", SESSION, ROLE), cache.store("i-2", SESSION, ROLE)
    assert one.extended_closing is other.extended_closing
    legacy = json.loads(one.fields + one.closing)
    extended = json.loads(one.fields + one.extended_closing)
    assert list(legacy) == ["Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey",
                            "Token", "Expiration"]  # fmt: skip
    assert extended == {**legacy, "AccountId": ROLE.account_id}
    assert list(extended)[-1] == "AccountId"


def test_the_session_is_read_back_from_its_document() -> None:
    """A served session keeps no second copy of its secrets: what the vault and the admin
    views read back from the document is the stored session (issue and expiry to the second)."""
    cache, _ = counting_cache()
    issued = START.replace(microsecond=0)
    session = Session(access_key_id="ASIAEXAMPLEEXAMPLE12", secret_access_key="s/e+c=r\\et\"",
                      token="t" * 900, issued_at=issued, expiration=issued + timedelta(hours=1))  # fmt: skip
    served = cache.store("i-1", session, ROLE)
    assert served.session == session and served.expiration == session.expiration
    assert not any(isinstance(getattr(served, f), Session) for f in Served.__slots__)


def test_expired_session_is_never_served() -> None:
    """At its expiration instant a session is gone; what remains is the failure shape."""
    cache, _ = counting_cache()
    cache.store("i-1", SESSION, ROLE)
    assert b"Success" in joined(
        cache, "i-1", ROLE.arn, extended=False, now=SESSION.expiration - timedelta(seconds=1)
    )
    body = joined(cache, "i-1", ROLE.arn, extended=False, now=SESSION.expiration)
    assert SESSION.access_key_id.encode() not in body and PENDING_CODE.encode() in body


def test_session_of_another_role_is_not_served() -> None:
    """A session stored for one role never answers for another (a replaced association)."""
    cache, _ = counting_cache()
    cache.store("i-1", SESSION, ROLE)
    assert SESSION.access_key_id.encode() not in joined(
        cache, "i-1", OTHER.arn, extended=False, now=START
    )


def test_failure_recorded_then_cleared_by_success() -> None:
    """A failure shows only once no valid session is left, and a new session clears it."""
    cache, _ = counting_cache()
    cache.store("i-1", SESSION, ROLE)
    cache.fail("i-1", "Throttling", "slow down", START)
    assert b"Success" in joined(cache, "i-1", ROLE.arn, extended=False, now=START)
    late = SESSION.expiration + timedelta(minutes=1)
    assert b'"Code" : "Throttling"' in joined(cache, "i-1", ROLE.arn, extended=False, now=late)
    cache.store("i-1", SESSION, ROLE)
    assert cache.failure("i-1") is None
    cache.drop("i-1")
    assert cache.get("i-1") is None and cache.keys() == []
