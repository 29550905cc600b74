"""The rate cap guards upstreams, not the embedded issuer (issue 20): a 10,000-VM host on the
local backend gets every session at start-up instead of waiting minutes at rotation.max_rate."""

from __future__ import annotations

import pytest

from imdsd.backends import OPENERS, has_upstream
from imdsd.config import parse
from imdsd.daemon import running
from imdsd.ratelimit import RateLimit
from tests.fakes import FakeClock
from tests.helpers import SCRATCH, host_sections

COUNT = 100
PROFILE = """
[imds]
listeners = ["127.0.0.1:0"]
{host}
[rotation]
max_rate = 1
startup_deadline = "2s"
[[instance_profiles]]
name = "p"
role_arn = "arn:aws:iam::123456789012:role/app"
"""
INSTANCE = """[[instances]]
id = "i-{n:017x}"
addresses = ["127.9.0.{m}"]
[[associations]]
instance = "i-{n:017x}"
profile = "p"
"""


def test_only_kinds_with_an_upstream_are_capped() -> None:
    """sts and rolesanywhere call an upstream whose quota others share; the local issuer mints
    in-process and has none."""
    assert {kind: has_upstream(kind) for kind in OPENERS} == {
        "local": False,
        "sts": True,
        "rolesanywhere": True,
    }


async def test_local_issuer_primes_without_the_rate_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant 8 at scale: with rotation.max_rate = 1, 100 local instances all have their
    session when start-up returns (capped, priming would take ~100 s and stop at the 2 s
    deadline), and the rate limiter is never consulted."""
    consulted: list[RateLimit] = []
    acquire = RateLimit.acquire

    async def counted(self: RateLimit) -> None:
        consulted.append(self)
        await acquire(self)

    monkeypatch.setattr(RateLimit, "acquire", counted)
    directory = SCRATCH / "uncapped"
    text = PROFILE.format(host=host_sections(directory))
    text += "".join(INSTANCE.format(n=n, m=n + 1) for n in range(COUNT))
    clock = FakeClock()
    async with running(parse(text), clock) as daemon:
        states = {daemon.sessions.state(a.instance_id, clock.now())
                  for a in daemon.inventory.associations()}  # fmt: skip
        assert len(daemon.inventory.associations()) == COUNT
    assert states == {"fresh"}
    assert consulted == []
