"""Scoped guest listeners: the guest addresses opened once per host device (SO_BINDTODEVICE) and
once inside each named network namespace, kept in step with the devices and namespaces that
come and go as VMs start and stop.

A listener is keyed by what it is bound to: a device by (name, ifindex), since a re-created tap
gets a new ifindex while a socket stays bound to the old one (it would answer nobody, or a later
device that reuses the index); a namespace by its /run/netns file's inode. On any change the old
listener is closed and a new one bound, within a second of the link event (RTM_NEWLINK /
RTM_DELLINK, read from netlink on the loop by pyroute2) or of the namespace appearing (polled).
A device or namespace that is missing is "no listener yet" (one info line), never an error.
Sockets systemd passes (socket activation, FileDescriptorName=dev:NAME or netns:NAME) are used
as they are, so a namespace layout needs no CAP_SYS_ADMIN in the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from imdsd.imds.listener import GuestListener, listening_socket
from imdsd.imds.server import GuestServer
from imdsd.model import DEVICE_SCOPE, NETNS_SCOPE

log = structlog.get_logger("imdsd.imds")
NETNS_DIRECTORY = "/run/netns"
POLL_SECONDS = 0.5  # namespaces (and, as a backstop, devices) are looked at this often
_CLONE_NEWNET = 0x40000000


@dataclass
class Bound:
    """The listeners of one device or namespace, and what they are bound to."""

    scope: str | None  # the scope its guests are identified in (None: by address alone)
    identity: int  # the device's ifindex, or the namespace file's inode
    listeners: list[GuestListener] = field(default_factory=list)
    passed: bool = False  # systemd's sockets: never closed and rebound by us


class ScopedListeners:
    """Opens and rebinds the scoped listeners; `wanted` says which devices and namespaces."""

    def __init__(
        self,
        server: GuestServer,
        addresses: list[tuple[str, int]],
        wanted: Callable[[], dict[str, str | None]],
        *,
        backlog: int,
        devices: bool,
        passed: dict[str, list[socket.socket]] | None = None,
    ) -> None:
        """`wanted()` -> {"dev:NAME" or "netns:NAME": the scope its guests are known in};
        `devices`: listeners are bound to devices, so link events are followed."""
        self._server, self._addresses, self._wanted = server, addresses, wanted
        self._devices = devices
        self._backlog = backlog
        self._passed = passed or {}
        self._bound: dict[str, Bound] = {}
        self._missing: set[str] = set()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.rebinds = 0

    async def start(self) -> None:
        """Bind what exists now, then follow link events and namespaces in the background."""
        await self.sync()
        self._tasks = [asyncio.create_task(self._follow(), name="scoped listeners"),
                       asyncio.create_task(self._links(), name="link events")]  # fmt: skip

    def changed(self) -> None:
        """The inventory's devices or namespaces may have changed: look again, soon."""
        self._changed.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for bound in self._bound.values():
            for listener in bound.listeners:
                listener.close()
        self._bound.clear()

    def status(self) -> list[dict[str, Any]]:
        """Each scoped listener set: device (and ifindex) or namespace, scope, addresses."""
        out = []
        for where, bound in sorted(self._bound.items()):
            kind, _, name = where.partition(":")
            entry: dict[str, Any] = {"device" if kind == "dev" else "namespace": name}
            if kind == "dev":
                entry["ifindex"] = bound.identity
            entry["scope"] = bound.scope
            entry["listening"] = [f"{h}:{p}" for h, p in (x.address for x in bound.listeners)]
            entry["socket_activated"] = bound.passed
            out.append(entry)
        return out

    async def sync(self) -> None:
        """Bind every wanted device and namespace that exists; rebind what changed identity;
        close what is no longer wanted or gone."""
        wanted = dict(self._wanted())
        for where in [w for w in self._bound if w not in wanted]:
            self._drop(where)
        for where, scope in sorted(wanted.items(), key=lambda kv: kv[0]):
            identity = await self._identity(where)
            bound = self._bound.get(where)
            if bound is not None and (bound.passed or bound.identity == identity):
                continue
            if bound is not None:
                self._drop(where)
                self.rebinds += 1
            if identity is None:
                if where not in self._missing:
                    self._missing.add(where)
                    log.info("no guest listener yet: not on this host", where=where)
                continue
            self._missing.discard(where)
            await self._bind(where, scope, identity)

    async def _bind(self, where: str, scope: str | None, identity: int) -> None:
        if where in self._passed:
            sockets, passed = self._passed[where], True
        else:
            try:
                sockets, passed = await self._open(where), False
            except OSError as exc:  # gone between the look and the bind: the next event retries
                log.warning("guest listener not bound", where=where, errno=exc.errno)
                return
        listeners = [GuestListener(self._server, sock, scope) for sock in sockets]
        self._bound[where] = Bound(scope, identity, listeners, passed)
        log.info("guest listener bound", where=where, identity=identity,
                 listening=[f"{h}:{p}" for h, p in (x.address for x in listeners)])  # fmt: skip

    async def _open(self, where: str) -> list[socket.socket]:
        kind, _, name = where.partition(":")
        opened: list[socket.socket] = []
        try:
            for host, port in self._addresses:
                if kind == "dev":
                    opened.append(listening_socket(host, port, self._backlog, device=name))
                else:
                    opened.append(await in_namespace(name, host, port, self._backlog))
        except OSError:
            for sock in opened:
                sock.close()
            raise
        return opened

    def _drop(self, where: str) -> None:
        bound = self._bound.pop(where)
        for listener in bound.listeners:
            listener.close()
        log.info("guest listener closed", where=where, identity=bound.identity)

    async def _identity(self, where: str) -> int | None:
        kind, _, name = where.partition(":")
        try:
            if kind == "dev":
                return socket.if_nametoindex(name)
            return (await asyncio.to_thread(os.stat, os.path.join(NETNS_DIRECTORY, name))).st_ino
        except OSError:
            return None

    async def _follow(self) -> None:
        """Resync on a link event or an inventory change, and every POLL_SECONDS anyway (a
        namespace appearing has no event we can read)."""
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the event is set, and this loop would then outlive close() for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await self._changed.wait()
            self._changed.clear()
            try:
                await self.sync()
            except Exception as exc:  # a listener fault must not end following
                log.error("scoped listeners: sync failed", error=exc.__class__.__name__)

    async def _links(self) -> None:
        """RTM_NEWLINK / RTM_DELLINK from netlink, read on the loop: each one prompts a sync."""
        if not self._devices:
            return  # namespaces only: nothing to read from netlink
        from pyroute2 import AsyncIPRoute  # only hosts that bind to devices load it

        async with AsyncIPRoute() as ipr:
            await ipr.bind()
            while True:
                async for message in ipr.get():
                    if message.get("event") in ("RTM_NEWLINK", "RTM_DELLINK"):
                        self._changed.set()


def wanted_scopes(
    scopes: Iterable[str], guest_devices: Iterable[str], bound: bool
) -> dict[str, str | None]:
    """What to listen on: each namespace an instance names (its own scope); with device-bound
    listeners, each device an instance names (its scope) and each guest device (guests known
    by address alone: scope None)."""
    out: dict[str, str | None] = {s: s for s in scopes if s.startswith(NETNS_SCOPE)}
    if bound:
        out |= {s: s for s in scopes if s.startswith(DEVICE_SCOPE)}
        out |= {DEVICE_SCOPE + d: None for d in guest_devices}
    return out


def in_namespace(name: str, host: str, port: int, backlog: int) -> asyncio.Future[socket.socket]:
    """A listening socket made inside the named namespace, by a thread of its own that enters
    it (setns changes the calling thread only; a socket keeps the namespace it was made in).
    Needs CAP_SYS_ADMIN: socket activation is the way without it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[socket.socket] = loop.create_future()

    def run() -> None:
        try:
            sock = _open_in(name, host, port, backlog)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, sock, None)

    threading.Thread(target=run, name=f"netns {name}", daemon=True).start()
    return future


def _settle(future: asyncio.Future[socket.socket], sock: socket.socket | None,
            exc: BaseException | None) -> None:  # fmt: skip
    if future.cancelled():
        if sock is not None:
            sock.close()
    elif exc is not None:
        future.set_exception(exc)
    elif sock is not None:
        future.set_result(sock)


def _open_in(name: str, host: str, port: int, backlog: int) -> socket.socket:
    libc = ctypes.CDLL(None, use_errno=True)
    path = os.path.join(NETNS_DIRECTORY, name)
    with open(path, "rb") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), path)
        # This thread ends with the call: it never goes back, and never serves anything else.
        return listening_socket(host, port, backlog)
