"""Invariant 8 (a restart costs no upstream call for sessions that are still good) and 4 (the
vault holds secrets sealed, never in clear): the warm-restart vault."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from imdsd.backends.base import Backend
from imdsd.daemon import running
from imdsd.model import Session
from imdsd.vault import FILE_NAME, KEY_NAME, Snapshot, Vault, vault_key
from tests.fakes import START, FakeClock, FlakyBackend
from tests.helpers import VM_A, VM_B, http, make_config, token_for

SESSION = Session(access_key_id="ASIAEXAMPLEEXAMPLE00", secret_access_key="s" * 40,
                  token="t0ken-sealed-not-in-clear", issued_at=START, expiration=START + timedelta(hours=6))  # fmt: skip
SNAPSHOT = Snapshot(token_key=b"k" * 32, subjects={VM_A: b"i-0a\x00x"}, launched={VM_A: START},
                    sessions={VM_A: ("arn:aws:iam::111111111111:role/role-a", SESSION)})  # fmt: skip


def test_round_trip_and_nothing_in_clear(tmp_path: Path) -> None:
    """What is saved loads back equal; the file holds no secret in any form, and the file and
    its key are 0600."""
    vault = Vault(tmp_path, vault_key(tmp_path / KEY_NAME))
    vault.save(SNAPSHOT)
    assert vault.load() == SNAPSHOT
    sealed = (tmp_path / FILE_NAME).read_bytes()
    for secret in (SESSION.secret_access_key, SESSION.token, "k" * 32):
        for form in (secret.encode(), base64.b64encode(secret.encode())):
            assert form not in sealed
    assert (tmp_path / FILE_NAME).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / KEY_NAME).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("damage", ["flip", "truncate", "other-key", "garbage"])
def test_damaged_vault_is_ignored_with_one_warning(tmp_path: Path, damage: str) -> None:
    """Tampered with, truncated, sealed under another key, or not a vault at all: load() gives
    None (a cold start) and says so once, without the file's contents."""
    Vault(tmp_path, b"a" * 32).save(SNAPSHOT)
    path = tmp_path / FILE_NAME
    sealed = bytearray(path.read_bytes())
    if damage == "flip":
        sealed[40] ^= 1
    elif damage == "truncate":
        sealed = sealed[:-10]
    elif damage == "garbage":
        sealed = bytearray(b"not a vault")
    path.write_bytes(bytes(sealed))
    key = b"b" * 32 if damage == "other-key" else b"a" * 32
    with capture_logs() as logs:
        assert Vault(tmp_path, key).load() is None
    assert [e["event"] for e in logs] == [
        "vault tampered with, truncated or sealed under another key; starting cold"
    ]


def test_key_file_forms(tmp_path: Path) -> None:
    """The key file holds 32 raw bytes or their base64 (a systemd credential is often text);
    anything else is refused."""
    (tmp_path / "b64").write_text(base64.b64encode(b"z" * 32).decode() + "\n")
    assert vault_key(tmp_path / "b64") == b"z" * 32
    (tmp_path / "short").write_bytes(b"short")
    with pytest.raises(ValueError):
        vault_key(tmp_path / "short")


def counting() -> tuple[list[FlakyBackend], Callable[[Backend], Backend]]:
    """A backend wrapper for running(): each start's issuer, counted, is appended to the list."""
    calls: list[FlakyBackend] = []

    def counted(backend: Backend) -> Backend:
        calls.append(FlakyBackend(backend))
        return calls[-1]

    return calls, counted


async def test_warm_restart_in_process(clock: FakeClock) -> None:
    """Stop, move the clock 2 h 40 min, start again on the same state: A and B are served the
    sessions they had with no issuer call, a guest's token minted before still works and
    pendingTime has not moved; at 5 h 40 min the sessions have less than min_remaining left,
    so the next start issues new ones."""
    config = make_config()
    calls, counted = counting()
    creds = "/latest/meta-data/iam/security-credentials/role-b"
    async with running(config, clock, wrap_backend=counted) as daemon:
        url = daemon.urls[0]
        token = await token_for(url, "127.0.0.3")
        before = json.loads(
            (
                await http(
                    url, creds, source="127.0.0.3", headers={"X-aws-ec2-metadata-token": token}
                )
            ).body
        )
        document = (
            await http(url, "/latest/dynamic/instance-identity/document", source="127.0.0.2")
        ).body
    clock.advance(timedelta(hours=2, minutes=40))
    async with running(config, clock, wrap_backend=counted) as daemon:
        url = daemon.urls[0]
        after = await http(
            url, creds, source="127.0.0.3", headers={"X-aws-ec2-metadata-token": token}
        )
        assert calls[-1].calls == 0
        assert (
            after.status == 200 and json.loads(after.body)["AccessKeyId"] == before["AccessKeyId"]
        )
        assert (
            await http(url, "/latest/dynamic/instance-identity/document", source="127.0.0.2")
        ).body == document
    clock.advance(timedelta(hours=3))
    async with running(config, clock, wrap_backend=counted) as daemon:
        assert sorted(calls[-1].names) == sorted([VM_A, VM_B])


async def test_keep_tokens_false_kills_guest_tokens_but_keeps_sessions(clock: FakeClock) -> None:
    """[state] keep_tokens = false: after a restart the sessions are still served with no
    issuer call, but a token minted before is refused (401) and a new one works."""
    config = make_config()
    config = replace(config, host=replace(config.host, keep_tokens=False))
    calls, counted = counting()
    creds = "/latest/meta-data/iam/security-credentials/role-b"
    async with running(config, clock, wrap_backend=counted) as daemon:
        token = await token_for(daemon.urls[0], "127.0.0.3")
    async with running(config, clock, wrap_backend=counted) as daemon:
        url = daemon.urls[0]
        old = await http(
            url, creds, source="127.0.0.3", headers={"X-aws-ec2-metadata-token": token}
        )
        fresh = await token_for(url, "127.0.0.3")
        new = await http(
            url, creds, source="127.0.0.3", headers={"X-aws-ec2-metadata-token": fresh}
        )
        assert (old.status, new.status, calls[-1].calls) == (401, 200, 0)


async def test_warm_restart_can_be_turned_off(clock: FakeClock) -> None:
    """[state] warm_restart = false: no vault is written, every start is cold."""
    config = make_config()
    config = replace(config, host=replace(config.host, warm_restart=False))
    async with running(config, clock):
        pass
    assert not (config.host.state_directory / FILE_NAME).exists()
