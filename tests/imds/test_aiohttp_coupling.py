"""aiohttp's private names that the guest edge relies on, each touched the way imdsd touches it.

The edge (imds/server.py, imds/prepared.py) subclasses aiohttp's low-level server and reads
names aiohttp does not document: `web_protocol.ERROR` (and `RawRequestMessage._replace`),
`web.Server._kwargs` and `_loop`, `RequestHandler._loop` and `_force_close`,
`BaseRequest._payload_writer`, the request factory's call shape, and when the two hooks
GuestConnection overrides are called. pyproject.toml pins aiohttp to the minor series this
suite proves; this test exists so that an upgrade which renames, removes or reshapes any of
them fails here, loudly and by name, in `make test`, not later at a guest.

Every check drives real objects on a real loop: imdsd's own GuestServer (its request factory,
its kwargs) serving real sockets through a RequestHandler built as GuestServer.connection()
builds it, answering with imdsd's Prepared. (imds/listener.py's `_loop` is its own attribute.)
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import ERROR, RequestHandler

from imdsd.imds.app import MetadataApi
from imdsd.imds.prepared import Prepared
from imdsd.imds.server import GuestServer

BODY = b"i-0123456789abcdef0"
HANG_GUARD_SECONDS = 5.0  # a broken coupling must fail, not hang


@dataclass
class Call:
    """One call of the request factory: its arguments and what it built."""

    message: RawRequestMessage
    payload: StreamReader
    protocol: RequestHandler
    writer: AbstractStreamWriter
    task: asyncio.Task[None]
    request: web.BaseRequest


@dataclass
class Seen:
    """What the guest edge's aiohttp objects did for three requests on two connections."""

    loop: asyncio.AbstractEventLoop
    server: GuestServer
    handlers: list[RequestHandler] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    force_close_at_answer: list[object] = field(default_factory=list)
    refusals: list[BaseException | None] = field(default_factory=list)
    answers: list[bytes] = field(default_factory=list)


class Probe(GuestServer):
    """imdsd's GuestServer, its pipeline replaced by one Prepared answer; records each call of
    its own request factory (GuestServer._request, which aiohttp calls)."""

    def __init__(self, seen: list[Call]) -> None:
        super().__init__(cast(MetadataApi, SimpleNamespace(handle=self._answer)))
        self.seen = seen

    async def _answer(self, request: web.BaseRequest) -> Prepared:
        return Prepared(BODY)

    def _request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        request = super()._request(message, payload, protocol, writer, task)
        self.seen.append(Call(message, payload, protocol, writer, task, request))
        return request


class Spy(RequestHandler):
    """A RequestHandler that reads `_force_close` where GuestConnection reads it (log_access)
    and answers a refused request as GuestConnection does (a closing 400)."""

    __slots__ = ("seen",)

    def __init__(self, server: GuestServer, seen: Seen, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self.seen = seen

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        self.seen.force_close_at_answer.append(self._force_close)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        self.seen.refusals.append(exc)
        response = web.Response(status=400)
        response.force_close()
        return response


async def _answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def _drive(seen: Seen) -> None:
    """Connection 1: an HTTP/1.1 request (kept alive), then an HTTP/1.0 one (which closes).
    Connection 2: a request the parser refuses."""
    server = seen.server

    def build() -> RequestHandler:  # as GuestServer.connection() builds GuestConnection
        return Spy(server, seen, loop=server._loop, **server._kwargs)

    def connection() -> RequestHandler:
        seen.handlers.append(build())
        return seen.handlers[-1]

    build()  # here, so a name it lacks fails by name, not as a connection asyncio dropped
    listening = await seen.loop.create_server(connection, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n")
        seen.answers.append(await _answer(reader))
        writer.write(b"GET /latest/meta-data/instance-id HTTP/1.0\r\n\r\n")
        seen.answers.append(await reader.read())
        writer.close()
        await writer.wait_closed()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n")
        seen.answers.append(await reader.read())
        writer.close()
        await writer.wait_closed()
    finally:
        listening.close()
        await listening.wait_closed()


def _error_placeholder(seen: Seen) -> None:
    # imdsd builds `ERROR._replace(version=HttpVersion11)` at import and tells a refused
    # request from others by `message is ERROR`.
    assert isinstance(ERROR, RawRequestMessage)
    assert ERROR._replace(version=HttpVersion11).version == HttpVersion11
    refused = seen.calls[2]
    assert refused.message is ERROR, "a refused request no longer reaches the factory as ERROR"
    assert refused.request.version == HttpVersion11
    assert seen.answers[2].startswith(b"HTTP/1.1 400 ")


def _replace(seen: Seen) -> None:
    # GuestServer._request answers every version as HTTP/1.1: message._replace(version=...).
    # The live class is the C parser's RawRequestMessage (its own _replace), not the NamedTuple.
    parsed = seen.calls[1].message
    assert isinstance(parsed, RawRequestMessage) and parsed.version == HttpVersion10
    moved = parsed._replace(version=HttpVersion11)
    assert moved.version == HttpVersion11 and moved.path == parsed.path
    assert seen.calls[1].request.version == HttpVersion11


def _server_kwargs(seen: Seen) -> None:
    # GuestServer.connection(): GuestConnection(self, key, peer, loop=self._loop, **self._kwargs)
    kwargs = seen.server._kwargs
    assert isinstance(kwargs, dict)
    assert {"keepalive_timeout", "lingering_time", "max_line_size", "max_headers"} <= set(kwargs)
    handler = seen.handlers[0]
    assert (handler.max_line_size, handler.max_headers) == (
        kwargs["max_line_size"],
        kwargs["max_headers"],
    )


def _server_loop(seen: Seen) -> None:
    # GuestServer passes server._loop to each connection and to every BaseRequest it builds.
    assert seen.server._loop is seen.loop


def _handler_loop(seen: Seen) -> None:
    # GuestConnection arms its deadlines with self._loop.call_later().
    handler = seen.handlers[0]
    assert handler._loop is seen.loop
    handle = handler._loop.call_later(3600, lambda: None)
    handle.cancel()


def _force_close(seen: Seen) -> None:
    # GuestConnection.log_access re-arms the idle deadline unless self._force_close.
    assert seen.force_close_at_answer[0] is False, "a kept-alive connection reads as closing"
    handler = seen.handlers[0]
    handler.force_close()
    assert handler._force_close is True


def _payload_writer(seen: Seen) -> None:
    # Prepared.prepare() awaits request._payload_writer.drain() after its one write.
    first = seen.calls[0]
    assert first.request._payload_writer is first.writer
    assert inspect.iscoroutinefunction(first.request._payload_writer.drain)
    assert seen.answers[0].startswith(b"HTTP/1.1 200 OK\r\n") and seen.answers[0].endswith(BODY)


def _request_factory(seen: Seen) -> None:
    # aiohttp calls GuestServer._request(message, payload, protocol, writer, task), which
    # builds web.BaseRequest(message, payload, protocol, writer, task, loop).
    assert len(seen.calls) == 3
    first = seen.calls[0]
    assert first.protocol is seen.handlers[0] and first.request.protocol is first.protocol
    assert isinstance(first.payload, StreamReader) and isinstance(first.task, asyncio.Task)
    assert first.request.path == "/latest/meta-data/instance-id"


def _log_access(seen: Seen) -> None:
    # GuestConnection's idle deadline is re-armed from log_access: called once per answer
    # although access logging is off (access_log=None).
    assert seen.server._kwargs["access_log"] is None
    assert len(seen.force_close_at_answer) == 3


def _handle_error(seen: Seen) -> None:
    # GuestConnection.handle_error counts a parser refusal by its HttpProcessingError.
    assert len(seen.refusals) == 1 and isinstance(seen.refusals[0], HttpProcessingError)


PRIVATE_NAMES: dict[str, Callable[[Seen], None]] = {
    "web_protocol.ERROR": _error_placeholder,
    "RawRequestMessage._replace": _replace,
    "web.Server._kwargs": _server_kwargs,
    "web.Server._loop": _server_loop,
    "RequestHandler._loop": _handler_loop,
    "RequestHandler._force_close": _force_close,
    "BaseRequest._payload_writer": _payload_writer,
    "Server(request_factory=) call shape": _request_factory,
    "RequestHandler.log_access calls": _log_access,
    "RequestHandler.handle_error calls": _handle_error,
}


@pytest.mark.parametrize("name", PRIVATE_NAMES)
async def test_aiohttp_private_name_holds(name: str) -> None:
    """Each private aiohttp name the guest edge uses still exists with the shape it relies on:
    if this fails after an aiohttp upgrade, the edge is broken; fix the edge, then the pin."""
    loop = asyncio.get_running_loop()
    calls: list[Call] = []
    seen = Seen(loop, Probe(calls), calls=calls)
    await asyncio.wait_for(_drive(seen), HANG_GUARD_SECONDS)
    PRIVATE_NAMES[name](seen)
