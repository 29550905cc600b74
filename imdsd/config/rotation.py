"""[rotation]: when sessions are refreshed, how many issues at once, how long start-up waits."""

from __future__ import annotations

from datetime import timedelta

from imdsd.config.backend import BackendConfig
from imdsd.config.converters import duration_in, fraction, int_in
from imdsd.config.reader import DURATION, Reader, Section, format_duration
from imdsd.model import RotationPolicy

H = timedelta(hours=1)


def parse_rotation(t: Section) -> RotationPolicy:
    d = RotationPolicy()
    up_to_12h, up_to_6h = duration_in(timedelta(0), 12 * H), duration_in(timedelta(0), 6 * H)
    retry = duration_in(timedelta(seconds=1), H)
    p = RotationPolicy(
        refresh_fraction=t.take(
            "refresh_fraction",
            fraction,
            d.refresh_fraction,
            "a number greater than 0 and less than 1",
        ),
        refresh_before=t.take("refresh_before", up_to_12h, d.refresh_before, f"{DURATION}; to 12h"),
        min_remaining=t.take("min_remaining", up_to_12h, d.min_remaining, f"{DURATION}; to 12h"),
        jitter=t.take("jitter", up_to_6h, d.jitter, f"{DURATION}; to 6h"),
        retry_initial=t.take("retry_initial", retry, d.retry_initial, "a duration from 1s to 1h"),
        retry_max=t.take("retry_max", retry, d.retry_max, "a duration from 1s to 1h"),
        concurrency=t.take(
            "concurrency", int_in(1, 1024), d.concurrency, "an integer from 1 to 1024"
        ),
        max_rate=t.take("max_rate", int_in(1, 10000), d.max_rate, "an integer from 1 to 10000"),
        startup_deadline=t.take(
            "startup_deadline",
            duration_in(timedelta(seconds=1), timedelta(seconds=60)),
            d.startup_deadline,
            "a duration from 1s to 1m (systemd's TimeoutStartSec=90s covers it)",
        ),
    )
    if p.refresh_before < p.min_remaining:
        t.problem(
            "refresh_before",
            format_duration(p.refresh_before),
            f"at least rotation.min_remaining ({format_duration(p.min_remaining)})",
        )
    if p.retry_max < p.retry_initial:
        t.problem(
            "retry_max",
            format_duration(p.retry_max),
            f"at least rotation.retry_initial ({format_duration(p.retry_initial)})",
        )
    return p


def check_lifetime(reader: Reader, p: RotationPolicy, backend: BackendConfig) -> None:
    """A session must outlive refresh_before + jitter, or it would be refreshed on arrival."""
    floor = p.refresh_before + p.jitter
    if backend.lifetime <= floor:
        reader.problem(
            backend.lifetime_key,
            format_duration(backend.lifetime),
            f"more than rotation.refresh_before + rotation.jitter ({format_duration(floor)}),"
            " or the session would be refreshed as soon as it is issued",
        )
