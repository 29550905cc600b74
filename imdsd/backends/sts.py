"""The upstream STS backend: AssumeRole for each association, SigV4-signed by botocore.

RoleSessionName is the instance id, so the upstream's audit trail names the VM, as on EC2.
Requests travel over aiohttp (cancellable, bounded by `timeout`); botocore signs them
(SigV4Auth) and finds the host's own credentials (the standard chain, or a named profile), so
no signing code is written here. Errors are classified: throttling, 5xx and timeouts are
retryable; refusals (AccessDenied, an unknown role, a trust policy that says no) are not.
A guest's failure document names only the role and the code; the upstream's words and request
id go to the operator's log.

With `host_credentials = "rolesanywhere"` the host's credentials are its own role's session
from IAM Roles Anywhere (rolesanywhere.HostRole): every AssumeRole is then role chaining,
which AWS caps at one hour, so the duration is clamped to it (one warning at start).

Times are re-based on the host clock: a session is issued "now" and lasts what the upstream
granted (its Expiration minus its Date), so skew between host and upstream cannot shorten or
stretch what the scheduler plans with.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING
from urllib.parse import urlencode
from xml.etree import ElementTree

import aiohttp
import botocore.session
import structlog
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import BotoCoreError

from imdsd.backends import upstream
from imdsd.clock import Clock
from imdsd.config.backend import BackendConfig, StsBackendConfig
from imdsd.errors import RETRYABLE_CODES, BackendError, DurationTooLong
from imdsd.model import InstanceProfile, Session

if TYPE_CHECKING:
    from imdsd.backends.certificate import HostCertificate
    from imdsd.backends.rolesanywhere import HostRole

API_VERSION = "2011-06-15"
FORM = "application/x-www-form-urlencoded; charset=utf-8"
# Every role allows one hour, and role chaining allows no more: the fallback when STS says
# the configured duration exceeds the role's MaxSessionDuration.
FALLBACK_DURATION_SECONDS = 3600

HostCredentials = Callable[[], Awaitable[ReadOnlyCredentials]]
log = structlog.get_logger("imdsd.sts")


class StsIssuer:
    """Issues one AssumeRole session per call."""

    def __init__(self, http: aiohttp.ClientSession, credentials: HostCredentials,
                 config: StsBackendConfig, clock: Clock, host: str,
                 certificate: HostCertificate | None = None) -> None:  # fmt: skip
        self._http = http
        self._credentials = credentials
        self._config = config
        self._clock = clock
        self._host = host
        self._certificate = certificate  # the host's Roles Anywhere certificate, if chained
        self._durations: dict[str, int] = {}  # role ARN -> duration after a clamp
        self._duration = int(config.duration.total_seconds())
        if certificate is not None and self._duration > FALLBACK_DURATION_SECONDS:
            log.warning(
                "session duration clamped: role chaining caps AssumeRole at one hour",
                asked_seconds=self._duration,
                using_seconds=FALLBACK_DURATION_SECONDS,
                hint='host_credentials = "rolesanywhere" makes every AssumeRole a '
                "role chain; set backend.sts.duration to at most 1h",
            )
            self._duration = FALLBACK_DURATION_SECONDS

    def certificate_expiry(self) -> datetime | None:
        """The host certificate's expiry when the host's credentials come from Roles Anywhere."""
        return self._certificate.expiry if self._certificate else None

    def __repr__(self) -> str:
        return f"StsIssuer(endpoint={self._config.endpoint!r}, region={self._config.region!r})"

    async def issue(self, profile: InstanceProfile, *, session_name: str) -> Session:
        arn = profile.role.arn
        duration = self._durations.get(arn, self._duration)
        try:
            return await self._assume(profile, session_name, duration)
        except DurationTooLong as exc:
            if duration <= FALLBACK_DURATION_SECONDS:
                raise  # already the shortest every role allows: a refusal, not retried soon
            self._durations[arn] = FALLBACK_DURATION_SECONDS
            log.warning(
                "session duration clamped",
                role=arn,
                asked_seconds=duration,
                using_seconds=FALLBACK_DURATION_SECONDS,
                request_id=exc.request_id,
                hint="set backend.sts.duration to at most the role's MaxSessionDuration",
            )
            return await self._assume(profile, session_name, FALLBACK_DURATION_SECONDS)

    def params(self, profile: InstanceProfile, session_name: str, duration: int) -> dict[str, str]:
        """The AssumeRole form fields for one session."""
        params = {
            "Action": "AssumeRole",
            "Version": API_VERSION,
            "RoleArn": profile.role.arn,
            "RoleSessionName": session_name,
            "DurationSeconds": str(duration),
        }
        if profile.external_id:
            params["ExternalId"] = profile.external_id
        if self._config.source_identity:
            params["SourceIdentity"] = self._config.source_identity.replace("{host}", self._host)[
                :64
            ]
        tags = {"instance_id": ("InstanceId", session_name), "host": ("HostName", self._host)}
        for n, tag in enumerate(self._config.session_tags, start=1):
            params[f"Tags.member.{n}.Key"], params[f"Tags.member.{n}.Value"] = tags[tag]
        return params

    async def _assume(self, profile: InstanceProfile, session_name: str, duration: int) -> Session:
        body = urlencode(self.params(profile, session_name, duration))
        headers = await self._signed(body)
        answer = await upstream.post(self._http, self._config.endpoint, body.encode(), headers,
                                     lambda what: _unavailable(profile, what))  # fmt: skip
        if answer.status != 200:
            raise _error(profile, answer.status, answer.payload, answer.request_id)
        return self._session(profile, answer.payload, answer.date)

    async def _signed(self, body: str) -> dict[str, str]:
        request = AWSRequest(method="POST", url=self._config.endpoint, data=body,
                             headers={"Content-Type": FORM})  # fmt: skip
        SigV4Auth(await self._credentials(), "sts", self._config.region).add_auth(request)
        return dict(request.headers.items())

    def _session(self, profile: InstanceProfile, payload: bytes, date: str | None) -> Session:
        fields = _xml_fields(
            payload, ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")
        )
        if fields is None or len(fields) < 4:
            raise BackendError(
                "InvalidResponse", _unavailable(profile, "answered without credentials")
            )
        try:
            expiration = datetime.fromisoformat(fields["Expiration"])
            upstream_now = parsedate_to_datetime(date) if date else None
        except (ValueError, TypeError):
            raise BackendError(
                "InvalidResponse", _unavailable(profile, "sent an unreadable time")
            ) from None
        return upstream.rebased(self._clock, fields["AccessKeyId"], fields["SecretAccessKey"],
                                fields["SessionToken"], expiration, upstream_now)  # fmt: skip


def _unavailable(profile: InstanceProfile, what: str) -> str:
    return f"The upstream STS {what} while assuming {profile.role.arn}; retrying."


def _error(
    profile: InstanceProfile, status: int, payload: bytes, header_id: str | None
) -> BackendError:
    """Classify an STS error answer; the request id comes from the body, else the header."""
    fields = _xml_fields(payload, ("Code", "Message", "RequestId")) or {}
    code = fields.get("Code") or ("ServiceUnavailable" if status >= 500 else f"HTTP{status}")
    detail, request_id = _safe_detail(fields.get("Message")), fields.get("RequestId") or header_id
    if code == "ValidationError" and "DurationSeconds" in (detail or ""):
        message = f"The session duration asked for {profile.role.arn} is longer than it allows."
        return DurationTooLong(code, message, retryable=False, request_id=request_id,
                               detail=detail, status=status)  # fmt: skip
    retryable = status >= 500 or status == 429 or code in RETRYABLE_CODES
    message = (
        _unavailable(profile, f"answered {code}")
        if retryable
        else f"imdsd could not assume the role {profile.role.arn} ({code})."
    )
    return BackendError(code, message, retryable=retryable, request_id=request_id, detail=detail,
                        status=status)  # fmt: skip


_SIGNING_ECHO = re.compile(r"canonical string|string-to-sign|string to sign", re.IGNORECASE)
DETAIL_LIMIT = 300


def _safe_detail(message: str | None) -> str | None:
    """The upstream's message, fit for a log line. SignatureDoesNotMatch echoes the canonical
    request and string-to-sign, which can carry the host's session token: cut before them."""
    if message is None:
        return None
    echo = _SIGNING_ECHO.search(message)
    return (message[: echo.start()] if echo else message)[:DETAIL_LIMIT].strip()


def _xml_fields(payload: bytes, names: tuple[str, ...]) -> dict[str, str] | None:
    """The first text of each named element, namespaces ignored; None if it is not XML."""
    try:
        # The upstream is configured by the operator and answers over its own connection;
        # Python's expat refuses entity-expansion bombs.
        root = ElementTree.fromstring(payload)  # noqa: S314
    except ElementTree.ParseError:
        return None
    found: dict[str, str] = {}
    for element in root.iter():
        name = element.tag.rpartition("}")[2]
        if name in names and name not in found and element.text:
            found[name] = element.text.strip()
    return found


async def host_credentials(profile: str | None) -> HostCredentials:
    """The host's own AWS credentials from botocore's chain (or a named profile), frozen per
    use so refreshable ones (web identity, SSO, instance metadata) stay fresh."""
    try:
        found = await asyncio.to_thread(botocore.session.Session(profile=profile).get_credentials)
    except BotoCoreError as exc:
        raise BackendError("NoHostCredentials", f"cannot load the host's AWS credentials ({exc})",
                           retryable=False) from None  # fmt: skip
    if found is None:
        raise BackendError(
            "NoHostCredentials",
            "no AWS credentials for the host: set them in the environment, the shared "
            "credentials file (backend.sts.profile), web identity or the host's own metadata",
            retryable=False,
        )

    async def frozen() -> ReadOnlyCredentials:
        return await asyncio.to_thread(found.get_frozen_credentials)

    return frozen


@asynccontextmanager
async def open_backend(config: BackendConfig, clock: Clock) -> AsyncIterator[StsIssuer]:
    """An STS issuer with its own HTTP client; closed with the daemon."""
    sts = config.sts
    timeout = aiohttp.ClientTimeout(total=sts.timeout.total_seconds())
    async with AsyncExitStack() as stack:
        certificate = None
        if sts.host_credentials == "rolesanywhere":
            from imdsd.backends import rolesanywhere  # the X.509 signer only when it is used

            ra = config.rolesanywhere
            issuer = await stack.enter_async_context(rolesanywhere.opened(ra, clock))
            assert ra.role_arn is not None  # config: required with host_credentials  # noqa: S101
            credentials = _frozen(rolesanywhere.HostRole(issuer, ra.role_arn, clock, ra.duration))
            certificate = issuer.certificate
        else:
            credentials = await host_credentials(sts.profile)
        http = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=timeout, raise_for_status=False)
        )
        yield StsIssuer(http, credentials, sts, clock, socket.gethostname(), certificate)


def _frozen(host: HostRole) -> HostCredentials:
    async def current() -> ReadOnlyCredentials:
        session = await host.current()
        return ReadOnlyCredentials(session.access_key_id, session.secret_access_key, session.token)

    return current
