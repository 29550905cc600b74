"""SessionCache: the current session of each association and its pre-rendered reply bodies.

The request path only reads from here: one dict lookup, one expiry comparison, bytes out.
Bodies are rendered once, when a session is stored (the renderer is injected, so this module
depends on no HTTP code); the rendered document is then the only copy of the session's
secrets kept (a 10,000-instance host keeps each session's bytes once), read back for the few
that need the session itself (the vault, admin views). A new session replaces the old one in
a single assignment; the old one's holders keep using it until its own expiry. Never imports
aiohttp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from imdsd.model import Role, Session

SessionState = Literal["fresh", "failing", "failed", "expired", "pending"]
PENDING_CODE = "CredentialsPending"
PENDING_MESSAGE = "No credentials are available for this role yet; retry shortly."

# A document as two parts written one after the other: (body, closing).
Parts = tuple[bytes, bytes]
# (session, role) -> (the credential document's fields, open; the legacy document's closing;
# the extended document's closing): the fields are rendered once and serve both documents
CredentialRenderer = Callable[[Session, Role], tuple[bytes, bytes, bytes]]
# a legacy credential document -> the session it carries
CredentialReader = Callable[[bytes], Session]
# (code, message, when) -> failure document
FailureRenderer = Callable[[str, str, datetime], bytes]


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    """A session ready to serve: what the request path reads."""

    role_arn: str
    expiration: datetime
    fields: bytes = field(repr=False)  # both documents' fields, open
    closing: bytes  # the legacy document's closing
    extended_closing: bytes  # AccountId and the brace
    read: CredentialReader = field(repr=False, compare=False)

    @property
    def session(self) -> Session:
        """The session, read back from its document (to the second, as the document has it)."""
        return self.read(self.fields + self.closing)


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """Why the last attempt to get a session for an association failed."""

    code: str
    message: str
    at: datetime
    document: Parts  # (the failure document, b"")


class SessionCache:
    """Current sessions (and last failures), keyed by instance id."""

    def __init__(
        self, render: CredentialRenderer, render_failure: FailureRenderer, read: CredentialReader
    ) -> None:
        self._render = render
        self._read = read
        self._render_failure = render_failure
        self._served: dict[str, Served] = {}
        self._failures: dict[str, Failure] = {}
        self.version = 0  # counts stores and drops: what the vault keeps may have changed
        # The keys stored or dropped since the vault last took them (vault/sealer.py); None
        # while nobody keeps them (no vault): the set is then never grown.
        self.changed: set[str] | None = None

    def store(self, key: str, session: Session, role: Role) -> Served:
        """Render and install a new session; clears the key's failure."""
        fields, legacy, extended = self._render(session, role)
        served = Served(role_arn=role.arn, expiration=session.expiration, read=self._read,
                        fields=fields, closing=legacy, extended_closing=extended)  # fmt: skip
        self._served[key] = served
        self._failures.pop(key, None)
        self.version += 1
        if self.changed is not None:
            self.changed.add(key)
        return served

    def fail(self, key: str, code: str, message: str, at: datetime) -> Failure:
        """Record a failed attempt; the current session (if any) stays."""
        failure = Failure(
            code=code,
            message=message,
            at=at,
            document=(self._render_failure(code, message, at), b""),
        )
        self._failures[key] = failure
        return failure

    def answer(self, key: str, role_arn: str, *, extended: bool, now: datetime) -> Parts:
        """The credential document to serve now (the hot path).

        The current session's pre-rendered bytes while it is unexpired and belongs to the
        association's role; otherwise EC2's failure shape. Never expired keys (invariant 3).
        """
        served = self.current(key, now)
        if served is not None and served.role_arn == role_arn:
            return served.fields, served.extended_closing if extended else served.closing
        failure = self._failures.get(key)
        if failure is not None:
            return failure.document
        return self._render_failure(PENDING_CODE, PENDING_MESSAGE, now), b""

    def state(self, key: str, now: datetime) -> SessionState:
        """fresh (valid, last refresh fine), failing (valid, last refresh failed), failed (no
        valid session, a failure recorded), expired (no valid session, no failure), pending."""
        failure = self._failures.get(key)
        if self.current(key, now) is not None:
            return "failing" if failure else "fresh"
        if failure is not None:
            return "failed"
        return "expired" if key in self._served else "pending"

    def current(self, key: str, now: datetime) -> Served | None:
        """The key's session if it is still valid at `now`; never an expired one."""
        served = self._served.get(key)
        return served if served is not None and now < served.expiration else None

    def get(self, key: str) -> Served | None:
        return self._served.get(key)

    def failure(self, key: str) -> Failure | None:
        return self._failures.get(key)

    def clear_failure(self, key: str) -> None:
        """Forget the last failure (it was the previous association's, not the new one's)."""
        self._failures.pop(key, None)

    def drop(self, key: str) -> None:
        """Forget an association's session and failure (disassociated or removed)."""
        self._served.pop(key, None)
        self._failures.pop(key, None)
        self.version += 1
        if self.changed is not None:
            self.changed.add(key)

    def keys(self) -> list[str]:
        return list(self._served)

    def served(self) -> dict[str, Served]:
        """Every served session by key: a copy of the references (for the vault's first seal)."""
        return dict(self._served)
