"""The small client that the CLI's admin verbs use: JSON over HTTP on the admin unix socket.

Standard library only (http.client over AF_UNIX): an admin verb imports neither aiohttp nor
the daemon, so `imdsd associate ...` starts in a fraction of the time the daemon takes.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from pathlib import Path
from typing import Any

from imdsd.errors import DaemonUnavailable, Refused

TIMEOUT_SECONDS = 120  # an associate waits for the upstream's first session


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("imdsd", timeout=TIMEOUT_SECONDS)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def call(path: Path, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    """One admin call; the decoded JSON answer, or Refused / DaemonUnavailable."""
    connection = _UnixConnection(path)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, url, body=payload, headers={"Content-Type": "application/json"})
        reply = connection.getresponse()
        status, raw = reply.status, reply.read()
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or exc.__class__.__name__
        raise DaemonUnavailable(f"no imdsd daemon answers on {path} ({reason})") from None
    finally:
        connection.close()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:  # not the admin API's JSON (a proxy, a crash page): one line, no trace
        raise Refused(status, f"HTTP{status}", "the daemon's answer is not JSON", []) from None
    if status >= 400:
        error = data.get("error", {}) if isinstance(data, dict) else {}
        raise Refused(status, error.get("code", str(status)), error.get("message", "refused"),
                      list(error.get("problems", [])))  # fmt: skip
    return data


async def request(path: Path, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    """call(), for asynchronous callers: in a worker thread, the loop stays free."""
    return await asyncio.to_thread(call, path, method, url, body)
