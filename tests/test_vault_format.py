"""Invariant 8 across the upgrade: the previous version's single sealed file is taken over once
and rewritten in the new format by the first seal; a damaged one is a cold start like any."""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from structlog.testing import capture_logs

from imdsd.imds import render
from imdsd.inventory import Inventory
from imdsd.sessions import SessionCache
from imdsd.tokens import TokenIssuer
from imdsd.vault import FILE_NAME, Snapshot, Vault, issuing, restore
from imdsd.vault.database import HEADER
from imdsd.vault.sealer import Sealer
from imdsd.vault.store import DROPPED
from tests.fakes import FakeClock
from tests.helpers import ROLE_A, VM_A, VM_B, make_config
from tests.test_vault import LOCAL, SESSION, SNAPSHOT, STS

KEY = b"a" * 32
MIGRATED = "vault of the previous version taken over; the first seal rewrites it in the new format"


def previous_version(path: Path, snapshot: Snapshot, digest: str | None) -> None:
    """The file as the previous version sealed it: one JSON document, one AES-GCM seal."""
    plain: dict[str, Any] = {
        "token_key": base64.b64encode(snapshot.token_key).decode(),
        "subjects": {i: base64.b64encode(v).decode() for i, v in snapshot.subjects.items()},
        "launched": {i: t.isoformat() for i, t in snapshot.launched.items()},
        "sessions": {
            i: {
                "role": role,
                "id": x.access_key_id,
                "secret": x.secret_access_key,
                "token": x.token,
                "issued": x.issued_at.isoformat(),
                "expires": x.expiration.isoformat(),
            }
            for i, (role, x) in snapshot.sessions.items()
        },
    }
    if digest is not None:
        plain["issuing"] = digest
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(KEY).encrypt(nonce, json.dumps(plain).encode(), b"imdsd vault 1")
    path.write_bytes(nonce + sealed)


def test_the_previous_format_is_taken_over_and_rewritten(tmp_path: Path, clock: FakeClock) -> None:
    """The previous version's file loads as it did (one info line), the sessions are served
    from it, and the first seal replaces it with the new format holding the same state."""
    previous_version(tmp_path / FILE_NAME, SNAPSHOT, issuing(LOCAL))
    vault = Vault(tmp_path, KEY, LOCAL)
    with capture_logs() as logs:
        taken = vault.load()
    assert taken == SNAPSHOT and [e["event"] for e in logs] == [MIGRATED]
    config = make_config()
    inventory = Inventory(config.instances, config.profiles, config.associations, clock,
                          remembered=(taken.subjects, taken.launched))  # fmt: skip
    sessions = SessionCache(render.credentials, render.failure, render.read_credentials)
    restore(taken, inventory, sessions, clock)
    served = sessions.get(VM_A)
    assert served is not None and served.session == SESSION
    sealer = Sealer(vault, inventory, sessions, TokenIssuer(clock, taken.token_key))
    assert sealer.seal(sealer.take())
    vault.close()
    assert (tmp_path / FILE_NAME).read_bytes().startswith(HEADER)
    again = Vault(tmp_path, KEY, LOCAL).load()
    assert again is not None and again.sessions == {VM_A: (ROLE_A, SESSION)}
    assert again.token_key == SNAPSHOT.token_key
    assert again.subjects[VM_A] == SNAPSHOT.subjects[VM_A]


@pytest.mark.parametrize("digest", [None, "another configuration's digest"])
def test_previous_format_sessions_of_another_configuration_are_dropped(
    tmp_path: Path, digest: str | None
) -> None:
    """A previous-version file sealed under another issuing configuration, or before sessions
    carried the digest (nothing tells which issued them), gives its token key, incarnations and
    launch times but no session, and says so."""
    previous_version(tmp_path / FILE_NAME, SNAPSHOT, digest)
    with capture_logs() as logs:
        taken = Vault(tmp_path, KEY, LOCAL).load()
    assert taken == replace(SNAPSHOT, sessions={})
    assert [(e["event"], e.get("dropped")) for e in logs] == [(MIGRATED, None), (DROPPED, 1)]


def test_a_damaged_previous_format_is_a_cold_start(tmp_path: Path) -> None:
    """A previous-version file with one bit changed (or sealed under another key) is ignored
    with the one warning of any damaged vault."""
    previous_version(tmp_path / FILE_NAME, SNAPSHOT, issuing(LOCAL))
    data = bytearray((tmp_path / FILE_NAME).read_bytes())
    data[40] ^= 1
    (tmp_path / FILE_NAME).write_bytes(bytes(data))
    with capture_logs() as logs:
        assert Vault(tmp_path, KEY, LOCAL).load() is None
    assert [e["log_level"] for e in logs] == ["warning"]


def test_sessions_of_another_configuration_are_dropped_row_by_row(tmp_path: Path) -> None:
    """Each session row carries the digest of the configuration that issued it: a start under
    another one takes over none of them (one info line with the count), and the first seal
    removes their rows."""
    two = replace(SNAPSHOT, sessions={VM_A: (ROLE_A, SESSION), VM_B: (ROLE_A, SESSION)})
    Vault(tmp_path, KEY, LOCAL).save(two)
    vault = Vault(tmp_path, KEY, STS)
    with capture_logs() as logs:
        taken = vault.load()
    assert taken == replace(two, sessions={})
    assert [(e["event"], e["dropped"]) for e in logs] == [(DROPPED, 2)]
    assert vault.held is not None
    assert {f"session/{VM_A}", f"session/{VM_B}"} <= vault.held.rows
