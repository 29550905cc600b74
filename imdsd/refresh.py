"""When each session is refreshed, and when a failed issue is retried: pure functions of a
session, the rotation policy and a uniform draw (tests call them with tables; the Rotator and
`make bench` call the same ones)."""

from __future__ import annotations

from datetime import datetime, timedelta

from imdsd.errors import BackendError
from imdsd.model import RotationPolicy, Session


def refresh_at(session: Session, policy: RotationPolicy, u: float) -> datetime:
    """When to replace `session`: at `refresh_fraction` of its life or `refresh_before` its
    expiry, whichever is first, minus up to `jitter` (u in [0, 1) picks how much) so sessions
    issued together spread out. A session is used for at least a quarter of its life (a short
    one, e.g. an upstream-clamped duration, must not be re-issued in a loop), but never past
    expiry - min_remaining, the freshness floor guests are promised; only a session too short
    for that floor (see `too_short`) is refreshed at the quarter mark instead, as early as the
    loop guard allows. The jitter takes at most half of the time to that point."""
    issued, expiry = session.issued_at, session.expiration
    lifetime = expiry - issued
    due = max(
        min(issued + lifetime * policy.refresh_fraction, expiry - policy.refresh_before),
        issued + lifetime / 4,
    )
    if not too_short(session, policy):
        due = min(due, expiry - policy.min_remaining)
    return due - min(policy.jitter, (due - issued) / 2) * u


def first_refresh_at(session: Session, policy: RotationPolicy, share: float) -> datetime:
    """The first refresh of a session issued in a cold start's wave: `share` (in [0, 1)) of
    the way from an eighth of its life (never a re-issue right after the issue) to its
    unjittered refresh_at(). Priming gives the i-th of N sessions a share in [i/N, (i+1)/N), so
    their refreshes are spread evenly over the window instead of all coming back in the last
    `jitter` minutes of it; later refreshes keep that phase."""
    due = refresh_at(session, policy, 0.0)
    start = min(due, session.issued_at + (session.expiration - session.issued_at) / 8)
    return start + (due - start) * share


def too_short(session: Session, policy: RotationPolicy) -> bool:
    """A session that reaches the min_remaining floor within an eighth of its life: refreshing
    it there would re-issue such sessions back to back (each as short), so it is refreshed at a
    quarter of its life and the Rotator warns that min_remaining cannot be kept."""
    lifetime = session.expiration - session.issued_at
    return session.expiration - policy.min_remaining < session.issued_at + lifetime / 8


def expired_answer(session: Session) -> BackendError:
    lifetime = round((session.expiration - session.issued_at).total_seconds())
    return BackendError(
        "InvalidCredentials",
        "The credential issuer returned credentials that have already expired; retrying.",
        detail=f"issued with {lifetime} s of lifetime, expiring {session.expiration.isoformat()}",
    )


def retry_after(attempt: int, policy: RotationPolicy, u: float) -> timedelta:
    """Exponential backoff with equal jitter: half the capped step, plus up to another half."""
    step = min(policy.retry_max, policy.retry_initial * (1 << min(attempt, 20)))
    return step / 2 + step / 2 * u
