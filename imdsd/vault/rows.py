"""The vault's rows: what each one holds, each sealed on its own with AES-GCM.

One row per value that changes on its own: the token key, each instance's token subject and
launch time, each association's session, and the mark a clean stop leaves. A row is sealed
under the vault key with its own key as associated data, so a row copied under another key
(one instance's session under another's) no longer opens. Plain text exists only in memory,
in the thread that seals or opens a row. Never imports aiohttp.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imdsd.model import Session
from imdsd.sessions import Served

TOKENS = "token-key"  # the IMDSv2 token MAC key
STOPPED = "stopped"  # present only after a clean stop: the last seal is the newest state
SESSION = "session/"  # + instance id
INSTANCE = "instance/"  # + instance id
_AAD = b"imdsd vault 2\0"  # + the row's key
_NONCE = 12  # random per row: ~40,000 seals a day at 10,000 sessions is far from AES-GCM's limit
# A worker thread sealing thousands of rows holds the GIL; the interpreter forces a switch to
# the loop that serves the guests only after 5 ms (sys.getswitchinterval()). Pausing every few
# rows (~0.5 ms of work) lets the loop take it at once: its wait stays well under that.
PACE_ROWS = 24
PAUSE_SECONDS = 0.0001
T = TypeVar("T")


@dataclass(slots=True)
class Snapshot:
    """What a restart takes over."""

    token_key: bytes = field(repr=False)
    subjects: dict[str, bytes] = field(default_factory=dict)  # instance id -> token subject
    launched: dict[str, datetime] = field(default_factory=dict)
    sessions: dict[str, tuple[str, Session]] = field(default_factory=dict, repr=False)  # role
    # The served sessions restore() made of these, by identity: the first seal rewrites none
    # of them unless it was replaced since.
    restored: dict[str, Served] = field(default_factory=dict, repr=False, compare=False)


def paced(items: Iterable[T]) -> Iterator[T]:
    """The items, with a short sleep (the GIL let go) after every PACE_ROWS of them."""
    for n, item in enumerate(items, 1):
        yield item
        if n % PACE_ROWS == 0:
            time.sleep(PAUSE_SECONDS)


def seal(aead: AESGCM, key: str, plain: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    return nonce + aead.encrypt(nonce, plain, _AAD + key.encode())


def unseal(aead: AESGCM, key: str, sealed: bytes) -> bytes:
    """The row's plain text; InvalidTag if it was changed, moved or sealed under another key."""
    return aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], _AAD + key.encode())


def session_row(role_arn: str, session: Session, issuing: str) -> bytes:
    """A session, the role it belongs to and the digest of the configuration that issued it."""
    return json.dumps(
        {"role": role_arn, "issuing": issuing, **plain_session(session)}, separators=(",", ":")
    ).encode()


def instance_row(subject: bytes, launched: datetime) -> bytes:
    plain = {"subject": base64.b64encode(subject).decode(), "launched": launched.isoformat()}
    return json.dumps(plain, separators=(",", ":")).encode()


def plain_session(x: Session) -> dict[str, str]:
    return {
        "id": x.access_key_id,
        "secret": x.secret_access_key,
        "token": x.token,
        "issued": x.issued_at.isoformat(),
        "expires": x.expiration.isoformat(),
    }


def read_session(x: dict[str, str]) -> Session:
    return Session(
        access_key_id=x["id"],
        secret_access_key=x["secret"],
        token=x["token"],
        issued_at=datetime.fromisoformat(x["issued"]),
        expiration=datetime.fromisoformat(x["expires"]),
    )


@dataclass(slots=True)
class Read:
    """What the rows of a vault say: the snapshot to take over, and about it."""

    snapshot: Snapshot
    foreign: int  # sessions issued under another configuration (not in the snapshot)
    stopped: bool  # the previous process stopped cleanly (its last seal is its last state)


def read(plain: dict[str, bytes], issuing: str) -> Read:
    """The opened rows as a snapshot; ValueError/KeyError/TypeError if they do not make one."""
    token_key = plain.pop(TOKENS)
    if len(token_key) != 32:
        raise ValueError("token key")
    taken, foreign = Snapshot(token_key=token_key), 0
    stopped = plain.pop(STOPPED, None) is not None
    for key, value in plain.items():
        kind, _, iid = key.partition("/")
        d = json.loads(value)
        if kind + "/" == INSTANCE:
            taken.subjects[iid] = base64.b64decode(d["subject"], validate=True)
            taken.launched[iid] = datetime.fromisoformat(d["launched"])
        elif kind + "/" == SESSION and d["issuing"] == issuing:
            taken.sessions[iid] = (d["role"], read_session(d))
        elif kind + "/" == SESSION:
            foreign += 1
        else:
            raise ValueError("unknown row")
    return Read(taken, foreign, stopped)
