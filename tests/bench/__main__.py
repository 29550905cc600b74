"""`make bench`: figures beside a baseline measured in the same run. Figures, not assertions.

1. Requests: a bare aiohttp app (one catch-all route, a constant body of the credential
   document's size) is the baseline; then imdsd's credential path, a meta-data leaf, the token
   PUT and a 401 refusal, each with requests/s, p50/p99 and the ratio to the baseline. The load
   generator is wrk where installed (one thread, 64 connections), else several client
   processes; the first line says which.
2. Memory and start-up: resident memory at 1, 1,000 and 10,000 instances (local backend, each
   associated), and the time from starting the process to the last instance's credentials.
3. Rotation spread: 10,000 sessions primed at once (6 h lifetime), their refreshes over a day
   as the scheduler's own functions place them: peak upstream calls per minute from the first
   hour on, beside N / lifetime.

The daemon runs as users run it (`imdsd run`, its own process); traffic goes to 127.0.0.0/8
only; every load is bounded in time.
"""

from __future__ import annotations

import asyncio
import compileall
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from imdsd.model import RotationPolicy, Session
from imdsd.refresh import first_refresh_at, refresh_at
from tests.bench import control, kit, storm, vault
from tests.bench.baseline import BASELINE

SECONDS = 5  # per run
ROUNDS = 3  # runs per row
CONNECTIONS = 64
CLIENT_PROCESSES = 3
TTL = kit.TTL


def address(n: int) -> str:
    """The n-th instance's address: 127.0.0.1 for the first (wrk cannot pick its source)."""
    return "127.0.0.1" if n == 0 else f"127.1.{n // 250}.{n % 250 + 1}"


def config(directory: Path, count: int) -> Path:
    """`count` instances, the first requiring IMDSv2 tokens; no warm restart."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bench.toml"
    text = kit.head(directory, "the load generator is one instance", warm_restart=False)
    text += kit.profile("bench")
    text += "".join(kit.instance(n, address(n), tokens="required" if n == 0 else "optional")
                    + kit.association(n) for n in range(count))  # fmt: skip
    path.write_text(text)
    return path


def start_daemon(directory: Path, count: int) -> tuple[subprocess.Popen[bytes], int, float]:
    """(process, port, seconds from spawn to the last instance's credentials served). The
    daemon logs to a file and the last instance is polled over a plain blocking socket every
    5 ms: the watcher must cost the daemon nothing (no pipe it could block on, no event loop
    built per poll on a two-core machine)."""
    path = config(directory, count)
    started = time.perf_counter()
    process, port = kit.start(path, directory / "daemon.log")
    last = address(count - 1)
    path_ = "/latest/meta-data/iam/security-credentials/bench"
    headers = {} if count > 1 else {kit.TOKEN: kit.token(port)}
    request = kit.get(path_, headers)
    while True:
        status, body = kit.one(port, request, last)
        if status == 200 and json.loads(body)["Code"] == "Success":
            return process, port, time.perf_counter() - started
        time.sleep(0.005)


# -- load generators ---------------------------------------------------------------------------


def wrk(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) from wrk, one thread, CONNECTIONS connections."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    lines = [f'wrk.method = "{method}"'] + [
        f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()
    ]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--latency", "-s",
                          str(script), f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    script.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def quantile(q: str) -> float:
        value, unit = re.search(rf"\s{q}%\s+([\d.]+)(us|ms|s)\b", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    return rps, quantile("50"), quantile("99")


def _client(port: int, request: bytes, connections: int, until: float, out: object) -> None:
    async def worker(latencies: list[float]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.time() < until:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
        writer.close()

    async def run() -> list[float]:
        latencies: list[float] = []
        await asyncio.gather(*(worker(latencies) for _ in range(connections)))
        return latencies

    out.put(asyncio.run(run()))  # type: ignore[attr-defined]


def processes(
    port: int, method: str, path: str, headers: dict[str, str]
) -> tuple[float, float, float]:
    """The same figures from CLIENT_PROCESSES asyncio clients sharing CONNECTIONS."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"{method} {path} HTTP/1.1\r\nHost: b\r\n{extra}\r\n".encode()
    queue: multiprocessing.Queue[list[float]] = multiprocessing.Queue()
    until = time.time() + SECONDS
    share = CONNECTIONS // CLIENT_PROCESSES
    workers = [multiprocessing.Process(target=_client, args=(port, request, share, until, queue))
               for _ in range(CLIENT_PROCESSES)]  # fmt: skip
    for w in workers:
        w.start()
    latencies = [x for _ in workers for x in queue.get()]
    for w in workers:
        w.join()
    q = statistics.quantiles(latencies, n=100)
    return len(latencies) / SECONDS, q[49] * 1e3, q[98] * 1e3


# -- the three parts ---------------------------------------------------------------------------


def requests_table(directory: Path) -> list[str]:
    load = wrk if shutil.which("wrk") else processes
    daemon, port, _ = start_daemon(directory / "requests", 1)
    try:
        token = {kit.TOKEN: kit.token(port)}
        size = len(
            kit.one(port, kit.get("/latest/meta-data/iam/security-credentials/bench", token))[1]
        )
        baseline = subprocess.Popen([sys.executable, "-c", BASELINE, str(size)],
                                    stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert baseline.stdout is not None
        base_port = int(baseline.stdout.readline())
        try:
            creds = "/latest/meta-data/iam/security-credentials/bench"
            cases = [
                (f"baseline: bare aiohttp, constant {size}-byte body", base_port, "GET", creds, {}),
                ("imdsd: credential document (IMDSv2 token)", port, "GET", creds, token),
                ("imdsd: meta-data leaf (IMDSv2 token)", port, "GET",
                 "/latest/meta-data/instance-id", token),
                ("imdsd: token PUT", port, "PUT", "/latest/api/token", {TTL: "21600"}),
                ("imdsd: 401 refusal (bad token)", port, "GET", creds,
                 {"X-aws-ec2-metadata-token": "x" * 56}),
            ]  # fmt: skip
            load(base_port, "GET", creds, {})  # warm both before measuring
            load(port, "GET", creds, token)
            runs: dict[str, list[tuple[float, float, float]]] = {c[0]: [] for c in cases}
            for _ in range(ROUNDS):  # interleaved: a noisy neighbour hits every row alike
                for name, *args in cases:
                    runs[name].append(load(*args))  # type: ignore[arg-type]
            rows = [(name, _median(results)) for name, results in runs.items()]
        finally:
            baseline.terminate()
    finally:
        daemon.terminate()
    base = rows[0][1][0]
    how = (
        f"wrk, 1 thread, {CONNECTIONS} connections"
        if load is wrk
        else (
            f"{CLIENT_PROCESSES} asyncio client processes, {CONNECTIONS} connections (wrk not installed)"
        )
    )
    lines = [f"load generator: {how}; keep-alive, 127.0.0.1; each row the median of {ROUNDS} "
             f"runs of {SECONDS} s, interleaved"]  # fmt: skip
    lines += [f"{name:<46} {rps:>9,.0f} req/s {rps / base:>6.0%}  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
              for name, (rps, p50, p99) in rows]  # fmt: skip
    return lines


def _median(results: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The run with the median throughput (its own latencies with it)."""
    return sorted(results)[len(results) // 2]


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def memory_table(directory: Path) -> list[str]:
    lines, resident = [], {}
    for count in (1, 1_000, 10_000):
        daemon, _, seconds = start_daemon(directory / f"m{count}", count)
        try:
            time.sleep(0.5)
            resident[count] = rss_kib(daemon.pid)
        finally:
            daemon.terminate()
            daemon.wait()
        lines.append(f"{count:>6,} instances: RSS {resident[count] / 1024:6.1f} MB; "
                     f"start to the last instance's credentials {seconds:5.2f} s")  # fmt: skip
    per = (resident[10_000] - resident[1]) * 1024 / 9_999
    lines.append(f"per instance (10,000 vs 1): {per:,.0f} bytes")
    return lines


def spread_table(count: int = 10_000, lifetime: timedelta = timedelta(hours=6)) -> list[str]:
    policy, rng = RotationPolicy(), random.Random(8)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    calls: Counter[int] = Counter()
    horizon = start + timedelta(hours=24)
    for i in range(count):
        issued = start
        due = first_refresh_at(_session(issued, lifetime), policy, (i + rng.random()) / count)
        while due < horizon:
            calls[int((due - start).total_seconds() // 60)] += 1
            issued = due
            due = refresh_at(_session(issued, lifetime), policy, rng.random())
    later = [calls[m] for m in range(60, 24 * 60)]
    steady = count / (lifetime.total_seconds() / 60)
    return [
        f"{count:,} sessions primed at once, {lifetime} lifetime, default [rotation], over 24 h:",
        f"peak upstream calls per minute from the first hour on: {max(later)} "
        f"({max(later) / steady:.2f} x N / lifetime = {steady:.1f}/min); in the first hour: "
        f"{max(calls[m] for m in range(60))}; mean {statistics.mean(later):.1f}/min",
    ]


def _session(issued: datetime, lifetime: timedelta) -> Session:
    return Session(access_key_id="ASIA", secret_access_key="-", token="-",
                   expiration=issued + lifetime, issued_at=issued)  # fmt: skip


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())  # fmt: skip
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    # The daemon starts as an install runs it: with its bytecode compiled (pip compiles at
    # install; a tree run with PYTHONDONTWRITEBYTECODE=1 would compile imdsd at every start).
    compileall.compile_dir(Path(__file__).parents[2] / "imdsd", quiet=1)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        for line in requests_table(Path(tmp)):
            print(line, flush=True)
        print()
        for line in memory_table(Path(tmp)):
            print(line, flush=True)
        print("\n".join(["", *control.table(Path(tmp))]), flush=True)
        print("\n".join(["", *storm.table(Path(tmp))]), flush=True)
        print("\n".join(["", *vault.table(Path(tmp))]), flush=True)
    print()
    for line in spread_table():
        print(line)


if __name__ == "__main__":
    main()
