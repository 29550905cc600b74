"""Invariant 8 (a restart costs no upstream call for sessions that are still good) and 4 (the
vault holds secrets sealed, never in clear): the warm-restart vault."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from imdsd.backends.base import Backend
from imdsd.config.backend import BackendConfig, LocalBackendConfig, StsBackendConfig
from imdsd.daemon import running
from imdsd.imds import render
from imdsd.inventory import Inventory
from imdsd.model import Session
from imdsd.sessions import SessionCache
from imdsd.tokens import TokenIssuer
from imdsd.vault import FILE_NAME, KEY_NAME, Snapshot, Vault, issuing, sealing, vault_key
from imdsd.vault.rows import session_row
from imdsd.vault.store import DROPPED, Rows
from tests.fakes import START, FakeClock, FlakyBackend, wrapping
from tests.helpers import ROLE_A, VM_A, VM_B, http, make_config, token_for

SESSION = Session(access_key_id="ASIAEXAMPLEEXAMPLE00", secret_access_key="s" * 40,
                  token="t0ken-sealed-not-in-clear", issued_at=START, expiration=START + timedelta(hours=6))  # fmt: skip
LOCAL = BackendConfig()
SNAPSHOT = Snapshot(token_key=b"k" * 32, subjects={VM_A: b"i-0a\x00x"}, launched={VM_A: START},
                    sessions={VM_A: ("arn:aws:iam::111111111111:role/role-a", SESSION)})  # fmt: skip


def test_round_trip_and_nothing_in_clear(tmp_path: Path) -> None:
    """What is saved loads back equal; neither the file nor its WAL (after a row changed)
    holds a secret in any form, and the file, its WAL and the key are 0600."""
    key = vault_key(tmp_path / KEY_NAME)
    vault = Vault(tmp_path, key, LOCAL)
    vault.save(SNAPSHOT)
    assert vault.load() == SNAPSHOT
    vault.commit({"session/" + VM_B: session_row(ROLE_A, SESSION, vault.issuing)})
    wal = tmp_path / (FILE_NAME + "-wal")
    sealed = (tmp_path / FILE_NAME).read_bytes() + wal.read_bytes()
    for secret in (SESSION.secret_access_key, SESSION.token, "k" * 32):
        for form in (secret.encode(), base64.b64encode(secret.encode())):
            assert form not in sealed
    for path in (tmp_path / FILE_NAME, wal, tmp_path / KEY_NAME):
        assert path.stat().st_mode & 0o777 == 0o600, path
    vault.close()
    assert not wal.exists()  # checkpointed into the file at close
    assert Vault(tmp_path, key, LOCAL).load() == replace(
        SNAPSHOT, sessions={**SNAPSHOT.sessions, VM_B: (ROLE_A, SESSION)}
    )


def flip_in_row(path: Path, key: str) -> None:
    """Flip one bit in the middle of a row's sealed bytes, where it sits in the file."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        (blob,) = db.execute("SELECT sealed FROM rows WHERE key = ?", (key,)).fetchone()
    data = bytearray(path.read_bytes())
    at = data.find(blob) + len(blob) // 2
    data[at] ^= 1
    path.write_bytes(bytes(data))


def swap_rows(path: Path, one: str, other: str) -> None:
    """Exchange two rows' sealed bytes (VM A's session under B's key and back)."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        blobs = dict(db.execute("SELECT key, sealed FROM rows WHERE key IN (?, ?)", (one, other)))
        db.execute("UPDATE rows SET sealed = ? WHERE key = ?", (blobs[other], one))
        db.execute("UPDATE rows SET sealed = ? WHERE key = ?", (blobs[one], other))


@pytest.mark.parametrize(
    "damage", ["flip", "swap", "truncate", "truncate-tail", "other-key", "garbage", "no-rows"]
)
def test_damaged_vault_is_ignored_with_one_warning(tmp_path: Path, damage: str) -> None:
    """A row changed or moved under another instance's key, a file truncated, sealed under
    another key, not a vault at all, or an SQLite file of something else: load() gives None
    (a cold start) and says so once, without the file's contents; the next seal replaces it."""
    two = replace(SNAPSHOT, sessions={**SNAPSHOT.sessions, VM_B: (ROLE_A, SESSION)})
    Vault(tmp_path, b"a" * 32, LOCAL).save(two)
    path = tmp_path / FILE_NAME
    if damage == "flip":
        flip_in_row(path, "session/" + VM_A)
    elif damage == "swap":
        swap_rows(path, "session/" + VM_A, "session/" + VM_B)
    elif damage.startswith("truncate"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-10])
    elif damage == "garbage":
        path.write_bytes(b"not a vault")
    elif damage == "no-rows":
        path.unlink()
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("CREATE TABLE rows (key TEXT PRIMARY KEY, sealed BLOB NOT NULL)")
    key = b"b" * 32 if damage == "other-key" else b"a" * 32
    vault = Vault(tmp_path, key, LOCAL)
    with capture_logs() as logs:
        assert vault.load() is None
    assert [e["event"] for e in logs] == [
        "vault tampered with, truncated or sealed under another key; starting cold"
    ]
    assert vault.held is None  # the first seal writes a whole new file over it
    vault.save(SNAPSHOT)
    assert Vault(tmp_path, key, LOCAL).load() == SNAPSHOT


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
    async with running(config, clock, open_backend=wrapping(counted)) as daemon:
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
    async with running(config, clock, open_backend=wrapping(counted)) as daemon:
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
    async with running(config, clock, open_backend=wrapping(counted)) as daemon:
        assert sorted(calls[-1].names) == sorted([VM_A, VM_B])


async def test_keep_tokens_false_kills_guest_tokens_but_keeps_sessions(clock: FakeClock) -> None:
    """[state] keep_tokens = false: after a restart the sessions are still served with no
    issuer call, but a token minted before is refused (401) and a new one works."""
    config = make_config()
    config = replace(config, host=replace(config.host, keep_tokens=False))
    calls, counted = counting()
    creds = "/latest/meta-data/iam/security-credentials/role-b"
    async with running(config, clock, open_backend=wrapping(counted)) as daemon:
        token = await token_for(daemon.urls[0], "127.0.0.3")
    async with running(config, clock, open_backend=wrapping(counted)) as daemon:
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


STS = BackendConfig(kind="sts")


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (LOCAL, STS),
        (LOCAL, replace(LOCAL, local=LocalBackendConfig(key=b"1" * 32))),
        (LOCAL, replace(LOCAL, local=LocalBackendConfig(lifetime=timedelta(hours=1)))),
        (STS, replace(STS, sts=StsBackendConfig(region="eu-west-1"))),
        (STS, replace(STS, sts=StsBackendConfig(endpoint_url="https://sts.example.test"))),
        (STS, replace(STS, sts=StsBackendConfig(profile="other-account"))),
        (STS, replace(STS, sts=StsBackendConfig(duration=timedelta(hours=1)))),
        (STS, replace(STS, sts=StsBackendConfig(session_scope="profile"))),
        (STS, replace(STS, sts=StsBackendConfig(session_tags=("instance_id",)))),
        (STS, replace(STS, sts=StsBackendConfig(source_identity="imdsd"))),
    ],
)
def test_issuing_digest_names_what_makes_a_session(
    before: BackendConfig, after: BackendConfig
) -> None:
    """Another backend, issuer key, lifetime, endpoint, region, host profile, duration, scope,
    session tags or source identity is another issuing configuration."""
    assert issuing(before) != issuing(after)


def test_issuing_digest_ignores_what_does_not_make_a_session() -> None:
    """The same configuration gives the same digest (for a local issuer with no key too: it
    has none to tell apart); the sts timeout, or the sts section of a local backend, does not
    change it; another local key does, and the digest shows no form of either key."""
    one, two = b"1" * 32, b"2" * 32
    assert issuing(BackendConfig()) == issuing(LOCAL)
    assert issuing(replace(STS, sts=StsBackendConfig(timeout=timedelta(seconds=3)))) == issuing(STS)
    assert issuing(replace(LOCAL, sts=StsBackendConfig(region="eu-west-1"))) == issuing(LOCAL)
    keyed = [issuing(replace(LOCAL, local=LocalBackendConfig(key=k))) for k in (one, two)]
    assert keyed[0] != keyed[1]
    for digest, key in zip(keyed, (one, two), strict=True):
        assert key.hex() not in digest and base64.b64encode(key).decode() not in digest


def test_sessions_of_another_issuing_configuration_are_dropped(tmp_path: Path) -> None:
    """A vault sealed under another issuing configuration gives its token key, incarnations
    and launch times but no session, and says so in one info line with the count."""
    Vault(tmp_path, b"a" * 32, LOCAL).save(SNAPSHOT)
    with capture_logs() as logs:
        taken = Vault(tmp_path, b"a" * 32, STS).load()
    assert taken == replace(SNAPSHOT, sessions={})
    assert [(e["event"], e["log_level"], e["dropped"]) for e in logs] == [(DROPPED, "info", 1)]


async def test_restart_under_another_issuer_key_issues_sessions_anew(clock: FakeClock) -> None:
    """A restart on the same state with another local issuer key serves none of the sessions
    the previous key issued: A and B get new ones from the new issuer at start, while guests'
    tokens (not the issuer's) still verify."""
    config = make_config()
    keyed = replace(
        config, backend=replace(config.backend, local=LocalBackendConfig(key=b"1" * 32))
    )
    calls, counted = counting()
    creds = "/latest/meta-data/iam/security-credentials/role-b"
    async with running(config, clock, open_backend=wrapping(counted)) as daemon:
        token = await token_for(daemon.urls[0], "127.0.0.3")
        before = json.loads((await http(daemon.urls[0], creds, source="127.0.0.3",
                                        headers={"X-aws-ec2-metadata-token": token})).body)  # fmt: skip
    async with running(keyed, clock, open_backend=wrapping(counted)) as daemon:
        after = await http(daemon.urls[0], creds, source="127.0.0.3",
                           headers={"X-aws-ec2-metadata-token": token})  # fmt: skip
        assert sorted(calls[-1].names) == sorted([VM_A, VM_B])
        assert after.status == 200
        assert json.loads(after.body)["AccessKeyId"] != before["AccessKeyId"]
    async with running(keyed, clock, open_backend=wrapping(counted)) as daemon:
        assert calls[-1].calls == 0  # the same configuration again: warm


class SlowVault(Vault):
    """A vault whose seals in a worker thread wait for `release` before writing: a seal still
    running when the shutdown seal starts, which a real disk gives only by chance."""

    def __init__(self, directory: Path, key: bytes) -> None:
        super().__init__(directory, key, LOCAL)
        self.waiting, self.release, self.written = (threading.Event() for _ in range(3))

    def commit(self, rows: Rows, *, whole: bool = False) -> int:
        if threading.current_thread() is threading.main_thread():
            return super().commit(rows, whole=whole)
        self.waiting.set()
        self.release.wait(10)
        written = super().commit(rows, whole=whole)
        self.written.set()
        return written


async def test_shutdown_seal_waits_for_a_seal_in_progress(tmp_path: Path, clock: FakeClock) -> None:
    """The last seal at shutdown starts only once a worker thread's seal still in progress has
    finished, so the vault left behind loads and holds the newest state, not the worker's
    older snapshot (here: a session dropped after the worker took its snapshot stays gone)."""
    config = make_config()
    inventory = Inventory(config.instances, config.profiles, config.associations, clock)
    sessions = SessionCache(render.credentials, render.failure, render.read_credentials)
    for vm in (VM_A, VM_B):
        association = inventory.association(vm)
        assert association is not None
        sessions.store(vm, SESSION, association.profile.role)
    vault = SlowVault(tmp_path, b"a" * 32)

    async def release_later() -> None:  # a shutdown that waits for the worker lets this run
        await asyncio.sleep(0.3)
        vault.release.set()

    async with sealing(vault, inventory, sessions, TokenIssuer(clock), every=0.01):
        assert await asyncio.to_thread(vault.waiting.wait, 10)
        sessions.drop(VM_B)
        releaser = asyncio.create_task(release_later())
    vault.release.set()  # a shutdown that did not wait: the worker writes only now
    assert await asyncio.to_thread(vault.written.wait, 10)
    await releaser
    taken = Vault(tmp_path, b"a" * 32, LOCAL).load()
    assert taken is not None and sorted(taken.sessions) == [VM_A]
