"""The daemon's own sites beside the guest edge: TCP listeners (metrics) and the admin unix
socket, each opened and closed as one scope."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from imdsd.config.reader import Listener

SHUTDOWN_GRACE_SECONDS = 5.0  # what requests in flight get to finish at a stop
# An admin call still waiting at a stop waits on the upstream (associate, rotate): it gets a
# second, then is cancelled, so a stop never waits out an issuer's timeout.
ADMIN_GRACE_SECONDS = 1.0
ADMIN_SOCKET_MODE = 0o660


@asynccontextmanager
async def serving(
    app: web.Application, listeners: Iterable[Listener]
) -> AsyncIterator[tuple[str, ...]]:
    """Serve `app` on TCP listeners; yields their URLs (real ports where 0 was asked). On exit
    it stops accepting and gives requests in flight SHUTDOWN_GRACE_SECONDS to finish."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_GRACE_SECONDS)  # fmt: skip
    await runner.setup()
    try:
        for listener in listeners:
            await web.TCPSite(runner, listener.host, listener.port, reuse_address=True).start()
        yield tuple(url(address) for address in runner.addresses)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def unix_site(app: web.Application, path: Path) -> AsyncIterator[None]:
    """Serve `app` on a unix socket, mode 0660 (the service's group may administer)."""
    claim_socket_path(path)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=ADMIN_GRACE_SECONDS)  # fmt: skip
    await runner.setup()
    try:
        await web.UnixSite(runner, str(path)).start()
        os.chmod(path, ADMIN_SOCKET_MODE)  # a metadata change on a local socket: not blocking I/O
        yield
    finally:
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a killed daemon; refuse one that a live daemon answers on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another imdsd answers on {path}")


def url(address: object) -> str:
    host, port = address[0], address[1]  # type: ignore[index]
    return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"
