"""A guest flooding the metadata API: `python -m tests.flood URL SOURCE CONNECTIONS SECONDS`.

Each connection sends GET requests back to back on one keep-alive connection for SECONDS,
from address SOURCE; prints a JSON object of status -> count. Bounded in time and count.
With `--toggled`, it floods only between an "on" and an "off" line on standard input (so a
test can interleave quiet and loud windows), and stops at "stop" or end of input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter

REQUEST = b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
MAX_REQUESTS = 2_000_000


async def worker(
    host: str, port: int, source: str, until: float, counts: Counter[str], on: asyncio.Event
) -> None:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        while time.monotonic() < until and counts.total() < MAX_REQUESTS:
            await on.wait()
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1].decode()
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            counts[status] += 1
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    finally:
        writer.close()


async def main(
    url: str, source: str, connections: int, seconds: float, toggled: bool
) -> Counter[str]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    counts: Counter[str] = Counter()
    until = time.monotonic() + seconds
    on = asyncio.Event()
    if not toggled:
        on.set()
    workers = asyncio.gather(
        *(worker(host, int(port), source, until, counts, on) for _ in range(connections))
    )
    if toggled:
        loop = asyncio.get_running_loop()
        while (line := (await loop.run_in_executor(None, sys.stdin.readline)).strip()) in (
            "on",
            "off",
        ):
            (on.set if line == "on" else on.clear)()
            print("ok", flush=True)
        workers.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await workers
    return counts


if __name__ == "__main__":
    url, source, connections, seconds = sys.argv[1:5]
    toggled = "--toggled" in sys.argv
    print(json.dumps(asyncio.run(main(url, source, int(connections), float(seconds), toggled))))
