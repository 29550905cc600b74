"""Every answer that is not a GET of the tree, byte for byte on the wire (invariant 5).

The token PUT, the refusals (400, 401, 403, 404, 405, 429) and HEAD, each as a raw request on
its own socket from the address of the instance it concerns, then a probe request on the same
connection: the probe's answer shows that the connection stayed open, its absence that the
answer closed it. Only the Date value and the minted token vary between runs; they are
replaced by placeholders. The expected bytes were captured from the daemon before these answers
became prepared writes (tests/imds/wire.json); regenerate after a deliberate change with
IMDSD_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from imdsd.daemon import running
from tests.fakes import FakeClock
from tests.helpers import make_config

GOLDEN = Path(__file__).parent / "wire.json"
A, B, C, D, STRANGER = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.9"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
CREDS = "/latest/meta-data/iam/security-credentials/role-b"
PROBE = b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
GUARD_SECONDS = 5.0
CLOSED = "<closed>"


def request(line: str, *headers: str, body: str = "") -> bytes:
    return ("\r\n".join((line, "Host: x", *headers)) + "\r\n\r\n" + body).encode()


PUT = "PUT /latest/api/token HTTP/1.1"
CASES: dict[str, tuple[str, bytes]] = {
    "token PUT": (A, request(PUT, f"{TTL}: 21600")),
    "token PUT, hop limit 3": (B, request(PUT, f"{TTL}: 60")),
    "token PUT, Connection: close": (A, request(PUT, f"{TTL}: 21600", "Connection: close")),
    "token PUT, HTTP/1.0": (A, request("PUT /latest/api/token HTTP/1.0", f"{TTL}: 1")),
    "token PUT, HTTP/1.0 keep-alive": (
        A, request("PUT /latest/api/token HTTP/1.0", f"{TTL}: 1", "Connection: keep-alive")
    ),
    "token PUT with a small body": (A, request(PUT, f"{TTL}: 5", "Content-Length: 5", body="hello")),
    "token PUT, TTL not a number": (A, request(PUT, f"{TTL}: abc")),
    "token PUT, TTL out of range": (A, request(PUT, f"{TTL}: 21601")),
    "token PUT, no TTL": (A, request(PUT)),
    "token PUT, X-Forwarded-For": (A, request(PUT, f"{TTL}: 60", "X-Forwarded-For: 10.0.0.1")),
    "token PUT, endpoint disabled": (C, request(PUT, f"{TTL}: 60")),
    "token PUT, stranger": (STRANGER, request(PUT, f"{TTL}: 60")),
    "token GET": (A, request("GET /latest/api/token HTTP/1.1", f"{TTL}: 60")),
    "token HEAD": (A, request("HEAD /latest/api/token HTTP/1.1")),
    "401 bad token": (B, request(f"GET {CREDS} HTTP/1.1", f"{TOKEN}: {'x' * 56}")),
    "401 bad token, optional tokens": (
        A, request("GET /latest/meta-data/instance-id HTTP/1.1", f"{TOKEN}: nope")
    ),
    "401 no token": (B, request(f"GET {CREDS} HTTP/1.1")),
    "401 no token, HEAD": (B, request(f"HEAD {CREDS} HTTP/1.1")),
    "401 no token, HTTP/1.0": (B, request(f"GET {CREDS} HTTP/1.0")),
    "401 no token, HTTP/1.0 keep-alive": (
        B, request(f"GET {CREDS} HTTP/1.0", "Connection: keep-alive")
    ),
    "401 no token, Connection: close": (B, request(f"GET {CREDS} HTTP/1.1", "Connection: close")),
    "403 endpoint disabled": (C, request("GET /latest/meta-data/ HTTP/1.1")),
    "404 stranger": (STRANGER, request("GET /latest/meta-data/ HTTP/1.1")),
    "404 stranger, HEAD": (STRANGER, request("HEAD /latest/meta-data/ HTTP/1.1")),
    "404 no such path": (A, request("GET /latest/meta-data/nope HTTP/1.1")),
    "404 no such path, HEAD": (A, request("HEAD /latest/meta-data/nope HTTP/1.1")),
    "405 POST on the tree": (A, request("POST /latest/meta-data/ HTTP/1.1")),
    "405 PUT on the tree": (D, request("PUT /latest/meta-data/instance-id HTTP/1.1")),
    "400 body over the limit": (A, request("GET /latest/meta-data/ HTTP/1.1", "Content-Length: 5000")),
    "400 body of unknown length": (
        A, request("GET /latest/meta-data/ HTTP/1.1", "Transfer-Encoding: chunked")
    ),
    "400 HTTP/2.0 request line": (A, request("GET /latest/meta-data/ HTTP/2.0")),
    "400 parser refusal": (A, request("GET / HTTP/1.1", "No colon here")),
    "404 parser refusal, stranger": (STRANGER, request("GET / HTTP/1.1", "No colon here")),
    "200 HEAD of a leaf": (A, request("HEAD /latest/meta-data/instance-id HTTP/1.1")),
    "200 GET of a leaf": (A, request("GET /latest/meta-data/instance-id HTTP/1.1")),
}  # fmt: skip
# A budget of one request at a time: the second of two back-to-back requests is refused.
THROTTLED = "[budgets]\nrequests_per_second = 100\nburst = 1\n"
THROTTLED_CASE = "429 over budget"


def scrub(raw: bytes) -> str:
    """The wire bytes as text, with the Date value and any minted token replaced."""
    text = raw.decode("latin-1")
    text = re.sub(r"Date: [^\r]*GMT", "Date: <date>", text)
    return re.sub(r"\r\n\r\n[A-Za-z0-9_-]{56}(?=HTTP/|$)", "\r\n\r\n<token>", text)


async def read_answer(reader: asyncio.StreamReader, head_only: bool) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    if head_only:
        return head
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def exchange(url: str, source: str, *requests: bytes) -> str:
    """Each request's answer in turn on one connection, then the probe's (or CLOSED)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(
        parts.hostname, parts.port, local_addr=(source, 0)
    )
    try:
        answers = []
        for raw in requests:
            writer.write(raw)
            answers.append(await read_answer(reader, raw.startswith(b"HEAD ")))
        try:
            writer.write(PROBE)
            rest = await reader.read()
        except ConnectionError:
            rest = b""
        return "".join(scrub(a) for a in answers) + (scrub(rest) if rest else CLOSED)
    finally:
        writer.close()


async def answers(clock: FakeClock) -> dict[str, str]:
    found = {}
    async with running(make_config(), clock) as daemon:
        for name, (source, raw) in CASES.items():
            found[name] = await asyncio.wait_for(
                exchange(daemon.urls[0], source, raw), GUARD_SECONDS
            )
    async with running(make_config(THROTTLED), clock) as daemon:
        leaf = request("GET /latest/meta-data/instance-id HTTP/1.1")
        found[THROTTLED_CASE] = await asyncio.wait_for(
            exchange(daemon.urls[0], A, leaf, leaf), GUARD_SECONDS
        )
    return found


@pytest.fixture(scope="module")
def golden() -> dict[str, str]:
    return dict(json.loads(GOLDEN.read_text())) if GOLDEN.exists() else {}


async def test_wire_bytes_unchanged(clock: FakeClock, golden: dict[str, str]) -> None:
    """Invariant 5: every token PUT, refusal and HEAD answer is the same bytes on the wire as
    before they were prepared writes (status line, header order, body, Connection: close), and
    closes the connection exactly where it did."""
    found = await answers(clock)
    if os.environ.get("IMDSD_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(found, indent=1) + "\n")
    for name, expected in golden.items():
        assert found[name] == expected, name
    assert set(found) == set(golden)
