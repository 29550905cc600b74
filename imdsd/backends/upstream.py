"""What the two upstream backends (sts, rolesanywhere) share: one POST whose whole answer is
read, up to a limit; its failures as BackendError in the calling backend's own words; and a
session's times re-based on the host clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import aiohttp

from imdsd.clock import Clock
from imdsd.errors import BackendError
from imdsd.model import Session

RESPONSE_LIMIT_BYTES = 1 << 20
Unavailable = Callable[[str], str]  # "timed out" -> the guest-safe message naming the role


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    payload: bytes = field(repr=False)  # a 200's holds the secret key and the session token
    date: str | None
    request_id: str | None
    error_type: str | None  # x-amzn-ErrorType


async def post(http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
               unavailable: Unavailable) -> Answer:  # fmt: skip
    """The answer, read whole (content.read(n) returns only what is buffered) up to
    RESPONSE_LIMIT_BYTES. A timeout, an upstream not reached or an answer too large is a
    BackendError (RequestTimeout and ServiceUnavailable retryable, InvalidResponse)."""
    try:
        async with http.post(url, data=body, headers=headers) as reply:
            payload = bytearray()
            async for chunk in reply.content.iter_any():
                payload += chunk
                if len(payload) > RESPONSE_LIMIT_BYTES:
                    raise BackendError("InvalidResponse", unavailable("answered too much"))
            h = reply.headers
            return Answer(reply.status, bytes(payload), h.get("Date"), h.get("x-amzn-RequestId"),
                          h.get("x-amzn-ErrorType"))  # fmt: skip
    except TimeoutError:
        raise BackendError("RequestTimeout", unavailable("timed out")) from None
    except aiohttp.ClientError as exc:
        raise BackendError("ServiceUnavailable", unavailable("could not be reached"),
                           detail=exc.__class__.__name__) from None  # fmt: skip


def rebased(clock: Clock, key_id: str, secret: str, token: str, expires: datetime,
            upstream_now: datetime | None) -> Session:  # fmt: skip
    """The session as issued now on the host clock (whole seconds), lasting what the upstream
    granted (its expiry less its own now; the host's when it sent no Date): skew between host
    and upstream can neither shorten nor stretch what the scheduler plans with."""
    issued = clock.now().replace(microsecond=0)
    granted = timedelta(seconds=int((expires - (upstream_now or issued)).total_seconds()))
    return Session(access_key_id=key_id, secret_access_key=secret, token=token,
                   issued_at=issued, expiration=issued + granted)  # fmt: skip
