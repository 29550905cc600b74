"""Signals while the upstream stalls: a reload is applied at once (invariant 9), and a stop
during a reload or during priming ends the daemon within the shutdown grace, vault sealed, no
traceback. The upstream accepts every AssumeRole and never answers (10 s timeout)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from imdsd.cli.client import request
from imdsd.daemon import SHUTDOWN_GRACE_SECONDS
from imdsd.vault import FILE_NAME as VAULT_FILE
from tests.fakes import StalledUpstream, sts_backend
from tests.helpers import ROLE_A, host_sections, http
from tests.process import Proc

pytestmark = pytest.mark.slow  # daemon processes against a stalled upstream

INSTANCES = 50
INSTANCE = """
[[instances]]
id = "i-{n:017x}"
addresses = ["127.2.0.{n}"]
metadata_options = {{ http_tokens = "optional" }}
[[associations]]
instance = "i-{n:017x}"
profile = "profile-a"
"""


def config(directory: Path, upstream: str, deadline: str, instances: int = INSTANCES) -> str:
    text = ('[imds]\nlisteners = ["127.0.0.1:0"]\n' + host_sections(directory, metrics="")
            + f'[rotation]\nstartup_deadline = "{deadline}"\n' + sts_backend(upstream)
            + f'[[instance_profiles]]\nname = "profile-a"\nrole_arn = "{ROLE_A}"\n')  # fmt: skip
    return text + "".join(INSTANCE.format(n=n) for n in range(1, instances + 1))


def stopped_cleanly(daemon: Proc, signalled: float) -> None:
    """Exit 0 within the grace + 1 s of the signal, the vault sealed after it, no traceback."""
    assert daemon.process.wait(timeout=30) == 0
    assert time.monotonic() - signalled <= SHUTDOWN_GRACE_SECONDS + 1.0
    vault = daemon.directory / "state" / VAULT_FILE
    assert vault.stat().st_mtime >= time.time() - (time.monotonic() - signalled) - 0.5
    text = daemon.log.read_text()
    assert "Traceback" not in text and "never retrieved" not in text, text
    assert not [e for e in daemon.events() if e.get("level") in ("error", "critical")]


async def test_a_reload_is_applied_at_once_while_the_upstream_stalls(
    tmp_path: Path, stalled: StalledUpstream, host_keys: None
) -> None:
    """SIGHUP adding an associated instance while every issue hangs: the reload completes
    (and the new instance is served, its role pending) at once, not after the issuer's
    timeout; a SIGTERM sent during the next reload still stops the daemon cleanly."""
    daemon = await asyncio.to_thread(Proc, tmp_path, config(tmp_path, stalled.url, "1s"))
    daemon.config.write_text(config(tmp_path, stalled.url, "1s", INSTANCES + 1))
    seen, signalled = len(daemon.events()), time.monotonic()
    daemon.process.send_signal(signal.SIGHUP)
    reloaded = await asyncio.to_thread(daemon.wait_for, "reloaded", seen)
    assert time.monotonic() - signalled < 2.0  # not the issuer's 10 s timeout (or several)
    assert reloaded["changed_associations"] == [f"i-{INSTANCES + 1:017x}"]
    new = f"127.2.0.{INSTANCES + 1}"
    credentials = "/latest/meta-data/iam/security-credentials/role-a"
    assert (await http(daemon.url, "/latest/meta-data/instance-id", source=new)).status == 200
    assert b"CredentialsPending" in (await http(daemon.url, credentials, source=new)).body
    assert stalled.calls > 0  # the issues really are hanging on the upstream
    daemon.process.send_signal(signal.SIGHUP)
    daemon.process.send_signal(signal.SIGTERM)
    stopped_cleanly(daemon, time.monotonic())


async def test_a_stop_during_priming_ends_within_the_grace(
    tmp_path: Path, stalled: StalledUpstream, host_keys: None
) -> None:
    """SIGTERM while priming waits on the stalled upstream (start-up deadline 60 s): the
    daemon stops within the shutdown grace + 1 s, says so, seals the vault, logs no
    traceback (no abandoned gather's CancelledError)."""
    daemon = await asyncio.to_thread(
        Proc, tmp_path, config(tmp_path, stalled.url, "60s"), until="listening"
    )
    while stalled.calls == 0:  # priming has reached the upstream
        await asyncio.sleep(0.02)
    signalled = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    await asyncio.to_thread(stopped_cleanly, daemon, signalled)
    assert "stopped during start-up" in {e.get("event") for e in daemon.events()}


async def test_a_stop_while_an_admin_verb_waits_on_the_upstream(
    tmp_path: Path, stalled: StalledUpstream, host_keys: None
) -> None:
    """An associate waiting on the stalled upstream for its session when SIGTERM comes: the
    daemon still stops within the grace + 1 s (the admin call is cut short, not waited out
    for the issuer's timeout), sealed and without a traceback."""
    text = (
        config(tmp_path, stalled.url, "1s")
        + INSTANCE.format(n=INSTANCES + 1).split("[[associations]]")[0]
    )
    daemon = await asyncio.to_thread(Proc, tmp_path, text)
    body = {"instance": f"i-{INSTANCES + 1:017x}", "profile": "profile-a"}
    waiting = asyncio.create_task(
        request(tmp_path / "admin.sock", "POST", "/v1/associations", body)
    )
    await asyncio.sleep(0.5)  # the call has reached the daemon, which waits on the upstream
    assert not waiting.done()  # the associate is waiting for its session
    signalled = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    await asyncio.to_thread(stopped_cleanly, daemon, signalled)
    await asyncio.gather(waiting, return_exceptions=True)
