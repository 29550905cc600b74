"""The sd_notify protocol, in the standard library: one datagram per message to $NOTIFY_SOCKET.

READY=1 once the listeners and the admin socket are up, RELOADING=1 / READY=1 around a SIGHUP
reload, STOPPING=1 on shutdown, WATCHDOG=1 every half $WATCHDOG_USEC. Outside systemd (no
NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send `FIELD=value` lines to systemd; False when not run by systemd (or it went away)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError:
        return False
    return True


def reloading() -> bool:
    """RELOADING=1 with the monotonic timestamp that systemd 253+ asks for."""
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )


def listen_fds() -> dict[str, list[socket.socket]]:
    """Sockets systemd passed (socket activation: LISTEN_FDS from descriptor 3, named by
    FileDescriptorName=): name -> its sockets, non-blocking; {} when none were passed. A name
    "dev-NAME" or "netns-NAME" becomes the scope "dev:NAME" / "netns:NAME" (systemd forbids ":"
    in names). The variables are consumed, as sd_listen_fds(unset_environment=1) does."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    out: dict[str, list[socket.socket]] = {}
    for index in range(count):
        sock = socket.socket(fileno=3 + index)
        sock.setblocking(False)
        name = names[index] if index < len(names) else "unknown"
        kind, _, rest = name.partition("-")
        out.setdefault(f"{kind}:{rest}" if kind in ("dev", "netns") and rest else name, []).append(
            sock
        )
    return out


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None without a watchdog."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
