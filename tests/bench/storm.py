"""`make bench`, a host rebooting: the boot storm right after a warm start, and memory once
every guest of a 10,000-VM host has crawled its tree.

1. Boot storm: 1,000 instances, each a cloud-init crawl (a token PUT, every path meta-data/
   lists, followed down its listings, dynamic/instance-identity/* and user-data) then an SDK
   fetch (PUT, the role listing, the credentials), from 64 concurrent connections spread over
   the instances (a connection per instance, bound to its address), against a daemon started
   warm: started once (so the vault and the kept signatures exist), stopped, started again,
   and stormed as soon as it listens. Beside it, the bare-aiohttp baseline app of the bench
   answers the very same requests (recorded from the storm, replayed by the same client).
   Then a second storm of the same instances: each instance's first crawl against its second,
   pooled over the rounds.
2. Resident memory at 10,000 instances, before and after every guest crawled its tree once.

The daemon runs as users run it (`imdsd run`, its own process); the load comes from client
processes with asyncio, as the bench's own fallback client does; traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from tests.bench import kit
from tests.bench.baseline import BASELINE

STORM = 1_000
HOST = 10_000
CONNECTIONS = 64
ROUNDS = 3  # warm restarts stormed, each beside its own baseline run
CLIENT_PROCESSES = 3
SIGNATURES = "identity-signatures"


def address(n: int) -> str:
    return f"127.1.{n // 250}.{n % 250 + 1}"


def write_config(directory: Path, count: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "storm.toml"
    text = kit.head(directory, "a crawl is ~40 requests in a burst",
                        extra="[rotation]\nmax_rate = 10000\n")  # fmt: skip
    text += kit.profile("bench")
    text += "".join(kit.instance(n, address(n), user_data=f"#cloud-config\nhostname: vm-{n}\n")
                    + kit.association(n) for n in range(count))  # fmt: skip
    path.write_text(text)
    return path


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(60)


def credentials_served(port: int, source: str) -> bool:
    """One IMDSv2 credential fetch over plain blocking sockets (no event loop per poll)."""
    path = "/latest/meta-data/iam/security-credentials/bench"
    _, body = kit.one(port, kit.get(path, {kit.TOKEN: kit.token(port, source)}), source)
    return b'"Success"' in body


def settled(directory: Path, count: int, port: int) -> None:
    """Every instance has its credentials, and the notary has written every signature down
    (the kept file stops growing at about a record per instance)."""
    while not credentials_served(port, address(count - 1)):
        time.sleep(0.05)
    path, last, since = directory / "state" / SIGNATURES, -1, time.monotonic()
    while True:
        size = path.stat().st_size if path.exists() else 0
        if size != last:
            last, since = size, time.monotonic()
        elif size > count * 500 and time.monotonic() - since > 1.0:
            return
        time.sleep(0.1)


# -- the client: a crawl per instance, recorded, or a recorded crawl replayed ------------------


class Guest:
    """One instance's keep-alive connection from its own address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.sent: list[bytes] = []
        self.failed = self.received = 0

    async def ask(self, request: bytes) -> bytes:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await self.reader.readexactly(length)
        self.sent.append(request)
        self.received += length
        self.failed += not head.startswith(b"HTTP/1.1 200")
        return body

    async def get(self, path: str, token: str) -> bytes:
        return await self.ask(kit.get(path, {kit.TOKEN: token}))

    async def put(self) -> str:
        return (await self.ask(kit.PUT_TOKEN)).decode()

    async def crawl(self) -> float:
        """cloud-init's crawl, then the SDK's fetch; seconds the crawl took."""
        started = time.perf_counter()
        token = await self.put()
        directories = deque(["/latest/meta-data/"])
        while directories:
            directory = directories.popleft()
            for name in (await self.get(directory, token)).decode().split("\n"):
                name = name.split("=", 1)[0] + "/" if "=" in name else name  # public-keys/
                if name.endswith("/"):
                    directories.append(directory + name)
                elif name:
                    await self.get(directory + name, token)
        identity = "/latest/dynamic/instance-identity/"
        for name in (await self.get(identity, token)).decode().split("\n"):
            await self.get(identity + name, token)
        await self.get("/latest/user-data", token)
        crawled = time.perf_counter() - started
        token = await self.put()  # the SDK: PUT, the role's name, its credentials
        roles = "/latest/meta-data/iam/security-credentials/"
        role = (await self.get(roles, token)).decode().split("\n")[0]
        await self.get(roles + role, token)
        return crawled


async def _storm(port: int, numbers: list[int], connections: int, go: float,
                 replay: dict[int, list[bytes]] | None) -> dict[int, Any]:  # fmt: skip
    todo, done = deque(numbers), {}

    async def connection() -> None:
        while todo:
            n = todo.popleft()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(address(n), 0)
            )
            guest = Guest(reader, writer)
            if replay is None:
                crawled = await guest.crawl()
            else:
                started = time.perf_counter()
                for request in replay[n]:
                    await guest.ask(request)
                crawled = time.perf_counter() - started
            writer.close()
            done[n] = (crawled, guest.sent, guest.failed, time.time(), guest.received)

    await asyncio.sleep(max(0.0, go - time.time()))
    await asyncio.gather(*(connection() for _ in range(connections)))
    return done


def _client(port: int, numbers: list[int], connections: int, go: float,
            replay: dict[int, list[bytes]] | None, out: Any) -> None:  # fmt: skip
    out.put(asyncio.run(_storm(port, numbers, connections, go, replay)))


def storm(port: int, count: int, replay: dict[int, list[bytes]] | None = None) -> dict[str, Any]:
    """Every instance crawled once from CLIENT_PROCESSES processes sharing CONNECTIONS:
    {"seconds", "requests", "failed", "crawl" (seconds per instance), "sent" (per instance)}."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    go = time.time() + 0.3  # every process ready before the first request
    shares = [CONNECTIONS // CLIENT_PROCESSES + (k < CONNECTIONS % CLIENT_PROCESSES)
              for k in range(CLIENT_PROCESSES)]  # fmt: skip
    workers = [context.Process(target=_client, args=(port, list(range(k, count, CLIENT_PROCESSES)),
                                                     shares[k], go, replay, queue))
               for k in range(CLIENT_PROCESSES)]  # fmt: skip
    for w in workers:
        w.start()
    done: dict[int, Any] = {}
    for _ in workers:
        done |= queue.get()
    for w in workers:
        w.join()
    sent = {n: d[1] for n, d in done.items()}
    return {
        "seconds": max(d[3] for d in done.values()) - go,
        "requests": sum(len(s) for s in sent.values()),
        "failed": sum(d[2] for d in done.values()),
        "received": sum(d[4] for d in done.values()),
        "crawl": {n: d[0] for n, d in done.items()},
        "sent": sent,
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used (a figure a noisy machine moves less)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def _quantiles(seconds: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(seconds, n=100)
    return statistics.median(seconds) * 1e3, q[98] * 1e3


# -- the two rows --------------------------------------------------------------------------


def boot_storm(directory: Path) -> list[str]:
    """ROUNDS rounds, each a warm restart stormed twice and then the baseline replaying the
    first storm's requests: the machine's drift lands on both sides of each ratio, which is
    the median over the rounds (as the request table interleaves its runs)."""
    config, log = write_config(directory, STORM), directory / "daemon.log"
    daemon, port = kit.start(config, log)
    try:  # the first start: keys, vault, sessions and every signature made and kept
        settled(directory, STORM, port)
    finally:
        stop(daemon)
    rounds = [_round(config, log) for _ in range(ROUNDS)]
    first, second, base, used, base_used, size = rounds[-1]
    ratios = sorted(
        (_rate(f) / _rate(b), _rate(s) / _rate(b)) for f, s, b, *_ in rounds
    )  # fmt: skip
    ratio, again = statistics.median(r[0] for r in ratios), statistics.median(r[1] for r in ratios)
    # Each instance's first crawl against its second, over every round (one round's 1,000
    # pairs moved the medians by +-4 % from run to run, either way): pooled, and per round.
    pairs = [(f["crawl"][n], s["crawl"][n]) for f, s, *_ in rounds for n in f["crawl"]]
    slower = sum(a > b for a, b in pairs) / len(pairs)
    (m1, p1), (m2, p2) = (_quantiles([pair[i] for pair in pairs]) for i in (0, 1))
    per_round = ", ".join(f"{statistics.median(f['crawl'].values()) * 1e3:.0f} / "
                          f"{statistics.median(s['crawl'].values()) * 1e3:.0f}"
                          for f, s, *_ in rounds)  # fmt: skip
    each = ", ".join(f"{a:.0%}" for a, _ in ratios)
    return [
        f"boot storm: {STORM:,} instances, each a cloud-init crawl then an SDK fetch "
        f"({first['requests'] / STORM:.0f} requests), {CONNECTIONS} connections from "
        f"{CLIENT_PROCESSES} client processes, right after a warm start; {ROUNDS} rounds, each "
        "beside its own baseline run",
        f"{f'baseline: bare aiohttp, the same requests, {size}-byte body':<52} "
        f"{_rate(base):>9,.0f} req/s  100%  (the last round)",
        f"{'imdsd: boot storm':<52} {_rate(first):>9,.0f} req/s {ratio:>5.0%}"
        f"  (median of the rounds: {each}; {first['failed']} not 200)",
        f"{'imdsd: the same guests again (second crawls)':<52} {_rate(second):>9,.0f} req/s "
        f"{again:>5.0%}",
        f"crawl per instance, first / second (the {ROUNDS} rounds' {len(pairs):,}): median "
        f"{m1:.1f} / {m2:.1f} ms, p99 {p1:.1f} / {p2:.1f} ms; the first slower in {slower:.0%} "
        f"of pairs; each round's medians: {per_round} ms",
        f"CPU per request: baseline {base_used / base['requests'] * 1e6:.0f} us; imdsd "
        f"{used[0] / first['requests'] * 1e6:.0f} us (the first storm, from listening on), "
        f"{used[1] / second['requests'] * 1e6:.0f} us (the second)",
    ]


Round = tuple[dict[str, Any], dict[str, Any], dict[str, Any], tuple[float, float], float, int]


def _round(config: Path, log: Path) -> Round:
    """A warm start stormed as soon as it listens, then again; then the baseline app replaying
    the first storm's requests (a body of the storm's mean size)."""
    daemon, port = kit.start(config, log)
    try:
        before = cpu_seconds(daemon.pid)  # start-up's own, up to listening
        first = storm(port, STORM)
        once = cpu_seconds(daemon.pid) - before  # the first storm, and what start-up still does
        second = storm(port, STORM)
        used = (once, cpu_seconds(daemon.pid) - before - once)
    finally:
        stop(daemon)
    size = first["received"] // first["requests"]
    baseline = subprocess.Popen([sys.executable, "-c", BASELINE, str(size)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert baseline.stdout is not None
        base_port, base_used = int(baseline.stdout.readline()), cpu_seconds(baseline.pid)
        base = storm(base_port, STORM, replay=first["sent"])
        base_used = cpu_seconds(baseline.pid) - base_used
    finally:
        baseline.terminate()
        baseline.wait()
    return first, second, base, used, base_used, size


def _rate(result: dict[str, Any]) -> float:
    return float(result["requests"] / result["seconds"])


def host_memory(directory: Path) -> list[str]:
    config = write_config(directory, HOST)
    daemon, port = kit.start(config, directory / "daemon.log")
    try:
        settled(directory, HOST, port)
        before = rss_mib(daemon.pid)
        crawled = storm(port, HOST)
        time.sleep(0.5)
        after = rss_mib(daemon.pid)
    finally:
        stop(daemon)
    return [
        f"{HOST:,} instances: RSS {before:.1f} MB before any crawl, {after:.1f} MB after every "
        f"guest crawled its tree once ({crawled['requests']:,} requests, "
        f"{crawled['failed']} not 200)"
    ]


def table(directory: Path) -> list[str]:
    return boot_storm(directory / "storm") + host_memory(directory / "host")


if __name__ == "__main__":  # this part alone: python -m tests.bench.storm
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for line in table(Path(tmp)):
            print(line, flush=True)
