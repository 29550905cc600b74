"""IMDSv2 session tokens: stateless, MAC-bound to one instance, TTL 1..21600 seconds.

A token is base64url(version | expiry | HMAC-SHA256(key, instance id | expiry)). Nothing is
stored per token, so a flood of PUTs cannot grow memory; verified tokens are remembered in a
small bounded map so the request path does no cryptography for a token it has seen. The key
comes from the OS CSPRNG at start and never leaves this object. Never imports aiohttp.
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
_VERSION = 1
_HEADER = struct.Struct(">BQ")  # version, expiry (unix seconds)
_MAC_BYTES = 32
_RAW_BYTES = _HEADER.size + _MAC_BYTES
_TOKEN_CHARS = 4 * -(-_RAW_BYTES // 3)  # the base64 length; any other string is not a token
_VERIFIED_MAX = 4096


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
        self._verified: dict[tuple[str, str], int] = {}

    def __repr__(self) -> str:
        return "TokenIssuer(key=<hidden>)"

    def mint(self, instance_id: str, ttl_seconds: int) -> str:
        """A token for this instance that expires ttl_seconds from now."""
        expiry = int(self._clock.now().timestamp()) + ttl_seconds
        header = _HEADER.pack(_VERSION, expiry)
        raw = header + self._mac(instance_id, header)
        return base64.urlsafe_b64encode(raw).decode()

    def verify(self, token: str, instance_id: str) -> bool:
        """True when the token was minted for this instance by this daemon and is unexpired."""
        now = self._clock.now().timestamp()
        expiry = self._verified.get((token, instance_id))
        if expiry is not None:
            return now < expiry
        expiry = self._check(token, instance_id)
        if expiry is None:
            return False
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified[(token, instance_id)] = expiry
        return now < expiry

    def _check(self, token: str, instance_id: str) -> int | None:
        if len(token) != _TOKEN_CHARS or not token.isascii():
            return None
        try:  # strict: one spelling per token, no junk after the padding
            raw = base64.b64decode(token, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            return None
        header, mac = raw[: _HEADER.size], raw[_HEADER.size :]
        version, expiry = _HEADER.unpack(header)
        if version != _VERSION:
            return None
        h = self._hmac(instance_id, header)
        try:
            h.verify(mac)
        except InvalidSignature:
            return None
        return int(expiry)

    def _mac(self, instance_id: str, header: bytes) -> bytes:
        return self._hmac(instance_id, header).finalize()

    def _hmac(self, instance_id: str, header: bytes) -> hmac.HMAC:
        h = hmac.HMAC(self._key, hashes.SHA256())
        h.update(instance_id.encode() + b"\0" + header)
        return h
