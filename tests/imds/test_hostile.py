"""Invariant 7: no guest can deny service to another. Connections, request rate and time are
budgeted per instance (strangers share one budget); an exhausted budget costs only the guest
that spent it; guest-caused events are counted, never logged one by one."""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from http.client import HTTPConnection
from pathlib import Path

import pytest
import structlog.testing

from imdsd.daemon import Daemon, running
from imdsd.imds.render import ERROR_PAGES
from tests.fakes import FakeClock
from tests.helpers import VM_A, VM_D, http, make_config, token_for, two_guests
from tests.process import Proc

pytestmark = pytest.mark.slow  # floods against daemon processes

FLOODER, VICTIM, STRANGER = "127.0.0.2", "127.0.0.3", "127.0.0.9"
ROLE_PATH = "/latest/meta-data/iam/security-credentials/victims-own-role"  # the victim's
VICTIM_ID = "i-0a1c71a1c71a1c71a"


def hostile(directory: Path, budgets: str = "", nofile: int | None = None) -> Proc:
    return Proc(directory, two_guests(directory, budgets), nofile=nofile)


@pytest.fixture
def many_files() -> Iterator[None]:
    """This test process holds thousands of client sockets: its soft limit goes to the hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 6000:
        pytest.skip(f"the open-files hard limit ({hard}) is below what the test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def timed_fetches(url: str, source: str, count: int, path: str = ROLE_PATH) -> list[float]:
    """`count` credential fetches like curl (a token, then a GET, each on a new connection);
    returns each fetch's seconds, asserting every one succeeded."""
    host, port = address(url)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        conn = HTTPConnection(host, port, timeout=5, source_address=(source, 0))
        conn.request(
            "PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
        )
        token = conn.getresponse().read().decode()
        conn.request("GET", path, headers={"X-aws-ec2-metadata-token": token})
        reply = conn.getresponse()
        body = reply.read()
        conn.close()
        latencies.append(time.perf_counter() - started)
        assert reply.status == 200 and b'"Code" : "Success"' in body, (reply.status, body)
    return latencies


def p99(samples: list[float]) -> float:
    """The 99th percentile, nearest rank: of 100 samples the 99th smallest (the maximum is
    the 100th; it was taken here, so one slow fetch of 100 failed a p99 bound)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(len(ordered) * 0.99) - 1)]


def test_5000_idle_connections_from_one_instance_cost_others_nothing(
    tmp_path: Path, many_files: None
) -> None:
    """One instance opens 5,000 connections while the daemon's open-files limit is 1024:
    past its cap (32) each is closed at once; another instance's 100 credential fetches all
    succeed with p99 < 50 ms; the daemon does not spin (idle CPU) and its log grows < 10 KB."""
    daemon = hostile(tmp_path, nofile=1024)
    try:
        host, port = address(daemon.url)
        log_before, cpu_before = daemon.log.stat().st_size, daemon.cpu_seconds()
        hoard = []
        for _ in range(5000):
            s = socket.socket()
            s.setblocking(False)
            s.bind((FLOODER, 0))
            s.connect_ex((host, port))
            hoard.append(s)
        settle(hoard)  # every connect answered: admitted (32) or closed at once by the daemon
        latencies = timed_fetches(daemon.url, VICTIM, 100)
        assert p99(latencies) < 0.05, sorted(latencies)[-5:]
        time.sleep(0.5)
        still_open = sum(_is_open(s) for s in hoard)
        assert still_open <= 32, still_open
        idle_from = daemon.cpu_seconds()
        time.sleep(1.0)
        assert daemon.cpu_seconds() - idle_from < 0.1  # no accept loop spinning
        assert daemon.cpu_seconds() - cpu_before < 5.0
        assert daemon.log.stat().st_size - log_before < 10_000
        for s in hoard:
            s.close()
    finally:
        assert daemon.stop() == 0
    summary = [e for e in daemon.events() if e.get("event") == "guest over budget"]
    assert summary and summary[0]["refused_instance"] >= 4900, summary  # type: ignore[operator]


def settle(hoard: list[socket.socket], seconds: float = 15.0) -> None:
    """Wait until every non-blocking connect has completed (writable: connected or failed).
    A burst of 5,000 SYNs overflows the kernel's accept queue for a moment whatever the
    daemon does (its SYNs are retried after 1 s); per-source SYN limits are the firewall's
    job (config/nftables-imdsd.nft)."""
    with selectors.DefaultSelector() as selector:
        for s in hoard:
            selector.register(s, selectors.EVENT_WRITE)
        pending, deadline = len(hoard), time.monotonic() + seconds
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                selector.unregister(key.fileobj)
                pending -= 1
    assert pending == 0, f"{pending} connects still pending"


def _is_open(s: socket.socket) -> bool:
    """Connected, and neither reset nor closed by the daemon."""
    try:
        s.getpeername()
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError as exc:
        assert exc.errno in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE), exc
        return False


SLOW = '[budgets]\nhead_timeout = "1s"\nidle_timeout = "2s"\n[budgets.instances.{vm}]\nconnections = 600\n'


@pytest.fixture
async def slow_daemon(clock: FakeClock) -> AsyncIterator[Daemon]:
    async with running(make_config(SLOW.format(vm=VM_D)), clock) as daemon:
        yield daemon


async def test_slowloris_is_cut_by_the_head_deadline(slow_daemon: Daemon) -> None:
    """500 connections sending one header byte a second are closed once their head is not
    complete within head_timeout (1 s here); another instance is served throughout."""
    url = slow_daemon.urls[0]
    host, port = address(url)
    streams = [
        await asyncio.open_connection(host, port, local_addr=("127.0.0.5", 0)) for _ in range(500)
    ]
    closed_at: list[float] = []
    started = time.monotonic()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 60:
            if writer.is_closing() or reader.at_eof():
                break
            writer.write(bytes([byte]))
            try:
                await asyncio.wait_for(reader.read(1), 1.0)  # EOF ends the wait early
            except TimeoutError:
                continue
            except ConnectionError:
                pass
            break
        closed_at.append(time.monotonic() - started)
        writer.close()

    trickling = asyncio.gather(*(trickle(r, w) for r, w in streams))
    served = 0
    while not trickling.done():
        reply = await http(url, "/latest/meta-data/instance-id", source="127.0.0.2")
        assert (reply.status, reply.text) == (200, VM_A)
        served += 1
        await asyncio.sleep(0.05)
    await trickling
    assert len(closed_at) == 500 and max(closed_at) < 4.0, max(closed_at)
    assert served >= 10
    limits = limit_counts(slow_daemon)
    assert limits["head_timeout"] == 500


async def test_idle_connections_close_after_idle_timeout(slow_daemon: Daemon) -> None:
    """A connection that never sends, or goes quiet after an answer, is closed once
    idle_timeout (2 s here) has passed, and counted."""
    host, port = address(slow_daemon.urls[0])
    silent = [
        await asyncio.open_connection(host, port, local_addr=("127.0.0.5", 0)) for _ in range(5)
    ]
    reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.5", 0))
    writer.write(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    for r, w in [*silent, (reader, writer)]:
        assert await asyncio.wait_for(r.read(), 5) in (b"", VM_D.encode())
        w.close()
    assert 1.0 < time.monotonic() - started < 4.0
    assert limit_counts(slow_daemon)["idle_timeout"] == 6


def limit_counts(daemon: Daemon) -> dict[str, float]:
    registry = daemon.api.metrics.registry
    return {
        s.labels["event"]: s.value
        for m in registry.collect()
        if m.name == "imdsd_guest_limits"
        for s in m.samples
        if s.name.endswith("_total")
    }


async def test_expect_header_from_a_stranger_gets_only_404(daemon: Daemon, url: str) -> None:
    """`Expect: 100-continue` is not answered before the caller is identified: a stranger gets
    one 404 page and no interim 100; an instance gets its answer, also without a 100."""
    for source, status in (("127.0.0.9", 404), ("127.0.0.2", 200)):
        host, port = address(url)
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        writer.write(b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n")  # fmt: skip
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert raw.startswith(f"HTTP/1.1 {status} ".encode()), raw
        assert b" 100 " not in raw.split(b"\r\n", 1)[0] and raw.count(b"HTTP/1.1") == 1
        assert b"\r\nServer: EC2ws\r\n" in raw


async def test_parser_refusals_get_ec2_pages(daemon: Daemon, url: str) -> None:
    """A request aiohttp's parser refuses gets EC2's 400 page over HTTP/1.1 with Server: EC2ws
    (404 for a stranger), never aiohttp's banner, text or the request's bytes."""
    host, port = address(url)
    for source, status in (("127.0.0.2", 400), ("127.0.0.9", 404)):
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        writer.write(b"GET /latest/\x01MARKER HTTP/1.1\r\nHost: x\r\nX-Junk: MARKER\x7f\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), raw
        assert b"Server: EC2ws" in head and b"aiohttp" not in raw and b"MARKER" not in raw
        assert body == ERROR_PAGES[status]


async def test_token_dies_with_its_instance(daemon: Daemon, url: str) -> None:
    """A token minted before `instances remove` of an id is refused after the same id is
    added again (a new incarnation); a fresh token works."""
    token = await token_for(url, "127.0.0.2")
    path = "/latest/meta-data/instance-id"
    assert (
        await http(url, path, source="127.0.0.2", headers={"X-aws-ec2-metadata-token": token})
    ).status == 200
    instance = daemon.inventory.instance(VM_A)
    assert instance is not None
    daemon.apply(await daemon.inventory.commit(lambda: daemon.inventory.remove_instance(VM_A)))
    daemon.apply(await daemon.inventory.commit(lambda: daemon.inventory.add_instance(instance)))
    reply = await http(url, path, source="127.0.0.2", headers={"X-aws-ec2-metadata-token": token})
    assert (reply.status, reply.body) == (401, ERROR_PAGES[401])
    fresh = await token_for(url, "127.0.0.2")
    assert (
        await http(url, path, source="127.0.0.2", headers={"X-aws-ec2-metadata-token": fresh})
    ).status == 200


def test_flood_throttles_the_flooder_only(tmp_path: Path) -> None:
    """One instance floods on 8 connections at full speed (a separate process, in windows that
    alternate with quiet ones): it sees 429s
    beyond its budget (burst 200, 50/s), and a second instance's p99 stays within twice its
    quiet p99."""
    daemon = hostile(
        tmp_path,
        budgets=f"[budgets.instances.{VICTIM_ID}]\nrequests_per_second = 100000\nburst = 100000\n",
    )
    try:
        timed_fetches(daemon.url, VICTIM, 20)  # warm up
        flood = subprocess.Popen(
            [sys.executable, "-m", "tests.flood", daemon.url, FLOODER, "8", "60", "--toggled"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert flood.stdin is not None and flood.stdout is not None

        def switch(state: str) -> None:
            flood.stdin.write(state + "\n")  # type: ignore[union-attr]
            flood.stdin.flush()  # type: ignore[union-attr]
            assert flood.stdout.readline() == "ok\n"  # type: ignore[union-attr]

        # Sub-millisecond p99s drift with whatever else the machine does: quiet and loud
        # windows alternate, so both see the same drift.
        quiet: list[float] = []
        loud: list[float] = []
        for _ in range(3):
            quiet += timed_fetches(daemon.url, VICTIM, 200)
            switch("on")
            time.sleep(0.5)  # the flood is on (its burst spent in the first round)
            loud += timed_fetches(daemon.url, VICTIM, 200)
            switch("off")
            time.sleep(0.3)  # its held-back answers drain
        counts = json.loads(flood.communicate("stop\n", timeout=30)[0])
        status = json.loads(subprocess.run(
            [sys.executable, "-m", "imdsd", "status", "--json", "--socket", str(tmp_path / "admin.sock")],
            capture_output=True, text=True, check=True).stdout)  # fmt: skip
    finally:
        assert daemon.stop() == 0
    assert counts["429"] > 0 and counts["200"] <= 200 + 50 * 6 + 25, counts  # burst + rate * ~5 s
    assert set(counts) <= {"200", "429"}, counts
    assert p99(loud) <= 2 * p99(quiet), (p99(quiet), p99(loud))
    assert "i-0f100df100df100df" in status["throttled_recently"]
    assert VICTIM_ID not in status["throttled_recently"]


HOLDER = """
import resource, socket, sys, time
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the daemon's limit is not ours
sys.stdin.readline()
held = []
for _ in range(int(sys.argv[3])):
    s = socket.socket(); s.bind(("127.0.0.2", 0)); s.connect((sys.argv[1], int(sys.argv[2]))); held.append(s)
print("held", flush=True)
time.sleep(30)
"""


async def test_accept_pauses_when_descriptors_run_out(daemon: Daemon, url: str) -> None:
    """Should descriptors run out anyway (here: the ceiling lifted, the open-files limit a few
    above what is open), accepting pauses instead of spinning, says so once, counts it, and
    resumes serving once descriptors are free again."""
    host, port = address(url)
    daemon.api.ledger.ceiling = 10**6
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, host, str(port), "30",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None
    open_now = len(await asyncio.to_thread(os.listdir, "/proc/self/fd"))
    with structlog.testing.capture_logs() as logs:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 8, hard))
            holder.stdin.write(b"go\n")
            await holder.stdin.drain()
            assert await asyncio.wait_for(holder.stdout.readline(), 10) == b"held\n"
            await asyncio.sleep(
                0.5
            )  # the accept loop meets EMFILE, pauses, retries, meets it again
        finally:
            holder.kill()
            await holder.wait()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        reply = await asyncio.wait_for(
            http(url, "/latest/meta-data/instance-id", source="127.0.0.2"), 5
        )
    assert (reply.status, reply.text) == (200, VM_A)
    paused = [e for e in logs if e["event"].startswith("accept paused")]
    assert [e["event"] for e in paused] == ["accept paused: no descriptor left"]
    assert limit_counts(daemon)["refused_global"] >= 2


def test_budgets_change_on_reload(tmp_path: Path) -> None:
    """SIGHUP applies a changed [budgets] at once (no restart): with strangers_connections
    lowered to 1, a stranger's second simultaneous connection is refused; the reload names
    no section as restart-only."""
    daemon = hostile(tmp_path)
    try:
        text = daemon.config.read_text().replace(
            "[log]", "[budgets]\nstrangers_connections = 1\n[log]"
        )
        daemon.config.write_text(text)
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("reloaded")
        host, port = address(daemon.url)
        first = socket.create_connection((host, port), source_address=(STRANGER, 0), timeout=5)
        second = socket.create_connection((host, port), source_address=(STRANGER, 0), timeout=5)
        time.sleep(0.2)
        first.setblocking(False)
        second.setblocking(False)
        assert _is_open(first) and not _is_open(second)
        first.close()
        second.close()
    finally:
        assert daemon.stop() == 0
    assert not [e for e in daemon.events() if "restart" in str(e.get("event"))]


async def test_strangers_share_one_request_budget(clock: FakeClock) -> None:
    """Unknown addresses share one bucket: past it their 404 is held back (never a 429, which
    would tell them something), counted as throttled; instances are unaffected."""
    config = make_config("[budgets]\nstrangers_requests_per_second = 1\nstrangers_burst = 2\n")
    async with running(config, clock) as daemon:
        url = daemon.urls[0]
        started = time.monotonic()
        replies = [await http(url, "/", source=f"127.0.0.{n}") for n in (9, 10, 11)]
        held = time.monotonic() - started
        assert [r.status for r in replies] == [404, 404, 404]
        assert held >= 0.1  # the third waited for the shared bucket
        assert limit_counts(daemon)["throttled"] == 1
        assert (await http(url, "/latest/meta-data/instance-id", source="127.0.0.2")).status == 200


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 100000\r\n\r\n" + b"x" * 4096,
        b"Transfer-Encoding: chunked\r\n\r\n1000\r\n" + b"x" * 4096 + b"\r\n",
    ],
    ids=["declared-too-large", "chunked"],
)
async def test_body_over_the_limit_is_refused_and_closed(
    daemon: Daemon, url: str, framing: bytes
) -> None:
    """A body declared beyond max_body (1 KiB), or of unknown length, gets EC2's 400 and the
    connection is closed unread (nothing is drained), and counted."""
    host, port = address(url)
    reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
    writer.write(b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n"
                 + framing)  # fmt: skip
    raw = await asyncio.wait_for(reader.read(), 5)  # EOF: the daemon closed the connection
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and body == ERROR_PAGES[400]
    assert limit_counts(daemon)["body_limit"] == 1
    small = await http(url, "/latest/api/token", method="PUT", source="127.0.0.2",
                       headers={"X-aws-ec2-metadata-token-ttl-seconds": "60", "Content-Length": "0"})  # fmt: skip
    assert small.status == 200
