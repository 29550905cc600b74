"""IMDSv2 tokens: TTL bounds, expiry on the injected clock, bound to one instance."""

from __future__ import annotations

from datetime import timedelta

import pytest

from imdsd.tokens import TokenIssuer, parse_ttl, subject
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


def test_verified_cache_is_bounded() -> None:
    """Remembered verifications never grow without bound (a PUT/GET flood cannot eat memory)."""
    issuer = TokenIssuer(FakeClock())
    for i in range(5000):
        assert issuer.verify(issuer.mint(subject(f"i-{i:08x}", 1), 60), subject(f"i-{i:08x}", 1))
    assert len(issuer._verified) <= 4096


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
