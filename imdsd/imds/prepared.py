"""Every guest answer, written as one byte string without aiohttp's response machinery.

Bodies are bytes prepared at rotation or association time (the tree), minted (a token), or
constant (EC2's error pages); this adds the only per-request part, the Date header (formatted
once a second), to a status line and header block kept per status and body length, and writes
it in one transport write. The bytes are the ones aiohttp's Response wrote for the same answer
(tests/imds/test_wire.py and the golden files pin them): status line, Server, (the token's TTL,)
Content-Type, Content-Length, Date, then `Connection: close` when the connection ends; a HEAD
answer is the same head without its body.

It quacks like the StreamResponse that aiohttp's server loop drives (prepare, write_eof,
keep_alive, status, force_close). A guest that does not read its answers is paused by the
transport's flow control like any aiohttp response: nothing is buffered for it past the
high-water mark.
"""

from __future__ import annotations

import functools
import time
from http import HTTPStatus

from aiohttp import web

from imdsd.imds.render import ERROR_PAGES

SERVER = "EC2ws"  # EC2's Server header, on every answer
TEXT = "text/plain"
HTML = "text/html"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"

_KEEP_ALIVE = b"\r\n\r\n"
_CLOSE = b"\r\nConnection: close\r\n\r\n"
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date_second = -1
_date = b""


def _head_of(status: int, content_type: str, length: int, extra: str = "") -> bytes:
    """Everything before the Date value, in aiohttp's order: Server, the caller's own header
    (`extra`, a whole line), then Content-Type and Content-Length."""
    status_line = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
    headers = f"Content-Type: {content_type}\r\nContent-Length: {length}\r\nDate: "
    return f"{status_line}Server: {SERVER}\r\n{extra}{headers}".encode()


@functools.cache
def _head(length: int) -> bytes:
    """A 200's head for a text body of this length (a few lengths in use)."""
    return _head_of(200, TEXT, length)


@functools.cache
def _refusal_head(status: int) -> bytes:
    """The head of EC2's error page for this status (one per status)."""
    return _head_of(status, HTML, len(ERROR_PAGES[status]))


@functools.cache
def _token_head(length: int) -> tuple[bytes, bytes]:
    """The token answer's head, either side of the TTL's value (which the guest chose)."""
    before, _, after = _head_of(200, TEXT, length, f"{TTL_HEADER}: \0\r\n").partition(b"\0")
    return before, after


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
    """An answer ready to write: `head` (status line and headers up to the Date value), then
    `body` and `closing` (a credential document's closing is shared by many sessions, see
    render.credentials). Built as a 200 for GET of `body + closing`; the functions below build
    the other answers."""

    __slots__ = ("body", "closing", "head", "keep_alive", "status")

    def __init__(
        self, body: bytes, closing: bytes = b"", *, head: bytes | None = None, status: int = 200
    ) -> None:
        self.head = _head(len(body) + len(closing)) if head is None else head
        self.body = body
        self.closing = closing
        self.status = status
        self.keep_alive = True

    def force_close(self) -> None:
        """End the connection after this answer (it says `Connection: close`)."""
        self.keep_alive = False

    async def prepare(self, request: web.BaseRequest) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError  # aiohttp: the client went away before its answer
        keep_alive = self.keep_alive = self.keep_alive and request.keep_alive
        ending = _KEEP_ALIVE if keep_alive else _CLOSE
        transport.write(b"".join((self.head, _now(), ending, self.body, self.closing)))
        if transport.get_write_buffer_size():  # all sent (the usual case): nothing to wait for
            await request._payload_writer.drain()  # waits only if the guest stopped reading

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def head_only(body: bytes, closing: bytes = b"") -> Prepared:
    """The answer to HEAD of `body + closing`: its 200 head, without the body."""
    return Prepared(b"", head=_head(len(body) + len(closing)))


def token(value: bytes, ttl: int) -> Prepared:
    """The token PUT's 200: the token, and its TTL echoed in EC2's header."""
    before, after = _token_head(len(value))
    return Prepared(value, head=b"%b%d%b" % (before, ttl, after))


def refusal(status: int, *, close: bool = False, head: bool = False) -> Prepared:
    """EC2's error page for a status (without its body for HEAD); `close` ends the connection."""
    answer = Prepared(
        b"" if head else ERROR_PAGES[status], head=_refusal_head(status), status=status
    )
    if close:
        answer.keep_alive = False
    return answer
