"""IMDSv2 session tokens: stateless, MAC-bound to one instance, TTL 1..21600 seconds.

A token is base64url(version | expiry | HMAC-SHA256(key, subject | version | expiry)), 56
characters without padding, and only that spelling verifies. The subject names one instance
incarnation (its id and the inventory's incarnation number), so a token dies with its
instance: an id removed and added again refuses tokens minted before. Nothing is stored per
token, so a flood of PUTs cannot grow memory; verified tokens are remembered in a small bounded
map per instance so the request path does no cryptography for a token it has seen, and one
guest minting tokens by the thousand evicts only its own. The key comes from the OS CSPRNG at
start and never leaves this object. Never imports aiohttp.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from imdsd.clock import Clock

TOKEN_TTL_MIN_SECONDS = 1
TOKEN_TTL_MAX_SECONDS = 21600  # 6 hours, as EC2
_VERSION = 2
_HEADER = struct.Struct(">HQ")  # version, expiry (unix seconds): with the MAC, 42 bytes
_MAC_BYTES = 32
_RAW_BYTES = _HEADER.size + _MAC_BYTES  # a multiple of 3: base64 without padding
_TOKEN_CHARS = _RAW_BYTES // 3 * 4  # the base64 length; any other string is not a token
# Verified tokens remembered: a few per instance incarnation (an SDK holds one token for its
# TTL; a guest with more only costs itself a MAC each), for this many incarnations at most.
_VERIFIED_PER_SUBJECT = 4
_VERIFIED_SUBJECTS = 4096


def parse_ttl(header: str | None) -> int:
    """The value of X-aws-ec2-metadata-token-ttl-seconds; ValueError unless 1..21600 digits."""
    if header is None or not header.isascii() or not header.isdigit():
        raise ValueError(header)
    ttl = int(header)
    if not TOKEN_TTL_MIN_SECONDS <= ttl <= TOKEN_TTL_MAX_SECONDS:
        raise ValueError(header)
    return ttl


class TokenIssuer:
    """Mints and verifies IMDSv2 tokens."""

    def __init__(self, clock: Clock, key: bytes | None = None) -> None:
        self._clock = clock
        self._key = key or secrets.token_bytes(32)
        self._verified: dict[bytes, dict[str, int]] = {}  # subject -> token -> expiry
        self.macs = 0  # MACs computed (mints and verifications the map did not answer)

    def __repr__(self) -> str:
        return "TokenIssuer(key=<hidden>)"

    @property
    def key(self) -> bytes:
        """The MAC key, for the warm-restart vault only (sealed there, never shown)."""
        return self._key

    def mint(self, subject: bytes, ttl_seconds: int) -> str:
        """A token for this subject (see `subject()`) that expires ttl_seconds from now."""
        expiry = int(self._clock.now().timestamp()) + ttl_seconds
        header = _HEADER.pack(_VERSION, expiry)
        raw = header + self._hmac(subject, header).finalize()
        return base64.urlsafe_b64encode(raw).decode()

    def verify(self, token: str, subject: bytes) -> bool:
        """True when the token was minted for this subject by this daemon and is unexpired."""
        now = self._clock.now().timestamp()
        known = self._verified.get(subject)
        expiry = known.get(token) if known is not None else None
        if expiry is not None:
            return now < expiry
        expiry = self._check(token, subject)
        if expiry is None:
            return False
        self._remember(known, token, subject, expiry)
        return now < expiry

    def _remember(
        self, known: dict[str, int] | None, token: str, subject: bytes, expiry: int
    ) -> None:
        """Bounded twice, oldest out first: per subject (a guest's flood evicts only its own
        tokens) and in subjects (which only the inventory's churn adds, never a guest)."""
        if known is None:
            if len(self._verified) >= _VERIFIED_SUBJECTS:
                del self._verified[next(iter(self._verified))]
            known = self._verified[subject] = {}
        elif len(known) >= _VERIFIED_PER_SUBJECT:
            del known[next(iter(known))]
        known[token] = expiry

    def _check(self, token: str, subject: bytes) -> int | None:
        if len(token) != _TOKEN_CHARS or not token.isascii():
            return None
        try:
            raw = base64.urlsafe_b64decode(token)
        except (binascii.Error, ValueError):
            return None
        # One spelling: the decoder also takes "+" and "/" (and ignores junk), so the token must
        # be exactly what encoding its bytes gives back.
        if len(raw) != _RAW_BYTES or base64.urlsafe_b64encode(raw).decode() != token:
            return None
        header, mac = raw[: _HEADER.size], raw[_HEADER.size :]
        version, expiry = _HEADER.unpack(header)
        if version != _VERSION:
            return None
        try:
            self._hmac(subject, header).verify(mac)
        except InvalidSignature:
            return None
        return int(expiry)

    def _hmac(self, subject: bytes, header: bytes) -> hmac.HMAC:
        self.macs += 1
        h = hmac.HMAC(self._key, hashes.SHA256())
        h.update(subject + b"\0" + header)
        return h


def subject(instance_id: str, incarnation: int) -> bytes:
    """What a token is bound to: one incarnation of one instance (ids are ASCII, no NUL)."""
    return instance_id.encode() + b"\0" + incarnation.to_bytes(8, "big")
