"""IMDSv2 tokens: TTL bounds, expiry on the injected clock, bound to one instance."""

from __future__ import annotations

import tracemalloc
from datetime import timedelta

import pytest

from imdsd.tokens import TOKEN_TTL_MAX_SECONDS, TokenIssuer, parse_ttl, subject
from tests.fakes import FakeClock


@pytest.mark.parametrize(("header", "ttl"), [("1", 1), ("21600", 21600), ("300", 300)])
def test_ttl_in_range(header: str, ttl: int) -> None:
    """1..21600 seconds is accepted, as EC2 does."""
    assert parse_ttl(header) == ttl


@pytest.mark.parametrize(
    "header", [None, "", "0", "21601", "-1", "1.5", " 60", "６０", "abc", "99999999999999999999"]
)
def test_ttl_out_of_range(header: str | None) -> None:
    """Missing, zero, too large, signed, fractional or non-ASCII TTLs are refused (EC2: 400)."""
    with pytest.raises(ValueError):
        parse_ttl(header)


def test_token_valid_until_ttl_then_expired() -> None:
    """A token is valid for exactly its TTL on the injected clock."""
    clock = FakeClock()
    issuer = TokenIssuer(clock)
    token = issuer.mint(subject("i-0123456789abcdef0", 1), 60)
    assert issuer.verify(token, subject("i-0123456789abcdef0", 1))
    clock.advance(timedelta(seconds=59))
    assert issuer.verify(token, subject("i-0123456789abcdef0", 1))
    clock.advance(timedelta(seconds=1))
    assert not issuer.verify(token, subject("i-0123456789abcdef0", 1))


def test_token_bound_to_instance() -> None:
    """Invariant 1: a token minted for one instance is invalid for every other."""
    issuer = TokenIssuer(FakeClock())
    token = issuer.mint(subject("i-aaaaaaaa", 1), 21600)
    assert issuer.verify(token, subject("i-aaaaaaaa", 1))
    assert not issuer.verify(token, subject("i-bbbbbbbb", 1))


def test_token_from_another_daemon_is_invalid() -> None:
    """Tokens are MACed with this daemon's key: another key (a restart) refuses them."""
    clock = FakeClock()
    token = TokenIssuer(clock).mint(subject("i-aaaaaaaa", 1), 60)
    assert not TokenIssuer(clock).verify(token, subject("i-aaaaaaaa", 1))


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-2] + ("AA" if t[-2:] != "AA" else "BB"),
    lambda t: "B" + t[1:],
    lambda t: t + "AAAA",
    lambda t: t[:10],
    lambda t: "not base64 at all!",
    lambda t: "é" * 20,
    lambda t: "A" * 5000,
    lambda t: "",
])  # fmt: skip
def test_tampered_tokens_are_invalid(mangle) -> None:  # type: ignore[no-untyped-def]
    """Any change to a token, or garbage, fails verification without an exception."""
    issuer = TokenIssuer(FakeClock())
    token = issuer.mint(subject("i-aaaaaaaa", 1), 60)
    assert not issuer.verify(mangle(token), subject("i-aaaaaaaa", 1))


def flood(issuer: TokenIssuer, who: bytes, count: int) -> None:
    """`count` distinct tokens (one per expiry second) minted for `who` and each verified once."""
    for ttl in range(TOKEN_TTL_MAX_SECONDS - count + 1, TOKEN_TTL_MAX_SECONDS + 1):
        assert issuer.verify(issuer.mint(who, ttl), who)


def test_one_guests_flood_keeps_anothers_verification() -> None:
    """The verified-token map is bounded per instance: after A verifies 5,000 distinct tokens
    (more than the whole map held when it was shared), B's token still verifies with no MAC
    computed, while A's own first token costs a MAC again (A's flood evicts only A's)."""
    issuer = TokenIssuer(FakeClock())
    a, b = subject("i-aaaaaaaa", 1), subject("i-bbbbbbbb", 1)
    kept, first = issuer.mint(b, 600), issuer.mint(a, 600)
    assert issuer.verify(kept, b) and issuer.verify(first, a)
    flood(issuer, a, 5000)
    macs = issuer.macs
    assert issuer.verify(kept, b) and issuer.macs == macs
    assert issuer.verify(first, a) and issuer.macs == macs + 1


def test_cached_verification_computes_no_mac() -> None:
    """The hot path: a token verified once verifies again from memory, no MAC computed."""
    issuer = TokenIssuer(FakeClock())
    who = subject("i-aaaaaaaa", 1)
    token = issuer.mint(who, 600)
    assert issuer.verify(token, who)
    macs = issuer.macs
    assert all(issuer.verify(token, who) for _ in range(100)) and issuer.macs == macs


def test_verified_cache_is_bounded() -> None:
    """Remembered verifications never grow without bound (a PUT/GET flood cannot eat memory):
    once 6,000 incarnations have verified 6 tokens each, 6,000 more with as many tokens grow
    the live allocations by no more than noise."""
    issuer = TokenIssuer(FakeClock())

    def flood_all(start: int) -> int:
        for i in range(start, start + 6000):
            flood(issuer, subject(f"i-{i:08x}", 1), 6)
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        settled = flood_all(0)
        assert flood_all(6000) - settled < 64 * 1024
    finally:
        tracemalloc.stop()


def test_token_has_one_spelling() -> None:
    """A token verifies only as minted: 56 base64url characters, no padding; the same bytes
    written in the standard alphabet ('+', '/'), padded, or with junk appended are refused."""
    issuer = TokenIssuer(FakeClock())
    who = subject("i-aaaaaaaa", 1)
    for _ in range(64):  # until a token holds '-' or '_', so the other alphabet differs
        token = issuer.mint(who, 60 + _)
        if "-" in token or "_" in token:
            break
    assert len(token) == 56 and "=" not in token
    assert issuer.verify(token, who)
    standard = token.replace("-", "+").replace("_", "/")
    assert standard != token and not issuer.verify(standard, who)
    for variant in (token + "=", token + "==", token[:-1] + "=", " " + token, token + "\n"):
        assert not issuer.verify(variant, who)


def test_token_dies_with_its_incarnation() -> None:
    """A token names one incarnation of an instance: the same id with another incarnation
    number (removed and added again) refuses it."""
    issuer = TokenIssuer(FakeClock())
    token = issuer.mint(subject("i-aaaaaaaa", 7), 60)
    assert issuer.verify(token, subject("i-aaaaaaaa", 7))
    assert not issuer.verify(token, subject("i-aaaaaaaa", 8))
