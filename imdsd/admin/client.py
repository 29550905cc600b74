"""The small client that the CLI's admin verbs use: JSON over HTTP on the admin unix socket."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from imdsd.errors import ImdsdError

TIMEOUT_SECONDS = 120  # an associate waits for the upstream's first session


class DaemonUnavailable(ImdsdError):
    """Nothing answers on the admin socket."""


class Refused(ImdsdError):
    """The daemon refused the call (unknown id, a conflict, invalid values)."""

    def __init__(self, status: int, code: str, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.status, self.code, self.problems = status, code, problems


async def request(socket: Path, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One admin call; the decoded JSON answer, or Refused / DaemonUnavailable."""
    connector = aiohttp.UnixConnector(path=str(socket))
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.request(method, "http://imdsd" + path, json=body) as reply,
        ):
            data = await reply.json(content_type=None)
            status = reply.status
    except (aiohttp.ClientConnectionError, OSError) as exc:
        raise DaemonUnavailable(f"no imdsd daemon answers on {socket} ({_reason(exc)})") from None
    if status >= 400:
        error = data.get("error", {}) if isinstance(data, dict) else {}
        raise Refused(status, error.get("code", str(status)), error.get("message", "refused"),
                      list(error.get("problems", [])))  # fmt: skip
    return data


def call(socket: Path, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """request(), for synchronous callers (the CLI)."""
    return asyncio.run(request(socket, method, path, body))


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return getattr(cause, "strerror", None) or cause.__class__.__name__
