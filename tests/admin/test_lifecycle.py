"""The daemon as systemd runs it: notify messages, SIGHUP reload, SIGTERM, and SIGKILL in the
middle of a burst of admin calls (nothing acknowledged is lost)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from imdsd.backends.base import Backend
from imdsd.cli.client import request
from imdsd.daemon import running
from imdsd.errors import DaemonUnavailable
from tests.fakes import FakeClock, FlakyBackend, wrapping
from tests.helpers import VM_D, host_sections, http, make_config
from tests.process import Proc

INSTANCE = '[[instances]]\nid = "{iid}"\naddresses = ["{address}"]\nmetadata_options = {{ http_tokens = "optional" }}\n'
BASE = """
[imds]
listeners = ["127.0.0.1:0"]
{host}
[log]
level = "info"
[[instance_profiles]]
name = "web"
role_arn = "arn:aws:iam::123456789012:role/web"
[[instance_profiles]]
name = "batch"
role_arn = "arn:aws:iam::123456789012:role/batch"
"""


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield path, sock
    sock.close()


def receive_until(sock: socket.socket, field: str) -> list[str]:
    seen: list[str] = []
    while field not in seen:
        seen += sock.recv(4096).decode().split("\n")
    return seen


def config(directory: Path, instances: list[tuple[str, str, str | None]]) -> str:
    text = BASE.format(host=host_sections(directory, metrics=""))
    for iid, address, profile in instances:
        text += INSTANCE.format(iid=iid, address=address)
        if profile:
            text += f'[[associations]]\ninstance = "{iid}"\nprofile = "{profile}"\n'
    return text


def test_notify_ready_watchdog_reload_stopping(
    tmp_path: Path, notify_socket: tuple[Path, socket.socket]
) -> None:
    """Type=notify: READY=1 once serving, WATCHDOG=1 pings, RELOADING=1 then READY=1 around a
    SIGHUP, STOPPING=1 on SIGTERM, and exit status 0."""
    path, sock = notify_socket
    proc = Proc(
        tmp_path,
        config(tmp_path, [("i-0000000a", "127.0.0.2", "web")]),
        notify=path,
        watchdog_usec=200_000,
    )
    try:
        assert "READY=1" in receive_until(sock, "READY=1")
        assert "WATCHDOG=1" in receive_until(sock, "WATCHDOG=1")
        proc.process.send_signal(signal.SIGHUP)
        seen = receive_until(sock, "READY=1")
        assert "RELOADING=1" in seen and any(f.startswith("MONOTONIC_USEC=") for f in seen)
        proc.process.terminate()
        assert "STOPPING=1" in receive_until(sock, "STOPPING=1")
    finally:
        assert proc.stop() == 0


async def test_sighup_applies_changes_and_keeps_unchanged_sessions(tmp_path: Path) -> None:
    """SIGHUP: a new instance and a changed association apply; an unchanged association keeps
    its session (same keys); a bad file is refused, logged, and the old config stays."""
    a, b, c = ("i-0000000a", "127.0.0.2"), ("i-0000000b", "127.0.0.3"), ("i-0000000c", "127.0.0.4")
    proc = Proc(tmp_path, config(tmp_path, [(*a, "web"), (*b, "web")]))
    try:
        creds = "/latest/meta-data/iam/security-credentials/"
        before = json.loads((await http(proc.url, creds + "web", source=a[1])).body)
        proc.config.write_text(config(tmp_path, [(*a, "web"), (*b, "batch"), (*c, "batch")]))
        mark = len(proc.events())
        proc.process.send_signal(signal.SIGHUP)
        proc.wait_for("reloaded", after=mark)
        assert json.loads((await http(proc.url, creds + "web", source=a[1])).body) == before
        assert (await http(proc.url, creds, source=b[1])).text == "batch"
        assert (await http(proc.url, creds, source=c[1])).text == "batch"
        proc.config.write_text(config(tmp_path, [(*a, "web")]) + "[rotation]\nconcurrency = 0\n")
        mark = len(proc.events())
        proc.process.send_signal(signal.SIGHUP)
        refused = proc.wait_for(
            "reload refused: the config is invalid; keeping the running one", after=mark
        )
        assert refused["problems"] == [
            "rotation.concurrency: got 0; allowed: an integer from 1 to 1024"
        ]
        assert (await http(proc.url, creds, source=c[1])).text == "batch"
    finally:
        assert proc.stop() == 0


async def test_sigkill_mid_burst_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Admin calls fired back to back, the daemon SIGKILLed in the middle: after a restart,
    every call the API acknowledged is there."""
    text = config(tmp_path, [])
    proc = Proc(tmp_path, text)
    socket_path = tmp_path / "admin.sock"
    acknowledged: list[str] = []

    async def burst() -> None:
        for n in range(1, 400):
            iid = f"i-{n:08x}"
            body = {"id": iid, "addresses": [f"127.0.{3 + n // 250}.{n % 250 + 1}"]}
            try:
                await request(socket_path, "POST", "/v1/instances", body)
                await request(
                    socket_path, "POST", "/v1/associations", {"instance": iid, "profile": "web"}
                )
            except DaemonUnavailable:
                return
            acknowledged.append(iid)

    async def kill_soon() -> None:
        while len(acknowledged) < 25:
            await asyncio.sleep(0.005)
        proc.process.kill()

    await asyncio.gather(burst(), kill_soon())
    assert proc.process.wait(timeout=10) == -signal.SIGKILL
    assert 25 <= len(acknowledged) < 399
    again = Proc(tmp_path, text)
    try:
        instances = await request(socket_path, "GET", "/v1/instances")
        associated = {i["id"] for i in instances if i["profile"] == "web"}
        assert set(acknowledged) <= associated
    finally:
        assert again.stop() == 0


async def test_shutdown_lets_requests_in_flight_finish(clock: object) -> None:
    """On stop, a call already in flight (an associate waiting on the issuer) completes and is
    answered; only then does the daemon close."""
    from tests.fakes import FlakyBackend

    gate = asyncio.Event()
    held: list[FlakyBackend] = []

    def hold(backend: Backend) -> Backend:
        held.append(FlakyBackend(backend))
        return held[0]

    async with running(make_config(), FakeClock(), open_backend=wrapping(hold)) as daemon:
        held[0].gate = gate
        call = asyncio.create_task(request(daemon.admin_socket, "POST", "/v1/associations",
                                           {"instance": VM_D, "profile": "profile-a"}))  # fmt: skip
        while held[0].in_flight == 0:
            await asyncio.sleep(0.01)
        asyncio.get_running_loop().call_later(0.2, gate.set)  # the issuer answers during shutdown
    answer = await call
    assert answer["state"] == "fresh" and answer["instance"] == VM_D


async def test_sighup_survives_the_overflow_typo_and_applies_log(tmp_path: Path) -> None:
    """The typo that used to kill the daemon on reload (retry_max = "99999999999h", an
    OverflowError) is refused with its key path and the daemon keeps serving; a [log] change
    applies on reload (debug: the per-request line appears)."""
    a = ("i-0000000a", "127.0.0.2")
    proc = Proc(tmp_path, config(tmp_path, [(*a, "web")]))
    path = "/latest/meta-data/instance-id"
    try:
        good = proc.config.read_text()
        proc.config.write_text(good + '[rotation]\nretry_max = "99999999999h"\n')
        mark = len(proc.events())
        proc.process.send_signal(signal.SIGHUP)
        refused = proc.wait_for(
            "reload refused: the config is invalid; keeping the running one", after=mark
        )
        assert refused["problems"] == [
            'rotation.retry_max: got "99999999999h"; allowed: a duration from 1s to 1h'
        ]
        assert (await http(proc.url, path, source=a[1])).text == a[0]
        proc.config.write_text(good.replace('level = "info"', 'level = "debug"'))
        mark = len(proc.events())
        proc.process.send_signal(signal.SIGHUP)
        proc.wait_for("reloaded", after=mark)
        assert (await http(proc.url, path, source=a[1])).text == a[0]
        line = proc.wait_for("request", after=mark)
        assert (line["path"], line["status"]) == ("metadata", 200)
        assert proc.process.poll() is None
    finally:
        assert proc.stop() == 0
