"""The guest listener's connection layer: aiohttp's low-level server, hardened for hostile guests.

Below the request pipeline (app.py), each connection is:
- admitted by the ledger before it gets here (listener.py refuses at accept(): a per-instance
  cap, one shared cap for strangers, a process ceiling below the open-files limit), and
  released from its account when it ends;
- held to deadlines: `idle_timeout` to begin a request, then `head_timeout` from its first
  byte to a complete head (slowloris), re-armed after every answer;
- answered with EC2's page for any request the HTTP parser refuses (400; a stranger gets 404),
  with `Server: EC2ws`, never the framework's banner, its text or the request's bytes, and
  never a log line per event (the ledger's summary counts them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import ERROR, RequestHandler

from imdsd.budgets import STRANGERS, Incident
from imdsd.imds.app import UNSUPPORTED_VERSION, MetadataApi
from imdsd.imds.prepared import refusal

log = structlog.get_logger("imdsd.imds")
MAX_LINE_BYTES = 8190  # request line and each header line, as aiohttp's defaults
MAX_HEADERS = 64
# aiohttp's own keep-alive close is only a backstop: the deadlines below come first.
KEEPALIVE_BACKSTOP_SECONDS = 3600.0
GuestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# The parser's placeholder for a refused request says HTTP/1.0; EC2 answers HTTP/1.1.
_ERROR_11 = ERROR._replace(version=HttpVersion11)


class GuestConnection(RequestHandler):
    """One guest connection: admitted by the ledger under `key`, held to its deadlines."""

    __slots__ = ("_api", "_due", "_head_started", "_key", "_timer", "_which", "hop_limit", "peer",
                 "scope")  # fmt: skip

    def __init__(
        self, server: GuestServer, key: str, peer: str, scope: str | None, **kwargs: Any
    ) -> None:
        super().__init__(server, **kwargs)
        self._api = server.api
        self._key: str | None = key  # the ledger account holding this connection
        # The deadline running (loop time; None while the pipeline answers) and the one timer
        # that enforces it: a deadline moved later leaves the timer where it is (it fires, sees
        # the new deadline and waits on), so a request costs no timer of its own.
        self._due: float | None = None
        self._which: Incident = "idle_timeout"
        self._timer: asyncio.TimerHandle | None = None
        self._head_started = False
        # Where the connection arrived (its listener's scope) and its socket peer address: the
        # only things that identify a guest, never what it sends.
        self.peer, self.scope = peer, scope
        self.hop_limit: int | None = None  # the IP TTL its socket was given (handlers.token)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm("idle_timeout")

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._key is not None:
            self._api.ledger.close(self._key)
            self._key = None
        self._due = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._due is not None and not self._head_started:
            self._head_started = True  # the first byte of a request: the head deadline runs
            self._arm("head_timeout")
        super().data_received(data)

    def head_received(self) -> None:
        """A complete request head is in: no deadline while the pipeline answers it."""
        self._due = None  # the timer, if any, finds nothing due when it fires
        self._head_started = False

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        """Called once an answer is written: the connection is idle until the next request."""
        if self.transport is not None and not self._force_close:
            self._arm("idle_timeout")

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request the parser refused (a guest's fault: counted, never logged), or an
        exception that escaped the pipeline (imdsd's own bug: logged with its traceback)."""
        key = self._key or STRANGERS
        if isinstance(exc, HttpProcessingError):
            self._api.incident(key, "bad_request")
            status = 404 if key == STRANGERS else 400
        else:
            log.error("guest connection failed", status=status, exc_info=exc)
            status = 500
        self._api.metrics.request("metadata", status)
        head = request.method == "HEAD"
        return cast(web.StreamResponse, refusal(status, close=True, head=head))  # quacks alike

    def _arm(self, which: Incident) -> None:
        policy = self._api.ledger.policy
        seconds = policy.idle_timeout if which == "idle_timeout" else policy.head_timeout
        self._due, self._which = self._loop.time() + seconds.total_seconds(), which
        timer = self._timer
        if timer is None or timer.when() > self._due:  # it would fire too late: set it earlier
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(self._due, self._expired, self._due)

    def _expired(self, at: float) -> None:
        due = self._due
        if due is not None and due > at:  # the deadline moved on since: wait for it
            self._timer = self._loop.call_at(due, self._expired, due)
            return
        self._timer = None
        if due is None:  # no deadline runs (the pipeline is answering): nothing to enforce
            return
        self._due = None
        if self._key is not None:
            self._api.incident(self._key, self._which)
        self.force_close()


class GuestServer(web.Server):
    """aiohttp's low-level server with GuestConnection as its protocol and one handler: the
    pipeline. No router, no middlewares, no Expect handling (an unknown caller sending
    `Expect: 100-continue` gets its 404 like any other request)."""

    def __init__(self, api: MetadataApi) -> None:
        super().__init__(
            cast(GuestHandler, api.handle),  # a Prepared answer quacks like a StreamResponse
            request_factory=self._request,
            keepalive_timeout=KEEPALIVE_BACKSTOP_SECONDS,
            lingering_time=0,  # an unread body is never drained: the connection closes
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            max_headers=MAX_HEADERS,
            access_log=None,
        )
        self.api = api

    def connection(self, key: str, peer: str, scope: str | None) -> GuestConnection:
        """The protocol for a connection the listener admitted under ledger account `key`."""
        return GuestConnection(self, key, peer, scope, loop=self._loop, **self._kwargs)

    def _request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if isinstance(protocol, GuestConnection):
            protocol.head_received()
        unsupported = False
        if message is ERROR:
            message = _ERROR_11
        elif message.version != HttpVersion11:
            # The parser takes HTTP/0.9, /2.0, /9.9 request lines, and the answer would repeat
            # the version: every answer is HTTP/1.1 (1.0's close-after-answer still holds).
            unsupported = message.version != HttpVersion10
            message = message._replace(version=HttpVersion11)
        request = web.BaseRequest(message, payload, protocol, writer, task, self._loop)
        if unsupported:
            request[UNSUPPORTED_VERSION] = True
        return request
