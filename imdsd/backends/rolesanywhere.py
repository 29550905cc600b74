"""The IAM Roles Anywhere backend: CreateSession for each association, signed with the host's
X.509 key (certificate.py), so the host holds no long-term AWS key.

`POST /sessions` with the profile's role as roleArn, the trust anchor and Roles Anywhere
profile from the config, durationSeconds, and (where the Roles Anywhere profile accepts one)
the instance id as roleSessionName. A 201 carries credentialSet[0].credentials. Errors map as
the sts backend's do: 429, 5xx, throttling and timeouts are retryable; AccessDeniedException
(an untrusted certificate, a role the profile does not list) and ValidationException are
refusals; a durationSeconds longer than the role allows falls back to one hour, once per role,
with a warning. A guest's failure document names only the role and the code; the service's
words go to the operator's log, cut short.

The same client gives the sts backend its host credentials (`host_credentials =
"rolesanywhere"`): `HostRole` keeps the host role's session and renews it at half its life.
Signing and file reads run in threads; the event loop only sends and parses.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import structlog

from imdsd.backends import upstream
from imdsd.backends.certificate import HostCertificate, client_ssl
from imdsd.clock import Clock
from imdsd.config.backend import BackendConfig, RolesAnywhereConfig
from imdsd.errors import RETRYABLE_CODES, BackendError, DurationTooLong
from imdsd.model import InstanceProfile, Session

FALLBACK_DURATION_SECONDS = 3600  # every role allows one hour
DETAIL_LIMIT = 300
WATCH_SECONDS = 60.0  # the files are also stat()ed this often, for the metric and warnings
log = structlog.get_logger("imdsd.rolesanywhere")


class RolesAnywhereIssuer:
    """Issues one CreateSession session per call."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        certificate: HostCertificate,
        config: RolesAnywhereConfig,
        clock: Clock,
    ) -> None:
        self._http, self.certificate, self._config, self._clock = http, certificate, config, clock
        self._durations: dict[str, int] = {}  # role ARN -> duration after a clamp

    def __repr__(self) -> str:
        return f"RolesAnywhereIssuer(url={self._config.sessions_url!r}, {self.certificate!r})"

    def certificate_expiry(self) -> datetime:
        return self.certificate.expiry

    async def issue(self, profile: InstanceProfile, *, session_name: str) -> Session:
        name = session_name if self._config.role_session_name else None
        return await self.create(profile.role.arn, name, self._config.duration)

    async def create(self, role: str, name: str | None, duration: timedelta) -> Session:
        """One session of `role`, clamped to one hour once the role refused longer."""
        seconds = self._durations.get(role, int(duration.total_seconds()))
        try:
            return await self._create(role, name, seconds)
        except DurationTooLong as exc:
            if seconds <= FALLBACK_DURATION_SECONDS:
                raise
            self._durations[role] = FALLBACK_DURATION_SECONDS
            log.warning(
                "session duration clamped",
                role=role,
                asked_seconds=seconds,
                using_seconds=FALLBACK_DURATION_SECONDS,
                request_id=exc.request_id,
                hint="set backend.rolesanywhere.duration to at most the role's "
                "MaxSessionDuration and the Roles Anywhere profile's durationSeconds",
            )
            return await self._create(role, name, FALLBACK_DURATION_SECONDS)

    def body(self, role: str, name: str | None, seconds: int) -> bytes:
        """CreateSession's JSON body."""
        fields: dict[str, Any] = {
            "durationSeconds": seconds,
            "profileArn": self._config.profile_arn,
            "roleArn": role,
            "trustAnchorArn": self._config.trust_anchor_arn,
        }
        if name is not None:
            fields["roleSessionName"] = name
        return json.dumps(fields).encode()

    async def _create(self, role: str, name: str | None, seconds: int) -> Session:
        url, body = self._config.sessions_url, self.body(role, name, seconds)
        headers = await asyncio.to_thread(self.certificate.signed_headers, url, body)
        answer = await upstream.post(self._http, url, body, headers,
                                     lambda what: _unavailable(role, what))  # fmt: skip
        if answer.status != 201:
            raise _error(role, answer.status, answer.error_type, answer.payload, answer.request_id)
        return self._session(role, answer.payload, answer.date)

    def _session(self, role: str, payload: bytes, date: str | None) -> Session:
        try:
            found = json.loads(payload)["credentialSet"][0]["credentials"]
            keys = ("accessKeyId", "secretAccessKey", "sessionToken", "expiration")
            key_id, secret, token, expiration = (str(found[k]) for k in keys)
            expires = datetime.fromisoformat(expiration)
            upstream_now = parsedate_to_datetime(date) if date else None
        except (ValueError, TypeError, KeyError, IndexError):
            raise BackendError(
                "InvalidResponse", _unavailable(role, "answered without credentials")
            ) from None
        return upstream.rebased(self._clock, key_id, secret, token, expires, upstream_now)


class HostRole:
    """The host's own role's credentials (the sts backend's host credentials), renewed at half
    their life; one CreateSession at a time."""

    def __init__(
        self, issuer: RolesAnywhereIssuer, role: str, clock: Clock, duration: timedelta
    ) -> None:
        self._issuer, self._role, self._clock, self._duration = issuer, role, clock, duration
        self._session: Session | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"HostRole(role={self._role!r})"

    async def current(self) -> Session:
        async with self._lock:
            s = self._session
            if s is None or self._clock.now() >= s.issued_at + (s.expiration - s.issued_at) / 2:
                self._session = s = await self._issuer.create(self._role, None, self._duration)
                log.info(
                    "host credentials renewed", role=self._role, expires=s.expiration.isoformat()
                )
            return s


def _unavailable(role: str, what: str) -> str:
    return f"IAM Roles Anywhere {what} while issuing {role}; retrying."


def _error(
    role: str, status: int, kind: str | None, payload: bytes, request_id: str | None
) -> BackendError:
    """Classify an error answer: the code from x-amzn-ErrorType (or the body's __type)."""
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    named = kind or str(body.get("__type") or "")
    code = named.split(":")[0].rpartition("#")[2] or (
        "ServiceUnavailable" if status >= 500 else f"HTTP{status}"
    )
    message = body.get("message") or body.get("Message")
    detail = str(message)[:DETAIL_LIMIT].strip() if message is not None else None
    if code == "ValidationException" and "durationseconds" in (detail or "").lower():
        return DurationTooLong(
            code,
            f"The session duration asked for {role} is longer than it allows.",
            retryable=False,
            request_id=request_id,
            detail=detail,
            status=status,
        )
    retryable = status >= 500 or status == 429 or code in RETRYABLE_CODES
    text = (
        _unavailable(role, f"answered {code}")
        if retryable
        else f"imdsd could not get {role} from IAM Roles Anywhere ({code})."
    )
    return BackendError(
        code, text, retryable=retryable, request_id=request_id, detail=detail, status=status
    )


@asynccontextmanager
async def opened(config: RolesAnywhereConfig, clock: Clock) -> AsyncIterator[RolesAnywhereIssuer]:
    """An issuer with its own HTTP client; its files re-checked every WATCH_SECONDS."""
    certificate = await asyncio.to_thread(HostCertificate, config, clock)
    context = await asyncio.to_thread(client_ssl, config)
    timeout = aiohttp.ClientTimeout(total=config.timeout.total_seconds())
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        watcher = asyncio.create_task(_watch(certificate), name="host certificate")
        try:
            yield RolesAnywhereIssuer(http, certificate, config, clock)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


async def _watch(certificate: HostCertificate) -> None:
    """A replaced certificate is seen (metric, warnings) even when nothing signs for a while."""
    while True:
        await asyncio.sleep(WATCH_SECONDS)
        await asyncio.to_thread(certificate.refresh)


@asynccontextmanager
async def open_backend(config: BackendConfig, clock: Clock) -> AsyncIterator[RolesAnywhereIssuer]:
    """kind = "rolesanywhere": each profile's role straight from Roles Anywhere."""
    async with opened(config.rolesanywhere, clock) as issuer:
        yield issuer
