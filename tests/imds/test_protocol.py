"""The token endpoint, the per-instance token policy, and EC2's error statuses (invariant 5)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from dataclasses import replace
from datetime import timedelta

import pytest

from imdsd.config.host import ImdsConfig
from imdsd.config.reader import Listener
from imdsd.daemon import Daemon, running
from imdsd.errors import BackendError
from imdsd.imds.render import ERROR_PAGES
from tests.fakes import FakeClock, FlakyBackend
from tests.helpers import VM_B, http, make_config, token_for

A, B, C, D = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
ID_PATH = "/latest/meta-data/instance-id"


async def test_token_put_echoes_ttl(daemon: Daemon, url: str) -> None:
    """PUT /latest/api/token answers 200, the token as text, and the TTL header echoed."""
    reply = await http(url, "/latest/api/token", method="PUT", source=A, headers={TTL: "21600"})
    assert reply.status == 200
    assert reply.headers[TTL.lower()] == "21600"
    assert reply.headers["content-type"] == "text/plain"
    assert len(reply.text) == 56


@pytest.mark.parametrize("ttl", [None, "0", "21601", "-1", "abc", ""])
async def test_token_put_bad_ttl_is_400(daemon: Daemon, url: str, ttl: str | None) -> None:
    """A missing or out-of-range TTL is 400 with EC2's page (botocore treats 400 as fatal)."""
    headers = {} if ttl is None else {TTL: ttl}
    reply = await http(url, "/latest/api/token", method="PUT", source=A, headers=headers)
    assert (reply.status, reply.body) == (400, ERROR_PAGES[400])
    assert reply.headers["content-type"] == "text/html"


async def test_token_put_through_proxy_is_403(daemon: Daemon, url: str) -> None:
    """A PUT carrying X-Forwarded-For is refused a token: 403, as EC2 does."""
    reply = await http(url, "/latest/api/token", method="PUT", source=A,
                       headers={TTL: "60", "X-Forwarded-For": "10.0.0.1"})  # fmt: skip
    assert (reply.status, reply.body) == (403, ERROR_PAGES[403])


@pytest.mark.parametrize(("method", "path"), [("GET", "/latest/api/token"), ("POST", "/latest/api/token"),
                                              ("POST", ID_PATH), ("DELETE", "/latest/meta-data/"),
                                              ("PUT", ID_PATH)])  # fmt: skip
async def test_wrong_method_is_405(daemon: Daemon, url: str, method: str, path: str) -> None:
    """The token path takes PUT; the tree takes GET: anything else is 405."""
    reply = await http(url, path, method=method, source=A, headers={TTL: "60"})
    assert (reply.status, reply.body) == (405, ERROR_PAGES[405])


async def test_optional_tokens(daemon: Daemon, url: str, clock: FakeClock) -> None:
    """http_tokens=optional: served without a token; a bad or expired token is 401."""
    assert (await http(url, ID_PATH, source=A)).status == 200
    assert (await http(url, ID_PATH, source=A, headers={TOKEN: "bogus"})).status == 401
    token = await token_for(url, A, ttl=60)
    assert (await http(url, ID_PATH, source=A, headers={TOKEN: token})).status == 200
    clock.advance(timedelta(seconds=60))
    reply = await http(url, ID_PATH, source=A, headers={TOKEN: token})
    assert (reply.status, reply.body) == (401, ERROR_PAGES[401])
    assert (await http(url, ID_PATH, source=A)).status == 200


async def test_required_tokens(daemon: Daemon, url: str, clock: FakeClock) -> None:
    """http_tokens=required: 401 without a valid token, 200 with one, 401 once it expires."""
    reply = await http(url, ID_PATH, source=B)
    assert (reply.status, reply.body) == (401, ERROR_PAGES[401])
    token = await token_for(url, B, ttl=300)
    reply = await http(url, ID_PATH, source=B, headers={TOKEN: token})
    assert (reply.status, reply.text) == (200, VM_B)
    clock.advance(timedelta(seconds=301))
    assert (await http(url, ID_PATH, source=B, headers={TOKEN: token})).status == 401


async def test_disabled_endpoint_is_403_for_everything(daemon: Daemon, url: str) -> None:
    """http_endpoint=disabled: every request, token PUT included, is 403."""
    for method, path in [
        ("GET", ID_PATH),
        ("GET", "/"),
        ("PUT", "/latest/api/token"),
        ("GET", "/nope"),
    ]:
        reply = await http(url, path, method=method, source=C, headers={TTL: "60"})
        assert (reply.status, reply.body) == (403, ERROR_PAGES[403])


async def test_malformed_request_does_not_disturb_others(daemon: Daemon, url: str) -> None:
    """Invariant 5: garbage on one connection gets a 400 and every other VM is still served."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(A, 0))
    writer.write(b"\x16\x03\x01\x00\xa5garbage that is not HTTP\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.split(b" ", 2)[1] == b"400"
    assert b"Traceback" not in answer
    huge = await http(url, "/latest/meta-data/" + "a" * 20000, source=D)
    assert huge.status in (400, 404, 414, 431) and b"Traceback" not in huge.body
    assert (await http(url, ID_PATH, source=D)).status == 200


async def test_failure_document_once_no_valid_session(daemon: Daemon, url: str, clock: FakeClock,
                                                      flaky: list[FlakyBackend]) -> None:  # fmt: skip
    """Invariant 3 over HTTP: with the issuer down, A keeps its keys until they expire;
    then it gets EC2's failure shape (200, Code/Message/LastUpdated), never expired keys,
    and B (its own session) is unaffected in the meantime."""
    path = "/latest/meta-data/iam/security-credentials/role-a"
    before = json.loads((await http(url, path, source=A)).body)
    flaky[0].failing = BackendError("ServiceUnavailable", "The issuer is unavailable.")
    clock.advance(timedelta(hours=4))
    await asyncio.gather(*await daemon.rotator.wake())
    assert json.loads((await http(url, path, source=A)).body) == before
    clock.advance(timedelta(hours=2))
    reply = await http(url, path, source=A)
    assert reply.status == 200
    doc = json.loads(reply.body)
    assert list(doc) == ["Code", "Message", "LastUpdated"]
    assert doc["Code"] == "ServiceUnavailable" and "AccessKeyId" not in doc
    assert (await http(url, "/latest/meta-data/instance-id", source=D)).status == 200


def start_capture(url: str, marker: bytes) -> tuple[threading.Thread, list[int], socket.socket]:
    """Capture loopback with an AF_PACKET socket: the IPv4 TTL or IPv6 hop limit of packets
    from the daemon's port that carry `marker` land in the returned list (PermissionError
    without CAP_NET_RAW)."""
    port = int(url.rsplit(":", 1)[1])
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
    sniffer.bind(("lo", 0))
    sniffer.settimeout(0.2)
    found: list[int] = []

    def sniff() -> None:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not found:
            try:
                frame = sniffer.recv(65535)
            except TimeoutError:
                continue
            ethertype, ip = struct.unpack("!H", frame[12:14])[0], frame[14:]
            if ethertype == 0x0800:
                header, hops = (ip[0] & 0x0F) * 4, ip[8]
            elif ethertype == 0x86DD:
                header, hops = 40, ip[7]  # no extension headers on loopback TCP
            else:
                continue
            if struct.unpack("!H", ip[header : header + 2])[0] == port and marker in ip:
                found.append(hops)

    thread = threading.Thread(target=sniff)
    thread.start()
    return thread, found, sniffer


async def put_token_captured(url: str, source: str | None) -> list[int]:
    """PUT a token while capturing; the TTL/hop limit of the reply's packet(s)."""
    try:
        thread, found, sniffer = start_capture(url, b"X-aws-ec2-metadata-token-ttl-seconds")
    except PermissionError:
        pytest.skip("capturing packets needs CAP_NET_RAW")
    try:
        reply = await http(
            url, "/latest/api/token", method="PUT", source=source, headers={TTL: "60"}
        )
        assert reply.status == 200
        await asyncio.to_thread(thread.join)
    finally:
        sniffer.close()
    return found


async def test_hop_limit_sets_ttl_of_token_reply(daemon: Daemon, url: str) -> None:
    """HttpPutResponseHopLimit: the token reply leaves with the instance's hop_limit as its
    IP TTL (B: 3), seen on the wire with a packet capture on loopback."""
    assert await put_token_captured(url, B) == [3]


async def test_ipv6_listener_and_caller(clock: FakeClock) -> None:
    """An instance is also known by an IPv6 address (B: ::1); the token reply leaves with the
    instance's hop limit as its IPv6 hop limit, seen on the wire."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    config = replace(make_config(), imds=ImdsConfig(listeners=(Listener(host="::1", port=0),)))
    try:
        async with running(config, clock) as d:
            url = d.urls[0]
            assert url.startswith("http://[::1]:")
            token = await token_for(url, None)
            reply = await http(url, ID_PATH, source=None, headers={TOKEN: token})
            assert reply.text == VM_B
            assert await put_token_captured(url, None) == [3]
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
