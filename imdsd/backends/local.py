"""The embedded issuer: STS-shaped sessions minted without any network.

AccessKeyId `ASIA` + 16 of [A-Z2-7]; a 40-character SecretAccessKey; a session token that is an
AES-GCM sealed record (access key id, role ARN, session name, issue and expiry time) under the
configured key or one generated at start, so whoever holds the key can verify a token: base64 of
the version byte 1, a 12-byte nonce and the sealed JSON record, the version byte as associated
data. Nothing here reads tokens back: the key holder does, with any AES-GCM implementation.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imdsd.clock import Clock
from imdsd.config.backend import BackendConfig
from imdsd.model import InstanceProfile, Session

_TOKEN_VERSION = b"\x01"
_NONCE_BYTES = 12
_SECRET_BYTES = 30
_KEY_ID_CHARACTERS = 16
# byte -> one of the 32 characters of an access key id (256 is a multiple of 32: uniform)
_KEY_ID_ALPHABET = bytes(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[b % 32] for b in range(256))


class LocalIssuer:
    """Issues sessions of `lifetime`, sealing each token with AES-GCM."""

    def __init__(self, key: bytes, lifetime: timedelta, clock: Clock) -> None:
        self._aead = AESGCM(key)
        self._lifetime = lifetime
        self._clock = clock

    def __repr__(self) -> str:
        return f"LocalIssuer(lifetime={self._lifetime}, key=<hidden>)"

    async def issue(self, profile: InstanceProfile, *, session_name: str) -> Session:
        issued = self._clock.now().replace(microsecond=0)
        expiration = issued + self._lifetime
        raw = secrets.token_bytes(_KEY_ID_CHARACTERS + _SECRET_BYTES + _NONCE_BYTES)  # one read
        key_id, secret = raw[:_KEY_ID_CHARACTERS], raw[_KEY_ID_CHARACTERS:-_NONCE_BYTES]
        access_key_id = "ASIA" + key_id.translate(_KEY_ID_ALPHABET).decode()
        record = {
            "AccessKeyId": access_key_id,
            "RoleArn": profile.role.arn,
            "RoleSessionName": session_name,
            "IssuedAt": int(issued.timestamp()),
            "Expiration": int(expiration.timestamp()),
        }
        return Session(
            access_key_id=access_key_id,
            secret_access_key=base64.b64encode(secret).decode(),
            token=self._seal(record, raw[-_NONCE_BYTES:]),
            expiration=expiration,
            issued_at=issued,
        )

    def _seal(self, record: dict[str, Any], nonce: bytes) -> str:
        sealed = self._aead.encrypt(nonce, json.dumps(record).encode(), _TOKEN_VERSION)
        return base64.b64encode(_TOKEN_VERSION + nonce + sealed).decode()


@asynccontextmanager
async def open_backend(config: BackendConfig, clock: Clock) -> AsyncIterator[LocalIssuer]:
    """The local issuer for the configured lifetime and key (a fresh 256-bit key if none)."""
    key = config.local.key or AESGCM.generate_key(bit_length=256)
    yield LocalIssuer(key, config.local.lifetime, clock)
