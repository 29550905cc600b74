"""`make bench`: the request path's throughput and latency, beside a baseline from the same run.

The daemon runs as users run it (`imdsd run`, its own process); the baseline is a bare aiohttp
server answering a constant body, also in its own process, so the figures show what imdsd's
identify -> token check -> cached bytes path costs on top of aiohttp itself, on this machine,
now. Traffic goes to 127.0.0.1 only; every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import host_sections

CONNECTIONS = 16
REQUESTS = 20_000
TIME_CAP_SECONDS = 60.0
CONFIG = """
[imds]
listeners = ["127.0.0.1:0"]
{host}
[log]
level = "warning"
[budgets]  # the load generator is one instance: measure the path, not the throttle
requests_per_second = 100000
burst = 100000
[[instance_profiles]]
name = "bench"
role_arn = "arn:aws:iam::123456789012:role/bench"
[[instances]]
id = "i-0123456789abcdef0"
addresses = ["127.0.0.1"]
metadata_options = {{ http_tokens = "required" }}
[[associations]]
instance = "i-0123456789abcdef0"
profile = "bench"
"""
BASELINE = """
import socket, sys
from aiohttp import web
body = b"x" * int(sys.argv[1])
async def handler(request):
    return web.Response(body=body, content_type="text/plain")
app = web.Application()
app.router.add_route("*", "/{path:.*}", handler)
sock = socket.create_server(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
web.run_app(app, sock=sock, print=None, access_log=None)
"""


async def one_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes]:
    """Send one request on a keep-alive connection; (status, body)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return int(head.split(b" ", 2)[1]), await reader.readexactly(length)


async def fetch(port: int, request: bytes) -> bytes:
    """One request on its own connection; the body of a 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    status, body = await one_request(reader, writer, request)
    writer.close()
    assert status == 200, status
    return body


async def load(port: int, request: bytes) -> tuple[float, list[float]]:
    """CONNECTIONS keep-alive connections share REQUESTS; returns (requests/s, latencies)."""
    latencies: list[float] = []
    remaining = REQUESTS
    deadline = time.perf_counter() + TIME_CAP_SECONDS

    async def worker() -> None:
        nonlocal remaining
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            started = time.perf_counter()
            status, _ = await one_request(reader, writer, request)
            latencies.append(time.perf_counter() - started)
            assert status == 200, status
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return len(latencies) / (time.perf_counter() - started), latencies


def start_daemon(directory: Path) -> tuple[subprocess.Popen[str], int]:
    (directory / "bench.toml").write_text(CONFIG.format(host=host_sections(directory, metrics="")))
    process = subprocess.Popen(
        [sys.executable, "-m", "imdsd", "run", "--config", str(directory / "bench.toml"),
         "--log-format", "json", "--log-level", "info"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        event = json.loads(line)
        if event.get("event") == "ready":
            return process, int(event["listening"][0].rsplit(":", 1)[1])
    raise SystemExit("the daemon did not start")


def start_baseline(size: int) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-c", BASELINE, str(size)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def get(path: str, tok: str = "") -> bytes:
    extra = f"X-aws-ec2-metadata-token: {tok}\r\n" if tok else ""
    return f"GET {path} HTTP/1.1\r\nHost: b\r\n{extra}\r\n".encode()


def row(name: str, rps: float, latencies: list[float], base: float) -> str:
    q = statistics.quantiles(latencies, n=100)
    return f"{name:<44} {rps:>9,.0f} req/s  {rps / base:>6.0%}  p50 {q[49] * 1e3:6.2f} ms  p99 {q[98] * 1e3:6.2f} ms"


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        daemon, port = start_daemon(Path(tmp))
        try:
            put = b"PUT /latest/api/token HTTP/1.1\r\nHost: b\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n"
            tok = (await fetch(port, put)).decode()
            creds = get("/latest/meta-data/iam/security-credentials/bench", tok)
            size = len(await fetch(port, creds))
            baseline, base_port = start_baseline(size)
            try:
                await load(base_port, get("/warmup"))  # warm both before measuring
                await load(port, creds)
                base_rps, base_lat = await load(
                    base_port, get("/latest/meta-data/iam/security-credentials/bench")
                )
                cred_rps, cred_lat = await load(port, creds)
                leaf_rps, leaf_lat = await load(port, get("/latest/meta-data/instance-id", tok))
            finally:
                baseline.terminate()
        finally:
            daemon.terminate()
    print(
        f"{REQUESTS:,} requests over {CONNECTIONS} keep-alive connections per row, 127.0.0.1, one run"
    )
    print(row(f"baseline: bare aiohttp, constant {size}-byte body", base_rps, base_lat, base_rps))
    print(row("imdsd: credential document (IMDSv2 token)", cred_rps, cred_lat, base_rps))
    print(row("imdsd: meta-data leaf (IMDSv2 token)", leaf_rps, leaf_lat, base_rps))


if __name__ == "__main__":
    asyncio.run(main())
