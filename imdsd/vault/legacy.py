"""The previous version's vault: one file, the whole state in one AES-GCM seal.

Read once, at the first start of this version, and taken over like the new format (the
upgrade is the restart the vault exists for: dropping it would cost an upstream call per
session); the first seal then writes the new format over it. Never imports aiohttp.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imdsd.vault.rows import Snapshot, read_session

_AAD = b"imdsd vault 1"
_NONCE = 12


def read(sealed: bytes, aead: AESGCM) -> tuple[Snapshot, str | None]:
    """The snapshot and the digest of the configuration that issued its sessions (None if it
    predates the digest); InvalidTag, ValueError, KeyError or TypeError if unusable."""
    d: dict[str, Any] = json.loads(aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], _AAD))
    token_key = base64.b64decode(d["token_key"])
    if len(token_key) != 32:
        raise ValueError("token key")
    taken = Snapshot(
        token_key=token_key,
        subjects={iid: base64.b64decode(v) for iid, v in d["subjects"].items()},
        launched={iid: datetime.fromisoformat(t) for iid, t in d["launched"].items()},
        sessions={iid: (x["role"], read_session(x)) for iid, x in d["sessions"].items()},
    )
    return taken, d.get("issuing")
