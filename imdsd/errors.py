"""Every exception class imdsd raises, and the codes they answer with. A leaf module: it
imports nothing from imdsd.

Each exception builds its message from the offending value, and no message ever carries a
secret (a key, a token, a SecretAccessKey): callers pass names and codes, never credentials.
One mechanism names an error for its callers: `http_status` and `code` are what imdsd answers
(the admin API's status and code, the CLI's printed code, a guest's EC2 page), so no message
carries its code in its text and no handler keeps its own table of classes.
"""

from __future__ import annotations

from dataclasses import dataclass


class ImdsdError(Exception):
    """Base of every error imdsd raises on purpose; `http_status` and `code` are how imdsd
    answers it (a class that is no refusal is the daemon's own failure: 500)."""

    http_status = 500
    code = "InternalError"


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

    http_status, code = 400, "InvalidParameter"

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class UnreadableFiles(ConfigError):
    """Files a client needs cannot be read. Each problem names the key, the path and the errno;
    `failures` is (key path, errno name) each, for the log. Never a file's contents."""

    def __init__(self, problems: list[Problem], failures: tuple[tuple[str, str], ...]) -> None:
        self.failures = failures
        super().__init__(problems)


class RecordError(ImdsdError, ValueError):
    """A fleet record that fails validation; each problem names the key (and the field)."""

    def __init__(self, *problems: str) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class StateError(ImdsdError):
    """The state file exists but cannot be read or written."""


# The upstream's error codes (STS and its kin) that say "slow down" or "try again".
THROTTLING_CODES = frozenset({"Throttling", "ThrottlingException", "RequestLimitExceeded",
                              "TooManyRequestsException", "SlowDown"})  # fmt: skip
RETRYABLE_CODES = THROTTLING_CODES | frozenset({
    "ServiceUnavailable", "InternalFailure", "InternalError", "IDPCommunicationError",
    "RequestTimeout",
})  # fmt: skip


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


class DurationTooLong(BackendError):
    """STS refused DurationSeconds: more than the role's MaxSessionDuration (or chaining's 1 h)."""


class InventoryError(ImdsdError):
    """An inventory change was refused (unknown id, a second association, ...)."""

    http_status, code = 400, "InvalidParameterValue"


class NotFoundError(InventoryError):
    """The change names an instance or profile that does not exist."""

    http_status, code = 404, "NotFound"


class ConflictError(InventoryError):
    """The change contradicts the current state (a second association, a taken address)."""

    http_status, code = 409, "Conflict"


class BadRequest(InventoryError):
    """The admin request's body is not what the endpoint takes."""

    code = "BadRequest"


class DaemonUnavailable(ImdsdError):
    """Nothing answers on the admin socket."""


class Refused(ImdsdError):
    """The daemon refused an admin call: its answer's status, code, message and problems."""

    def __init__(self, status: int, code: str, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.http_status, self.code, self.problems = status, code, problems


class Ec2Error(ImdsdError):
    """Answer a guest with EC2's page for this status; the message is for the log only.
    `close` ends the connection after the answer."""

    def __init__(self, status: int, reason: str, *, close: bool = False) -> None:
        super().__init__(reason)
        self.http_status = status
        self.close = close
