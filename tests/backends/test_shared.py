"""session_scope = "profile": one upstream session shared by a profile's instances."""

from __future__ import annotations

from datetime import timedelta

from imdsd.backends.local import LocalIssuer
from imdsd.backends.shared import ProfileScoped
from tests.fakes import FakeClock, FlakyBackend
from tests.helpers import make_config


async def test_an_already_expired_answer_is_not_handed_to_the_next_instance() -> None:
    """An upstream answer that has already expired is returned once (the rotator counts it as
    a failed issue) but never cached for the profile's other instances: the next call asks
    the upstream again instead of handing on a dead session for `reuse_for`."""
    clock = FakeClock()
    inner = FlakyBackend(LocalIssuer(b"k" * 32, timedelta(0), clock))
    shared = ProfileScoped(inner, clock, reuse_for=timedelta(minutes=11))
    profile = make_config().profiles[0]
    await shared.issue(profile, session_name="i-0aaaaaaaaaaaaaaaa")
    await shared.issue(profile, session_name="i-0bbbbbbbbbbbbbbbb")
    assert inner.calls == 2
