"""Invariant 5 for operators: whatever a config holds, the answer is a Config or a ConfigError
whose problems are one line each (check-config and run: exit 3), never another exception."""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imdsd.config import validate
from imdsd.config.budgets import BUDGET_KEYS
from imdsd.config.converters import canonical_address
from imdsd.config.instances import INSTANCE_KEYS, OPTION_KEYS
from imdsd.errors import ConfigError

pytestmark = pytest.mark.slow  # hypothesis over TOML values

TABLES: dict[str, tuple[str, ...]] = {
    "imds": ("listeners",),
    "state": ("directory",),
    "admin": ("socket",),
    "metrics": ("listen",),
    "rotation": ("refresh_fraction", "refresh_before", "min_remaining", "jitter", "retry_initial",
                 "retry_max", "concurrency", "startup_deadline"),
    "backend": ("kind",),
    "backend.local": ("lifetime", "key"),
    "backend.sts": ("region", "endpoint_url", "profile", "duration", "session_scope",
                    "session_tags", "source_identity", "timeout"),
    "log": ("level", "format"),
    "budgets": tuple(k for k in BUDGET_KEYS if k != "instances"),
    "budgets.instances.i-0123456789abcdef0": ("connections", "requests_per_second", "burst"),
}  # fmt: skip
ARRAYS: dict[str, tuple[str, ...]] = {
    "instances": INSTANCE_KEYS,
    "instance_profiles": ("name", "path", "id", "role_arn", "external_id"),
    "associations": ("instance", "profile"),
}

scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["0s", "6h", "99999999999h", "1h30m", "127.0.0.1:0", "[::1]:80", "sts",
                     "local", "debug", "i-0123456789abcdef0", "arn:aws:iam::123456789012:role/r",
                     "eu-west-1", "required", "optional", "disabled", "", "\n", "é"]),
    st.booleans(),
    st.datetimes(), st.dates(), st.times(),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def put(doc: dict[str, Any], dotted: str, key: str, value: object) -> None:
    table = doc
    for part in dotted.split("."):
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            return
    table[key] = value


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for dotted, keys in TABLES.items():
        for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
            put(doc, dotted, key, draw(values))
    for name, keys in ARRAYS.items():
        rows = [
            {
                k: draw(values)
                for k in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True))
            }
            for _ in range(draw(st.integers(0, 2)))
        ]
        if rows:
            doc[name] = rows
    if draw(st.booleans()):
        doc.setdefault("instances", []).append(
            {"metadata_options": {k: draw(values) for k in OPTION_KEYS}}
        )
    if draw(st.booleans()):
        doc[draw(st.text(max_size=10))] = draw(values)  # an unknown section, any name
    return doc


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_any_document_is_a_config_or_one_line_problems(doc: dict[str, Any]) -> None:
    """Every key, with values of every TOML type and shape (huge integers, NaN, durations that
    overflow, nested tables, dates): validate() returns or raises ConfigError, and each problem
    is one line that names a key path."""
    try:
        validate(doc)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            line = str(problem)
            assert "\n" not in line and line.split(":", 1)[0], line


def test_a_date_where_a_duration_goes() -> None:
    """A TOML date or time (not a string) for a duration is a problem, not a crash."""
    try:
        validate(
            {
                "rotation": {"jitter": dt.time(1, 2)},
                "backend": {"local": {"lifetime": dt.date(2026, 1, 1)}},
            }
        )
    except ConfigError as exc:
        assert [p.path for p in exc.problems] == ["rotation.jitter", "backend.local.lifetime"]
    else:
        raise AssertionError("accepted")


_ADDRESS_LIKE = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,4}){2,4}", fullmatch=True),
    st.text(alphabet="0123456789.:abcdefABCDEF%\x00 ", max_size=24),
    st.text(max_size=12),
)


@given(_ADDRESS_LIKE)
def test_an_address_is_accepted_and_written_as_ipaddress_does(value: str) -> None:
    """An operator's address is taken or refused, and written, exactly as the ipaddress module
    would (the fast path for canonical dotted quads changes nothing): leading zeros, five
    parts, IPv6 spellings and stray bytes included."""
    try:
        expected: str | None = str(ipaddress.ip_address(value))
    except ValueError:
        expected = None
    try:
        found: str | None = canonical_address(value)
    except ValueError:
        found = None
    assert found == expected
