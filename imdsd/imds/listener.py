"""The guest listeners' accept loop: each connection is admitted or refused at accept(),
before any transport, protocol or parser exists for it.

asyncio's own accept path builds all three for every connection, which is what a guest's
burst of connections would otherwise cost: a refusal here is one accept(), one dict lookup and
one close() with an RST, so the kernel's accept queue drains as fast as a hostile guest fills
it and other guests' SYNs are not dropped behind it. If descriptors still run out (EMFILE),
accepting pauses briefly instead of spinning, and says so at most once a minute.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import structlog

from imdsd.budgets import STRANGERS
from imdsd.imds.server import GuestServer

log = structlog.get_logger("imdsd.imds")
ACCEPT_BATCH = 512  # connections taken per wake-up, so one listener cannot starve the loop
EXHAUSTED_PAUSE_SECONDS = 0.1  # no descriptor left (EMFILE, ENFILE, ENOBUFS, ENOMEM): wait
EXHAUSTED_REPORT_SECONDS = 60.0
_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST, keeps no state


class GuestListener:
    """One listening socket feeding a GuestServer."""

    def __init__(self, server: GuestServer, sock: socket.socket, scope: str | None = None) -> None:
        self._server, self._sock, self.scope = server, sock, scope
        self._loop = asyncio.get_running_loop()
        self._starting: set[asyncio.Task[object]] = set()
        self._reported = -EXHAUSTED_REPORT_SECONDS
        self._paused: asyncio.TimerHandle | None = None
        self._loop.add_reader(sock.fileno(), self._accept)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop accepting; connections already admitted are the server's to finish."""
        if self._paused is not None:
            self._paused.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    return self._exhausted(exc)
                continue  # ECONNABORTED and the like: that connection is gone, not the listener
            self._admit(conn, str(peer[0]))

    def _admit(self, conn: socket.socket, peer: str) -> None:
        api = self._server.api
        instance = api.guest(peer, self.scope)
        key = instance.id if instance is not None else STRANGERS
        refused = api.ledger.open(key)
        if refused is not None:
            api.incident(key, f"refused_{refused}")  # type: ignore[arg-type]
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            conn.close()
            return
        conn.setblocking(False)
        scope = self.scope
        start = self._loop.connect_accepted_socket(
            lambda: self._server.connection(key, peer, scope), conn
        )
        task: asyncio.Task[object] = self._loop.create_task(start)
        self._starting.add(task)
        task.add_done_callback(lambda t: self._started(t, key, conn))

    def _started(self, task: asyncio.Task[object], key: str, conn: socket.socket) -> None:
        self._starting.discard(task)
        if task.cancelled() or task.exception() is not None:  # never reached connection_made
            self._server.api.ledger.close(key)
            conn.close()

    def _exhausted(self, exc: OSError) -> None:
        self._server.api.incident(STRANGERS, "refused_global")
        now = time.monotonic()
        if now - self._reported >= EXHAUSTED_REPORT_SECONDS:
            self._reported = now
            log.warning("accept paused: no descriptor left", errno=exc.errno)
        self._loop.remove_reader(self._sock.fileno())
        self._paused = self._loop.call_later(EXHAUSTED_PAUSE_SECONDS, self._resume)

    def _resume(self) -> None:
        self._paused = None
        self._loop.add_reader(self._sock.fileno(), self._accept)


def listening_socket(
    host: str, port: int, backlog: int, *, device: str | None = None
) -> socket.socket:
    """A non-blocking TCP socket listening on host:port (IPv6 sockets are IPv6-only, as
    asyncio's create_server makes them, so "[::]" and "0.0.0.0" can both be listed), bound to
    `device` when given (SO_BINDTODEVICE: only what arrives on it; its accepted sockets and
    their replies stay on it, whatever the routing table says about overlapping addresses)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if device is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@asynccontextmanager
async def serving_guests(
    server: GuestServer,
    addresses: Iterable[tuple[str, int]],
    *,
    backlog: int,
    grace: float,
) -> AsyncIterator[list[tuple[str, int]]]:
    """Listen on every address (all bound before any accepts); yields the bound addresses.
    On exit: stop accepting, then give requests in flight `grace` seconds to finish."""
    sockets: list[socket.socket] = []
    try:
        for host, port in addresses:
            sockets.append(listening_socket(host, port, backlog))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    listeners = [GuestListener(server, sock) for sock in sockets]
    try:
        yield [listener.address for listener in listeners]
    finally:
        for listener in listeners:
            listener.close()
        server.pre_shutdown()
        await server.shutdown(grace)
