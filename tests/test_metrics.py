"""/metrics, /healthz and /readyz on their own listener; parsed with prometheus-client's parser."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from imdsd.backends.base import Backend
from imdsd.config.reader import Listener
from imdsd.daemon import Daemon, running
from imdsd.errors import BackendError
from tests.fakes import FakeClock, FlakyBackend, wrapping
from tests.helpers import VM_A, VM_B, http, make_config, token_for


async def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert daemon.metrics_url is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(daemon.metrics_url + "/metrics") as reply,
    ):
        assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
        text = await reply.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


async def test_metrics_count_what_happened(
    daemon: Daemon, url: str, clock: FakeClock, flaky: list[FlakyBackend]
) -> None:
    """Requests by path class and status, tokens, sessions by state, the earliest expiry,
    rotations and failures by error class, upstream latency; no label carries a secret."""
    token = await token_for(url, "127.0.0.3")
    await http(url, "/latest/api/token", method="PUT", source="127.0.0.3")  # no TTL: refused
    await http(url, "/latest/meta-data/iam/security-credentials/role-b", source="127.0.0.3",
               headers={"X-aws-ec2-metadata-token": token})  # fmt: skip
    await http(url, "/latest/meta-data/instance-id", source="127.0.0.3")  # required: 401
    await http(url, "/nope", source="127.0.0.2")
    flaky[0].failing = BackendError("Throttling", "slow down")
    clock.advance(timedelta(hours=4))
    await asyncio.gather(*await daemon.rotator.wake())
    m = await scrape(daemon)
    assert m[("imdsd_requests_total", (("path", "token"), ("status", "200")))] == 1
    assert m[("imdsd_requests_total", (("path", "token"), ("status", "400")))] == 1
    assert m[("imdsd_requests_total", (("path", "credentials"), ("status", "200")))] == 1
    assert m[("imdsd_requests_total", (("path", "metadata"), ("status", "401")))] == 1
    assert m[("imdsd_requests_total", (("path", "metadata"), ("status", "404")))] == 1
    assert m[("imdsd_tokens_total", (("result", "issued"),))] == 1
    assert m[("imdsd_tokens_total", (("result", "refused"),))] == 1
    assert m[("imdsd_tokens_total", (("result", "rejected"),))] == 1
    assert m[("imdsd_sessions", (("state", "failing"),))] == 2
    assert m[("imdsd_session_earliest_expiry_seconds", ())] == 2 * 3600
    assert m[("imdsd_rotations_total", (("error", ""), ("result", "success")))] == 2
    assert m[("imdsd_rotations_total", (("error", "retryable"), ("result", "failure")))] == 2
    assert m[("imdsd_upstream_seconds_count", ())] == 4
    labels = " ".join(v for _, pairs in m for _, v in pairs)
    for key in (VM_A, VM_B):
        entry = daemon.sessions.get(key)
        assert entry is not None
        for secret in (
            entry.session.access_key_id,
            entry.session.secret_access_key,
            entry.session.token,
            key,
        ):
            assert secret not in labels


async def test_readiness_means_serving_while_sessions_are_pending(clock: FakeClock) -> None:
    """Invariant 8: with the issuer holding every call, the listeners already answer: /readyz
    is 200 (serving), a guest gets EC2's failure document (CredentialsPending) and its
    instance-id, and imdsd_sessions says how many sessions are pending; once the issuer
    answers, they turn fresh and the guest gets credentials."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = replace(
        make_config(),
        host=replace(make_config().host, metrics=Listener(host="127.0.0.1", port=port)),
    )
    gate = asyncio.Event()

    def hold(backend: Backend) -> Backend:
        return FlakyBackend(backend, gate=gate)

    primed, finish = asyncio.Event(), asyncio.Event()
    with capture_logs() as logs:

        async def start() -> None:
            async with running(config, clock, open_backend=wrapping(hold)):
                primed.set()
                await finish.wait()

        starting = asyncio.create_task(start())
        for _ in range(500):  # the "listening" line comes before any issuer call returns
            found = [e for e in logs if e["event"] == "listening"]
            if found:
                break
            await asyncio.sleep(0.01)
        url = found[0]["listening"][0]
        role = await http(
            url, "/latest/meta-data/iam/security-credentials/role-a", source="127.0.0.2"
        )
        assert (role.status, json.loads(role.body)["Code"]) == (200, "CredentialsPending")
        assert (await http(url, "/latest/meta-data/instance-id", source="127.0.0.2")).text == VM_A
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as reply:
                assert reply.status == 200
            async with session.get(f"http://127.0.0.1:{port}/metrics") as reply:
                scrape = await reply.text()
        assert 'imdsd_sessions{state="pending"} 2.0' in scrape
        assert not primed.is_set()  # running() is still priming: the issuer holds every call
        gate.set()
        await asyncio.wait_for(primed.wait(), 5)
        role = await http(
            url, "/latest/meta-data/iam/security-credentials/role-a", source="127.0.0.2"
        )
        finish.set()
        await starting
    assert json.loads(role.body)["Code"] == "Success"


async def test_earliest_expiry_on_a_host_that_needs_no_session(clock: FakeClock) -> None:
    """With no association at all the earliest-expiry gauge is +Inf (an alert on "under
    min_remaining" must not fire); once associations lack a valid session it is 0."""
    config = replace(make_config(), associations=())
    async with running(config, clock) as daemon:
        m = await scrape(daemon)
        assert m[("imdsd_session_earliest_expiry_seconds", ())] == math.inf
        await daemon.inventory.commit(lambda: daemon.inventory.associate(VM_A, "profile-a"))
        m = await scrape(daemon)  # associated, but no session issued yet (no sync)
        assert m[("imdsd_session_earliest_expiry_seconds", ())] == 0.0


def test_scoped_listeners_are_exported_with_their_device_and_rebinds() -> None:
    """imdsd_scoped_listeners has one series per device (with its ifindex) or namespace,
    valued by its sockets; imdsd_listener_rebinds_total counts rebinds."""
    from prometheus_client import generate_latest

    from imdsd.metrics import Metrics

    metrics = Metrics()
    status: list[dict[str, Any]] = [
        {"device": "tap-vm1", "ifindex": 7, "scope": "dev:tap-vm1", "listening": ["a", "b"]},
        {"namespace": "ovn7", "scope": "netns:ovn7", "listening": ["c"]},
    ]
    metrics.watch_listeners(lambda: status, lambda: 3)
    text = generate_latest(metrics.registry).decode()
    assert 'imdsd_scoped_listeners{device="tap-vm1",ifindex="7",namespace=""} 2.0' in text
    assert 'imdsd_scoped_listeners{device="",ifindex="",namespace="ovn7"} 1.0' in text
    assert "imdsd_listener_rebinds_total 3.0" in text


async def test_loop_lag_reports_a_stall_of_the_guest_loop(daemon: Daemon) -> None:
    """imdsd_loop_lag_seconds: the probe on the daemon's loop sees the loop held for 50 ms
    (what a parse or a sort on the loop does to every guest) and reports it when scraped."""
    time.sleep(0.05)  # noqa: ASYNC251 -- the stall is the thing measured: the daemon's loop
    await asyncio.sleep(0.02)  # the probe's overdue tick runs
    lag = (await scrape(daemon))[("imdsd_loop_lag_seconds", ())]
    assert 0.04 <= lag < 10


async def test_loop_lag_is_the_worst_over_its_window_then_forgotten() -> None:
    """The probe keeps the worst lateness of the current and the previous window: a stall is
    reported for at least one window, and forgotten two windows later."""
    from imdsd.metrics import Metrics

    with Metrics().watch_loop(interval=0.001, window=0.1) as probe:
        await asyncio.sleep(0.01)
        time.sleep(0.3)  # noqa: ASYNC251 -- the stall is the thing measured (over a window)
        await asyncio.sleep(0.01)
        assert probe.worst() >= 0.25
        await asyncio.sleep(0.05)
        assert probe.worst() >= 0.25  # still inside the window after the stall
        await asyncio.sleep(0.35)
        assert probe.worst() < 0.25
