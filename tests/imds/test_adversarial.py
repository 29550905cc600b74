"""Invariants 1, 5 and 7 under a seeded generator of malformed and adversarial requests.

More than 10,000 requests (methods, targets, versions, header names, values and sizes, CL/TE
framing, LF-only lines, obs-fold, pipelining, HTTP/0.9, 1.0 and the h2 preface, Expect,
Upgrade, raw junk) from one instance and from an unknown address, against the daemon as a
process at its production log level. Every answer must be EC2's (status and page, Server:
EC2ws, HTTP/1.x), never a 5xx, never another instance's data; the log must hold only JSON,
no traceback, and none of the requests' bytes.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imdsd.imds.render import ERROR_PAGES
from tests.helpers import two_guests
from tests.process import Proc

pytestmark = pytest.mark.slow  # hostile clients against daemon processes

SEED = 20261123
REQUESTS = 10_400
WORKERS = 16
GUEST, STRANGER = "127.0.0.2", "127.0.0.9"
# Only the other instance's data; nothing the guest itself may legitimately receive.
OTHERS = [b"i-0a1c71a1c71a1c71a", b"victims-own-role", b"210987654321", b"127.0.0.3"]
BUDGETS = """
[budgets]
requests_per_second = 100000
burst = 100000
strangers_requests_per_second = 100000
strangers_burst = 100000
strangers_connections = 64
head_timeout = "1s"
idle_timeout = "1s"
"""

METHODS = [b"GET", b"PUT", b"HEAD", b"POST", b"DELETE", b"OPTIONS", b"CONNECT", b"TRACE",
           b"PRI", b"get", b"G\x00T", b"GET\t", b"", b"A" * 9000, b"\xff\xfe", b"GE T"]  # fmt: skip
TARGETS = [b"/", b"/latest/", b"/latest/meta-data/", b"/latest/api/token", b"*",
           b"/latest/meta-data/iam/security-credentials/web",
           b"/latest/meta-data/iam/security-credentials/victims-own-role",
           b"/latest/meta-data/iam/security-credentials-extended/web",
           b"/latest/dynamic/instance-identity/document", b"/2021-03-23/api/token",
           b"http://169.254.169.254/latest/meta-data/", b"/%00", b"/\x7f", "/é".encode(),
           b"/" + b"a" * 9000, b"/..%2f..%2fetc/passwd", b"//latest//meta-data",
           b"/latest/meta-data/instance-id?x=1", b"/#frag", b"", b"/latest/meta-data/\r"]  # fmt: skip
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"", b"HTTP/1.1 x", b"HTTP/9.9",
            b"http/1.1", b"HTTP/1.", b"HTTP/11"]  # fmt: skip
HEADERS = [
    b"Host: 169.254.169.254", b"X-aws-ec2-metadata-token-ttl-seconds: 21600",
    b"X-aws-ec2-metadata-token-ttl-seconds: 0", b"X-aws-ec2-metadata-token-ttl-seconds: 99999999999999",
    b"X-aws-ec2-metadata-token: {marker}", b"X-aws-ec2-metadata-token: " + b"A" * 56,
    b"X-Forwarded-For: 127.0.0.3", b"Forwarded: for=127.0.0.3", b"Content-Length: 5",
    b"Content-Length: -1", b"Content-Length: abc", b"Content-Length: 99999999999999999999",
    b"Content-Length: 5\r\nContent-Length: 6", b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: chunked\r\nContent-Length: 3", b"Transfer-Encoding: gzip, chunked",
    b"Expect: 100-continue", b"Connection: Upgrade\r\nUpgrade: websocket", b"Upgrade: h2c",
    b"X-Ctl: a\x01b", b"Bad Name: x", b"X-Fold: a\r\n folded", b"X-Long: " + b"x" * 10000,
    b"X-Bytes: \xc3\x28\xa0\xa1", b"Connection: keep-alive", b"Connection: close",
    b": empty-name", b"X-Marker: {marker}", b"Accept: text/html",
]  # fmt: skip
JUNK = [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET /\r\n", b"\r\n\r\n", b"\x00" * 64]  # fmt: skip


def request(rng: random.Random, marker: bytes) -> bytes:
    """One generated request: mostly HTTP-shaped, with one or more things wrong or odd."""
    if rng.random() < 0.05:
        return rng.choice(JUNK) + marker
    eol = b"\n" if rng.random() < 0.1 else b"\r\n"
    target = rng.choice(TARGETS) + (b"?m=" + marker if rng.random() < 0.5 else b"")
    line = b" ".join(p for p in (rng.choice(METHODS), target, rng.choice(VERSIONS)) if p)
    headers = [h.replace(b"{marker}", marker) for h in rng.sample(HEADERS, rng.randint(0, 5))]
    if rng.random() < 0.02:
        headers += [b"X-Many-%d: y" % i for i in range(200)]
    body = b"12345" if rng.random() < 0.2 else b""
    if b"chunked" in b"".join(headers) and rng.random() < 0.5:
        body = b"5\r\nhello\r\n0\r\n\r\n"
    return eol.join([line, *headers]) + eol + eol + body


@dataclass
class Tally:
    sent: int = 0
    answers: dict[int, int] = field(default_factory=dict)
    silent: int = 0  # the connection closed without an answer (an incomplete request)
    problems: list[str] = field(default_factory=list)


def answers(raw: bytes) -> tuple[list[tuple[bytes, dict[bytes, bytes], bytes]], bytes]:
    """The answers in `raw` (head, fields, body), and what is left. An answer whose body is
    missing, with nothing or another answer after it, is a HEAD answer (no body, by design)."""
    out = []
    while b"\r\n\r\n" in raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
        length = int(fields.get(b"Content-Length", b"0"))
        if len(rest) < length and (rest == b"" or rest.startswith(b"HTTP/1.")):
            length = 0
        elif len(rest) < length:
            break
        out.append((head, fields, rest[:length]))
        raw = rest[length:]
    return out, raw


def check(raw: bytes, stranger: bool, marker: bytes, tally: Tally) -> None:
    """Every answer in `raw` is EC2's; record any that is not (a torn one included)."""
    found, left = answers(raw)
    if not found:
        tally.silent += 1
    if left:
        tally.problems.append(f"not an HTTP answer: {left[:100]!r}")
    for head, fields, body in found:
        first = head.split(b"\r\n", 1)[0]
        status = int(first.split(b" ")[1]) if first.startswith(b"HTTP/1.") else 0
        tally.answers[status] = tally.answers.get(status, 0) + 1
        page = ERROR_PAGES.get(status, b"")
        if body == b"" and status != 200:  # a HEAD answer: the page's length, not its bytes
            page_ok = fields.get(b"Content-Length") == str(len(page)).encode()
        else:
            page_ok = status == 200 or body == page
        wrong = (
            status == 0
            or status >= 500
            or fields.get(b"Server") != b"EC2ws"
            or (stranger and status != 404)
            or not page_ok
            or marker in head + body
            or any(other in body for other in OTHERS)
        )
        if wrong:
            tally.problems.append(repr(head + b"\r\n\r\n" + body)[:300])


async def exchange(port: int, source: str, payload: bytes) -> bytes:
    """Send `payload` on a new connection; read until the daemon closes, or until it has been
    silent for 0.3 s after answering (a kept-alive connection), or 5 s pass without an answer
    (the head deadline closes an incomplete request after 1 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    raw = b""
    try:
        writer.write(payload)
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 0.3 if raw else 5)
            if not chunk:
                break
            raw += chunk
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()
    return raw


async def worker(port: int, jobs: list[tuple[str, bytes, bytes]], tally: Tally) -> None:
    for source, payload, marker in jobs:
        raw = await exchange(port, source, payload)
        tally.sent += 1
        check(raw, source == STRANGER, marker, tally)


async def barrage(port: int, rng: random.Random) -> tuple[Tally, list[bytes]]:
    jobs: list[tuple[str, bytes, bytes]] = []
    for n in range(REQUESTS):
        marker = b"MRK%08dX" % n
        payload = request(rng, marker)
        if rng.random() < 0.1:  # pipelining: more than one request on one write
            payload += request(rng, marker)
        jobs.append((STRANGER if n % 4 == 0 else GUEST, payload, marker))
    tally = Tally()
    await asyncio.gather(*(worker(port, jobs[i::WORKERS], tally) for i in range(WORKERS)))
    return tally, [job[2] for job in jobs]


def test_generated_adversarial_requests_get_only_ec2_answers(tmp_path: Path) -> None:
    """10,400 generated requests (a quarter from an unknown address): 0 5xx, every answer
    EC2's status and page with Server: EC2ws (strangers: always 404), no other instance's
    data, and a log of JSON lines only, without a traceback or any request's bytes; the
    guest's incidents are summed up in one line, not one per request."""
    daemon = Proc(tmp_path, two_guests(tmp_path, BUDGETS))
    try:
        port = int(daemon.url.rsplit(":", 1)[1])
        tally, markers = asyncio.run(barrage(port, random.Random(SEED)))
    finally:
        assert daemon.stop() == 0
    assert tally.sent == REQUESTS and not tally.problems, tally.problems[:5]
    assert not [s for s in tally.answers if s >= 500], tally.answers
    assert {400, 404}.issubset(tally.answers) and sum(tally.answers.values()) > REQUESTS * 0.8
    text = daemon.log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert "Traceback" not in text and "aiohttp" not in text
    assert not [m for m in markers if m.decode() in text]
    summaries = [e for e in lines if e["event"] == "guest over budget"]
    assert {e["guest"] for e in summaries} == {"i-0f100df100df100df", "strangers"}
    assert all(e["bad_request"] > 100 for e in summaries), summaries
