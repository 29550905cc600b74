"""The exception hierarchy. A leaf module: it imports nothing from imdsd.

Each exception builds its message from the offending value, and no message ever carries a
secret (a key, a token, a SecretAccessKey): callers pass names and codes, never credentials.
"""

from __future__ import annotations

from dataclasses import dataclass


class ImdsdError(Exception):
    """Base of every error imdsd raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One configuration error: where it is, what was there, and what is allowed."""

    path: str
    value: str
    allowed: str

    def __str__(self) -> str:
        return f"{self.path}: got {self.value}; allowed: {self.allowed}"


class ConfigError(ImdsdError):
    """The configuration is invalid; carries every problem found, one line each."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


THROTTLING_CODES = frozenset({"Throttling", "ThrottlingException", "RequestLimitExceeded",
                              "TooManyRequestsException", "SlowDown"})  # fmt: skip


class BackendError(ImdsdError):
    """A backend could not issue a session.

    `code` is an EC2/STS-style error code and the message is what a guest may read (they become
    the failure document's `Code` and `Message`); `retryable` says whether a later attempt may
    succeed (throttling, 5xx, timeouts). `request_id`, `status` (the upstream's HTTP status)
    and `detail` (the upstream's own words) are for the operator's log only.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = True,
        request_id: str | None = None,
        detail: str | None = None,
        status: int | None = None,
    ) -> None:
        self.code = code
        self.retryable = retryable
        self.request_id = request_id
        self.detail = detail
        self.status = status
        super().__init__(message)

    @property
    def throttling(self) -> bool:
        """The upstream refused for its own rate: every call should slow down, not just this."""
        return self.status == 429 or self.code in THROTTLING_CODES


class InventoryError(ImdsdError):
    """An inventory change was refused (unknown id, a second association, ...)."""


class NotFoundError(InventoryError):
    """The change names an instance or profile that does not exist."""


class ConflictError(InventoryError):
    """The change contradicts the current state (a second association, a taken address)."""
