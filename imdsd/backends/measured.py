"""A Backend decorator that counts and times every issue (metrics wrap; never flags inside)."""

from __future__ import annotations

import time

from imdsd.backends.base import Backend
from imdsd.errors import BackendError
from imdsd.metrics import Metrics
from imdsd.model import InstanceProfile, Session


class Measured:
    """A Backend decorator: counts every issue by outcome and times it."""

    def __init__(self, inner: Backend, metrics: Metrics) -> None:
        self._inner, self._metrics = inner, metrics

    async def issue(self, profile: InstanceProfile, *, session_name: str) -> Session:
        started = time.perf_counter()
        try:
            session = await self._inner.issue(profile, session_name=session_name)
        except BackendError as exc:
            self._metrics.issues.labels(
                "failure", "retryable" if exc.retryable else "refused"
            ).inc()
            raise
        except Exception:
            self._metrics.issues.labels("failure", "internal").inc()
            raise
        finally:
            self._metrics.upstream.observe(time.perf_counter() - started)
        self._metrics.issues.labels("success", "").inc()
        return session
