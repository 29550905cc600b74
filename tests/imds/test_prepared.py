"""The guest edge answers with prepared writes only: the token PUT (one MAC, one write), every
refusal and HEAD, like the tree's GETs. Their bytes are pinned by test_wire.py; these tests pin
that no aiohttp response object is built for them, and the one socket option a token reply
sets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from imdsd.daemon import Daemon
from imdsd.imds.handlers import set_hop_limit
from tests.helpers import http

A, B, C, STRANGER = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.9"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
CREDS = "/latest/meta-data/iam/security-credentials/role-b"


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The class name of every aiohttp response object constructed while the test runs."""
    names: list[str] = []
    original = web.StreamResponse.__init__

    def spy(self: web.StreamResponse, *args: Any, **kwargs: Any) -> None:
        names.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(web.StreamResponse, "__init__", spy)
    return names


async def test_token_put_and_refusals_build_no_response_object(
    daemon: Daemon, url: str, built: list[str]
) -> None:
    """The token PUT, the 401s (bad token, no token), 403, 404, 405, 400 (bad TTL, a body over
    the limit, a request the parser refuses) and HEAD are each one prepared write: no aiohttp
    Response is built for any of them (a metrics scrape, which does build one, shows that the
    spy sees them)."""
    cases: list[tuple[str, str, str, dict[str, str]]] = [
        (A, "PUT", "/latest/api/token", {TTL: "21600"}),
        (B, "GET", CREDS, {TOKEN: "x" * 56}),
        (B, "GET", CREDS, {}),
        (B, "HEAD", CREDS, {}),
        (C, "GET", "/latest/meta-data/", {}),
        (STRANGER, "GET", "/latest/meta-data/", {}),
        (A, "GET", "/latest/api/token", {}),
        (A, "PUT", "/latest/api/token", {TTL: "0"}),
        (A, "GET", "/latest/meta-data/", {"Content-Length": "5000"}),
        (A, "HEAD", "/latest/meta-data/instance-id", {}),
    ]
    statuses = [
        (await http(url, path, method=method, source=source, headers=headers)).status
        for source, method, path, headers in cases
    ]
    refused = await http(url, "/", source=A, headers={"No colon here": ""})
    assert statuses == [200, 401, 401, 401, 403, 404, 405, 400, 400, 200]
    assert refused.status == 400
    assert built == []
    assert daemon.metrics_url is not None
    async with (
        aiohttp.ClientSession() as client,
        client.get(daemon.metrics_url + "/metrics") as scrape,
    ):
        assert scrape.status == 200
    assert built == ["Response"]


class _Socket:
    """A real TCP socket that counts the options set on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.family, self.calls = sock, sock.family, 0

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.calls += 1
        self.sock.setsockopt(level, option, value)


class _Transport:
    def __init__(self, sock: _Socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> _Socket:
        assert name == "socket"
        return self.sock


class _Connection:
    """What set_hop_limit reads of a GuestConnection: its peer and the TTL already set."""

    def __init__(self, transport: _Transport) -> None:
        self.transport, self.peer, self.hop_limit = transport, A, None


class _Request:
    def __init__(self, connection: _Connection) -> None:
        self.protocol, self.transport = connection, connection.transport


@pytest.fixture
def tcp() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    yield sock
    sock.close()


def test_hop_limit_is_set_once_per_connection_and_follows_a_change(tcp: socket.socket) -> None:
    """A token reply's IP TTL is set on the connection's socket before the answer; the next
    PUT on that connection with the same hop limit makes no system call, and a changed hop
    limit (the instance's metadata options replaced) is set again."""
    counted = _Socket(tcp)
    request = cast(web.BaseRequest, _Request(_Connection(_Transport(counted))))
    set_hop_limit(request, 3)
    assert (tcp.getsockopt(socket.IPPROTO_IP, socket.IP_TTL), counted.calls) == (3, 1)
    set_hop_limit(request, 3)
    assert counted.calls == 1
    set_hop_limit(request, 5)
    assert (tcp.getsockopt(socket.IPPROTO_IP, socket.IP_TTL), counted.calls) == (5, 2)


async def test_every_put_on_a_kept_alive_connection_gets_a_token(daemon: Daemon, url: str) -> None:
    """Several token PUTs on one kept-alive connection each get a 200 and a token (the hop
    limit set once for the connection), and a GET with the last token is answered after them."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(B, 0))
    put = f"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n{TTL}: 60\r\n\r\n".encode()
    tokens = []
    try:
        for _ in range(3):
            writer.write(put)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and f"{TTL}: 60".encode() in head
            tokens.append(await reader.readexactly(56))
        get = f"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n{TOKEN}: {tokens[-1].decode()}"
        writer.write(get.encode() + b"\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).endswith(b"i-0bbbbbbbbbbbbbbbb")
    finally:
        writer.close()
    assert all(len(t) == 56 for t in tokens)
