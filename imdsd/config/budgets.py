"""[budgets]: what each guest may consume (the types and the ledger are in imdsd.budgets)."""

from __future__ import annotations

from datetime import timedelta

from imdsd.budgets import Budget, BudgetPolicy
from imdsd.config.converters import duration_in, int_in
from imdsd.config.reader import Section
from imdsd.model import INSTANCE_ID

_BUDGET = ("connections", "requests_per_second", "burst")
BUDGET_KEYS = (*_BUDGET, *(f"strangers_{k}" for k in _BUDGET), "idle_timeout", "head_timeout",
                "max_body", "instances")  # fmt: skip


def _budget(t: Section, default: Budget, prefix: str = "") -> Budget:
    """connections (1..4096), requests_per_second (1..100000) and burst (1..100000)."""
    return Budget(
        connections=t.take(
            f"{prefix}connections",
            int_in(1, 4096),
            default.connections,
            "an integer from 1 to 4096",
        ),
        requests_per_second=t.take(
            f"{prefix}requests_per_second",
            int_in(1, 100_000),
            default.requests_per_second,
            "an integer from 1 to 100000",
        ),
        burst=t.take(
            f"{prefix}burst", int_in(1, 100_000), default.burst, "an integer from 1 to 100000"
        ),
    )


def parse_budgets(t: Section) -> BudgetPolicy:
    """[budgets]: what each guest may consume, strangers' shared allowance, per-instance
    overrides in [budgets.instances.<instance id>], and the connection timeouts."""
    d = BudgetPolicy()
    instance = _budget(t, d.instance)
    overrides: dict[str, Budget] = {}
    for iid, section in t.keyed("instances", _BUDGET).items():
        if INSTANCE_ID.fullmatch(iid):
            overrides[iid] = _budget(section, instance)
        else:
            allowed = '"i-" + 8 or 17 lowercase hex digits'
            t.child("instances").problem(iid, "a name that is no instance id", allowed)
    return BudgetPolicy(
        instance=instance,
        strangers=_budget(t, d.strangers, "strangers_"),
        overrides=overrides,
        idle_timeout=t.take(
            "idle_timeout",
            duration_in(timedelta(seconds=1), timedelta(hours=1)),
            d.idle_timeout,
            "a duration from 1s to 1h",
        ),
        head_timeout=t.take(
            "head_timeout",
            duration_in(timedelta(seconds=1), timedelta(minutes=1)),
            d.head_timeout,
            "a duration from 1s to 1m",
        ),
        max_body=t.take(
            "max_body", int_in(0, 65536), d.max_body, "an integer from 0 to 65536 (bytes)"
        ),
    )
