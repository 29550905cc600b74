"""The hot path's answer: a 200 written as one byte string, without aiohttp's response machinery.

Every body the tree serves is bytes prepared at rotation or association time; this adds the
only per-request part, the Date header (formatted once a second), to a status line and header
block kept per body length, and writes it in one transport write. The bytes are the ones
aiohttp's Response wrote for the same answer (the golden files pin them): status line, Server,
Content-Type, Content-Length, Date, then `Connection: close` when the connection ends.

It quacks like the StreamResponse that aiohttp's server loop drives (prepare, write_eof,
keep_alive, status). A guest that does not read its answers is paused by the transport's flow
control like any aiohttp response: nothing is buffered for it past the high-water mark.
"""

from __future__ import annotations

import functools
import time

from aiohttp import web

SERVER = "EC2ws"  # EC2's Server header, on every answer
TEXT = "text/plain"

_KEEP_ALIVE = b"\r\n\r\n"
_CLOSE = b"\r\nConnection: close\r\n\r\n"
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date_second = -1
_date = b""


@functools.cache
def _head(length: int) -> bytes:
    """Everything before the Date value, for a body of this length (a few lengths in use)."""
    return (f"HTTP/1.1 200 OK\r\nServer: {SERVER}\r\nContent-Type: {TEXT}\r\n"
            f"Content-Length: {length}\r\nDate: ").encode()  # fmt: skip


def _now() -> bytes:
    """The Date header's value, formatted at most once a second (RFC 9110's IMF-fixdate)."""
    global _date_second, _date
    second = int(time.time())
    if second != _date_second:
        _date_second = second
        t = time.gmtime(second)  # English names whatever the locale, as HTTP requires
        _date = (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
                 f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT").encode()  # fmt: skip
    return _date


class Prepared:
    """A 200 answer with a prepared body, for GET: `body` then `closing` (a credential
    document's closing is shared by many sessions, see render.credentials)."""

    __slots__ = ("body", "closing", "keep_alive")
    status = 200

    def __init__(self, body: bytes, closing: bytes = b"") -> None:
        self.body = body
        self.closing = closing
        self.keep_alive = True

    async def prepare(self, request: web.BaseRequest) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError  # aiohttp: the client went away before its answer
        self.keep_alive = request.keep_alive
        ending = _KEEP_ALIVE if self.keep_alive else _CLOSE
        body, closing = self.body, self.closing
        transport.write(b"".join((_head(len(body) + len(closing)), _now(), ending, body, closing)))
        await request._payload_writer.drain()  # returns at once unless the guest stopped reading

    async def write_eof(self, data: bytes = b"") -> None:
        return None
