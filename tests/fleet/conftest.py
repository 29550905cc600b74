"""The fleet tests' etcd: one server for the session (each test writes under its own prefix)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet.etcd import Etcd
from tests.helpers import SCRATCH

_PREFIXES = itertools.count()


@pytest.fixture(scope="session")
def etcd() -> Iterator[Etcd]:
    server = Etcd(SCRATCH / "etcd")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A fleet of its own for each test, on the shared server."""
    return f"/imdsd-test-{next(_PREFIXES)}"


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[Etcd]:
    """A server this test may stop and start (an etcd outage)."""
    server = Etcd(tmp_path / "etcd")
    server.start()
    yield server
    server.stop()
