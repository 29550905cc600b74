"""Invariant 8: the metadata API answers from the first second, whatever the upstream does."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web

from imdsd.model import RotationPolicy
from imdsd.vault import VAULT_SECONDS
from tests.backends.sts.upstream import ROLE_A, FaultySts
from tests.helpers import host_sections, http, token_for
from tests.process import Proc

pytestmark = pytest.mark.slow  # 500-instance daemon processes against a stalling upstream

INSTANCES = 500
HEAD = """
[imds]
listeners = ["127.0.0.1:0"]
{host}
[log]
level = "info"
[rotation]
startup_deadline = "5s"
max_rate = {max_rate}
[backend]
kind = "sts"
[backend.sts]
region = "us-east-1"
endpoint_url = "{endpoint}"
timeout = "10s"
[[instance_profiles]]
name = "profile-a"
role_arn = "{role}"
"""
INSTANCE = """
[[instances]]
id = "i-{n:017x}"
addresses = ["127.0.{high}.{low}"]
metadata_options = {{ http_tokens = "optional" }}
[[associations]]
instance = "i-{n:017x}"
profile = "profile-a"
"""


# From spawning the process: the interpreter and imports come first (slower still under the
# coverage tracing that make test runs child processes with).
SPAWN_SECONDS = 3.0
# Every queued AssumeRole passing through moto after the stall: a few seconds here, more than
# 30 s on a fresh CI machine under coverage.
RECOVERY_SECONDS = 180.0


def since_listening(daemon: Proc) -> float:
    """Seconds since the daemon logged that its listeners are open (its own clock: UTC)."""
    stamp = next(e["timestamp"] for e in daemon.events() if e.get("event") == "listening")
    return time.time() - datetime.fromisoformat(str(stamp)).timestamp()


def config(directory: Path, endpoint: str, max_rate: int = 1000) -> str:
    text = HEAD.format(host=host_sections(directory, metrics=""), endpoint=endpoint, role=ROLE_A,
                       max_rate=max_rate)  # fmt: skip
    for n in range(INSTANCES):
        text += INSTANCE.format(n=n + 1, high=1 + n // 250, low=1 + n % 250)
    return text


async def test_guests_are_answered_within_a_second_while_the_upstream_stalls(
    tmp_path: Path, host_env: dict[str, str], proxy: FaultySts
) -> None:
    """500 sts instances, an upstream that stalls every AssumeRole for 15 s, timeout 10 s:
    within a second of the process starting, a guest gets its instance-id and HTTP 200 with
    EC2's failure document for its role (CredentialsPending); READY waits for the start-up
    deadline, not for the upstream; once the upstream answers, the guest gets credentials."""
    proxy.mode, proxy.stall_seconds = "stall", 15.0
    started = time.monotonic()
    daemon = await asyncio.to_thread(Proc, tmp_path, config(tmp_path, proxy.url), until="listening")
    role_path = "/latest/meta-data/iam/security-credentials/" + ROLE_A.rsplit("/", 1)[1]
    first = "127.0.1.1"

    async def answers() -> tuple[str, str]:
        identity = await http(daemon.url, "/latest/meta-data/instance-id", source=first)
        role = await http(daemon.url, role_path, source=first)
        assert identity.status == role.status == 200
        return identity.text, json.loads(role.body)["Code"]

    try:
        assert await answers() == (f"i-{1:017x}", "CredentialsPending")
        assert since_listening(daemon) < 1.0 and time.monotonic() - started < SPAWN_SECONDS
        while proxy.in_flight < 8:  # the issuer's calls are stuck in the stall
            await asyncio.sleep(0.05)
        ready = await asyncio.to_thread(daemon.wait_for, "ready")  # the start-up deadline, 5 s
        assert time.monotonic() - started < 8.0
        late = [e for e in daemon.events() if str(e.get("event")).startswith("start-up deadline")]
        assert ready and late and late[0]["pending"] == INSTANCES
        assert await answers() == (f"i-{1:017x}", "CredentialsPending")
        proxy.mode = "pass"  # the stalled calls time out (10 s) and are retried
        # The first eight retry behind the 492 calls queued since the start (one FIFO of
        # `concurrency` slots): how long that takes is the machine's (moto, coverage), so the
        # bound is generous and the loop ends at the first Success.
        deadline = time.monotonic() + RECOVERY_SECONDS
        while (await answers())[1] != "Success" and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert (await answers())[1] == "Success"
    finally:
        await asyncio.to_thread(daemon.stop)


async def test_sigkill_and_restart_cost_the_upstream_nothing(
    tmp_path: Path, host_env: dict[str, str], proxy: FaultySts
) -> None:
    """Invariant 8: 500 sts instances through a counting proxy; SIGKILL, then a restart: no
    AssumeRole call at all, every guest served its session within a second of the restart,
    and a guest's token minted before the kill still accepted."""
    text = config(tmp_path, proxy.url)
    daemon = await asyncio.to_thread(Proc, tmp_path, text)  # until ready: every session primed
    assert sum(1 for f in proxy.seen if f.get("Action") == "AssumeRole") == INSTANCES
    first, last = "127.0.1.1", f"127.0.{1 + (INSTANCES - 1) // 250}.{1 + (INSTANCES - 1) % 250}"
    role_path = "/latest/meta-data/iam/security-credentials/" + ROLE_A.rsplit("/", 1)[1]
    token = await token_for(daemon.url, first)
    before = json.loads((await http(daemon.url, role_path, source=first)).body)
    # Everything was primed before "ready", and the vault re-seals within VAULT_SECONDS of a
    # change: a seal after this instant, or none in VAULT_SECONDS (the last one came after the
    # last change), means the vault holds every session. (Waiting for a new seal alone hung
    # when the last seal landed between "ready" and here: nothing changes after it.)
    sealed_after = time.time()
    vault = tmp_path / "state" / "sessions.sealed"
    while not (vault.exists() and vault.stat().st_mtime > sealed_after):
        if time.time() > sealed_after + VAULT_SECONDS + 1:
            break
        await asyncio.sleep(0.2)
    assert vault.exists()
    daemon.process.kill()
    daemon.process.wait()
    calls = len(proxy.seen)
    started = time.monotonic()
    again = await asyncio.to_thread(Proc, tmp_path, text, until="listening")
    try:
        reply = await http(
            again.url, role_path, source=first, headers={"X-aws-ec2-metadata-token": token}
        )
        assert (
            reply.status == 200 and json.loads(reply.body)["AccessKeyId"] == before["AccessKeyId"]
        )
        assert since_listening(again) < 1.0 and time.monotonic() - started < SPAWN_SECONDS
        assert json.loads((await http(again.url, role_path, source=last)).body)["Code"] == "Success"
        await asyncio.to_thread(again.wait_for, "ready")
        assert len(proxy.seen) == calls  # not one upstream call
    finally:
        await asyncio.to_thread(again.stop)


async def test_priming_stays_under_the_rate_cap(
    tmp_path: Path, host_env: dict[str, str], proxy: FaultySts
) -> None:
    """500 sts instances with rotation.max_rate = 100: the counting proxy sees priming take at
    least 4 s, and no second holds more than 100 calls plus the one-second burst (give or take
    the calls in flight: the proxy sees arrivals, which trail the daemon's permits by up to
    `rotation.concurrency` calls)."""
    daemon = await asyncio.to_thread(Proc, tmp_path, config(tmp_path, proxy.url, max_rate=100))
    try:
        times = sorted(proxy.times)
        assert len(times) == INSTANCES
        assert times[-1] - times[0] >= (INSTANCES - 100) / 100 - 0.1
        busiest = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
        assert busiest <= 200 + RotationPolicy().concurrency, busiest
    finally:
        await asyncio.to_thread(daemon.stop)


async def test_listeners_answer_while_the_host_credentials_load(
    tmp_path: Path, host_env: dict[str, str], proxy: FaultySts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant 8 when the host's own credentials are behind the network: botocore's chain
    gets them from a container credentials endpoint (a small server on loopback) that answers
    after 1.5 s. The daemon logs `listening` and a guest gets EC2's failure document
    (CredentialsPending) before that endpoint has answered; then its credentials arrive."""
    answered: list[float] = []
    expires = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def slow_credentials(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        answered.append(time.time())
        return web.json_response({  # the host user's keys; an empty token is sent as none
            "AccessKeyId": host_env["AWS_ACCESS_KEY_ID"],
            "SecretAccessKey": host_env["AWS_SECRET_ACCESS_KEY"],
            "Token": "",
            "Expiration": expires,
        })  # fmt: skip

    app = web.Application()
    app.router.add_get("/credentials", slow_credentials)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{port}/credentials")
    daemon = await asyncio.to_thread(Proc, tmp_path, config(tmp_path, proxy.url), until="listening")
    role_path = "/latest/meta-data/iam/security-credentials/" + ROLE_A.rsplit("/", 1)[1]
    try:
        reply = await http(daemon.url, role_path, source="127.0.1.1")
        assert reply.status == 200 and json.loads(reply.body)["Code"] == "CredentialsPending"
        assert not answered  # the guest was answered before the host had its credentials
        for _ in range(100):
            reply = await http(daemon.url, role_path, source="127.0.1.1")
            if json.loads(reply.body)["Code"] == "Success":
                break
            await asyncio.sleep(0.1)
        assert json.loads(reply.body)["Code"] == "Success" and answered
    finally:
        await asyncio.to_thread(daemon.stop)
        await runner.cleanup()
