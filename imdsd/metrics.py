"""Every Prometheus metric imdsd exports, declared in one place, on the daemon's own registry,
and the small app that serves them with /healthz and /readyz on their own listener.

No label carries a secret or an unbounded value: path classes, status codes, results and
error classes are small fixed sets; instance ids and role ARNs are never labels.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Literal, get_args

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from imdsd.budgets import INCIDENTS, Incident
from imdsd.clock import Clock
from imdsd.inventory import Inventory
from imdsd.sessions import SessionCache, SessionState

PathClass = Literal["token", "credentials", "identity", "metadata"]
STATUSES = (200, 400, 401, 403, 404, 405, 429, 500)
SESSION_STATES = get_args(SessionState)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The loop-lag probe: a callback this often on the guest loop (a stall shows to within it), and
# the gauge is the worst lateness over the last one to two windows.
LOOP_LAG_INTERVAL_SECONDS = 0.005
LOOP_LAG_WINDOW_SECONDS = 10.0


class Metrics:
    """The registry and the instruments the daemon's parts update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Guest requests and tokens: plain integers on the hot path (no label lookup, no lock:
        # one event loop counts them), made into counters when scraped.
        self._requests: Tally[tuple[PathClass, int]] = Tally()
        self._tokens: Tally[str] = Tally()
        r.register(_GuestCollector(self._requests, self._tokens))
        self.issues = Counter(
            "imdsd_rotations",
            "Session issue attempts by result and error class.",
            ["result", "error"],
            registry=r,
        )
        self.limits = Counter(
            "imdsd_guest_limits",
            "Guest budget events: connections refused (per cap) or closed (per deadline), "
            "bodies over the limit, requests the parser refused, requests throttled.",
            ["event"],
            registry=r,
        )
        self._limits = {event: self.limits.labels(event) for event in INCIDENTS}
        self.upstream = Histogram(
            "imdsd_upstream_seconds", "Issuer call latency.", registry=r, buckets=LATENCY_BUCKETS
        )

    def request(self, cls: PathClass, status: int) -> None:
        """Count one guest request (called once per request, on the hot path)."""
        self._requests[cls, status] += 1
        if cls == "token":
            self._tokens["issued" if status == 200 else "refused"] += 1
        elif status == 401:
            self._tokens["rejected"] += 1

    def limit(self, event: Incident) -> None:
        """Count one guest budget event (no instance label: bounded cardinality)."""
        self._limits[event].inc()

    def watch_listeners(
        self, status: Callable[[], list[dict[str, Any]]], rebinds: Callable[[], int]
    ) -> None:
        """The scoped guest listeners: one series per device or namespace, and the rebinds."""
        self.registry.register(_ListenerCollector(status, rebinds))

    def watch_source(self, status: Callable[[], dict[str, Any]]) -> None:
        """The etcd source's gauges: is it connected, how stale may the inventory be."""
        self.registry.register(_SourceCollector(status))

    def watch_certificate(self, expiry: Callable[[], datetime | None], clock: Clock) -> None:
        """The host's X.509 certificate (IAM Roles Anywhere): seconds until it expires."""
        self.registry.register(_CertificateCollector(expiry, clock))

    @contextmanager
    def watch_loop(
        self,
        interval: float = LOOP_LAG_INTERVAL_SECONDS,
        window: float = LOOP_LAG_WINDOW_SECONDS,
    ) -> Iterator[LoopLag]:
        """The running loop's lag, by a probe on it, while the context lasts."""
        probe = LoopLag(asyncio.get_running_loop(), interval, window)
        self.registry.register(_LoopLagCollector(probe))
        try:
            yield probe
        finally:
            probe.close()

    def watch(self, inventory: Inventory, sessions: SessionCache, clock: Clock) -> None:
        """Session gauges, computed at scrape time from the live state."""
        self.registry.register(_SessionCollector(inventory, sessions, clock))


class _GuestCollector(Collector):
    def __init__(self, requests: Tally[tuple[PathClass, int]], tokens: Tally[str]) -> None:
        self._requests, self._tokens = requests, tokens

    def collect(self) -> Iterator[CounterMetricFamily]:
        requests = CounterMetricFamily("imdsd_requests", "Guest requests by path class and status.",
                                       labels=["path", "status"])  # fmt: skip
        labelled: Tally[tuple[str, str]] = Tally()
        for (path, status), count in self._requests.items():
            labelled[path, str(status) if status in STATUSES else "other"] += count
        for labels, count in sorted(labelled.items()):
            requests.add_metric(list(labels), count)
        yield requests
        tokens = CounterMetricFamily("imdsd_tokens",
                                     "IMDSv2 tokens issued, refused (PUT), rejected (GET 401).",
                                     labels=["result"])  # fmt: skip
        for result in ("issued", "refused", "rejected"):
            tokens.add_metric([result], self._tokens[result])
        yield tokens


class LoopLag:
    """A callback scheduled every `interval` on the loop; how late it runs is the loop's lag
    (anything that holds the loop, a parse, a sort, a C call holding the GIL, delays it by as
    long). Keeps the worst lateness of the current window and of the previous one: per tick,
    a float compared and stored, and asyncio's own timer handle."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, window: float) -> None:
        self._loop, self._interval, self._window = loop, interval, window
        self._current = self._previous = 0.0
        self._due = loop.time() + interval
        self._window_ends = self._due + window
        self._callback = self._tick  # bound once: a tick allocates no method object
        self._handle = loop.call_at(self._due, self._callback)

    def worst(self) -> float:
        """The greatest lateness seen over the last one to two windows, in seconds."""
        return max(self._current, self._previous)

    def close(self) -> None:
        self._handle.cancel()

    def _tick(self) -> None:
        now = self._loop.time()
        if now >= self._window_ends:
            self._previous, self._current = self._current, 0.0
            self._window_ends = now + self._window
        late = now - self._due
        if late > self._current:
            self._current = late
        self._due = now + self._interval
        self._handle = self._loop.call_at(self._due, self._callback)


class _LoopLagCollector(Collector):
    def __init__(self, probe: LoopLag) -> None:
        self._probe = probe

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "imdsd_loop_lag_seconds",
            "Worst lateness of a callback scheduled every few ms on the guest loop, over the "
            "last 10-20 s: how long a guest may have waited behind the daemon's own work.",
            value=self._probe.worst(),
        )


class _SourceCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self._status()
        yield GaugeMetricFamily("imdsd_inventory_connected",
                                "1 while the etcd watch is up, else 0 (serving the last known).",
                                value=1.0 if status.get("connected") else 0.0)  # fmt: skip
        yield GaugeMetricFamily("imdsd_inventory_stale_seconds",
                                "Seconds since the inventory was last known to match etcd.",
                                value=float(status.get("stale_seconds", 0.0)))  # fmt: skip


class _ListenerCollector(Collector):
    def __init__(
        self, status: Callable[[], list[dict[str, Any]]], rebinds: Callable[[], int]
    ) -> None:
        self._status, self._rebinds = status, rebinds

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauge = GaugeMetricFamily("imdsd_scoped_listeners",
                                  "Guest listeners bound to a device or opened in a namespace.",
                                  labels=["device", "ifindex", "namespace"])  # fmt: skip
        for entry in self._status():
            labels = [entry.get("device", ""), str(entry.get("ifindex", "")),
                      entry.get("namespace", "")]  # fmt: skip
            gauge.add_metric(labels, len(entry["listening"]))
        yield gauge
        yield CounterMetricFamily("imdsd_listener_rebinds",
                                  "Scoped listeners closed and bound again (a device re-created).",
                                  value=self._rebinds())  # fmt: skip


class _CertificateCollector(Collector):
    def __init__(self, expiry: Callable[[], datetime | None], clock: Clock) -> None:
        self._expiry, self._clock = expiry, clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        expiry = self._expiry()
        if expiry is not None:  # the sts backend on the standard chain has no certificate
            yield GaugeMetricFamily("imdsd_host_certificate_expiry_seconds",
                                    "Seconds until the host's X.509 certificate for IAM Roles "
                                    "Anywhere expires (negative: expired, nothing is signed).",
                                    value=(expiry - self._clock.now()).total_seconds())  # fmt: skip


class _SessionCollector(Collector):
    def __init__(self, inventory: Inventory, sessions: SessionCache, clock: Clock) -> None:
        self._inventory, self._sessions, self._clock = inventory, sessions, clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self._clock.now()
        keys = [a.instance_id for a in self._inventory.associations()]
        states = Tally(self._sessions.state(key, now) for key in keys)
        gauge = GaugeMetricFamily(
            "imdsd_sessions", "Associations by session state.", labels=["state"]
        )
        for state in SESSION_STATES:
            gauge.add_metric([state], states[state])
        yield gauge
        expiring = [
            served.expiration
            for key in keys
            if (served := self._sessions.current(key, now)) is not None
        ]
        if expiring:
            seconds = (min(expiring) - now).total_seconds()
        else:  # no valid session: 0 if some association needs one (alert), +Inf if none does
            seconds = 0.0 if keys else math.inf
        help_text = (
            "Seconds until the earliest valid session expires (0: none valid; +Inf: none needed)."
        )
        yield GaugeMetricFamily("imdsd_session_earliest_expiry_seconds", help_text, value=seconds)


def make_metrics_app(metrics: Metrics, ready: asyncio.Event) -> web.Application:
    """/metrics (Prometheus text), /healthz (alive), /readyz (sessions primed, listeners up)."""

    async def scrape(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        return (
            web.Response(text="ready\n")
            if ready.is_set()
            else web.Response(status=503, text="starting\n")
        )

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
