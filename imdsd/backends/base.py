"""The Backend protocol: one method. A leaf: implementations satisfy it structurally."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

from imdsd.model import InstanceProfile, Session


class Backend(Protocol):
    """Mints one session for one instance profile. Holds no cache; the scheduler owns freshness.

    Raises imdsd.errors.BackendError (with an EC2/STS-style code) when it cannot.
    """

    async def issue(self, profile: InstanceProfile, *, session_name: str) -> Session: ...


@runtime_checkable
class SignsWithCertificate(Protocol):
    """A backend that signs with the host's X.509 certificate (IAM Roles Anywhere, directly or
    for the sts backend's host credentials): the metrics export its expiry."""

    def certificate_expiry(self) -> datetime | None: ...
