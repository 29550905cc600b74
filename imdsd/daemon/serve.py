"""The daemon as a process: signals (a stop ends start-up too), READY and the watchdog for
systemd, SIGHUP reloads applied at once, and one summary line per guest and minute."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from dataclasses import replace

import structlog

from imdsd import heap, systemd
from imdsd.budgets import Ledger
from imdsd.clock import Clock
from imdsd.config import Config
from imdsd.daemon import Daemon, running
from imdsd.errors import ConfigError
from imdsd.log import LoopErrors
from imdsd.log import configure as configure_logging

log = structlog.get_logger("imdsd")
Reread = Callable[[], Config]  # the config file again (ConfigError when it is bad)
GUEST_SUMMARY_SECONDS = 60.0  # at most one incident summary line per guest per minute
# Config attributes a reload cannot change -> the config file's name for them
# The GIL's hand-over interval while a worker thread computes (a reload's parse, signing,
# the vault, an admin listing): the guest loop waits for the GIL at every system call it
# makes, up to this long each time (CPython's default, 5 ms, made every request of a guest
# take 5-12 ms during a 10,000-instance reload; 0.5 ms costs the worker a little more
# switching and nothing when it is alone).
SWITCH_INTERVAL = 0.0005
RESTART_ONLY = {"imds": "imds", "rotation": "rotation", "backend": "backend", "host": "host",
                "signing": "identity", "inventory": "inventory"}  # fmt: skip


async def serve(
    config: Config,
    clock: Clock,
    reread: Reread | None = None,
) -> None:
    """Run until SIGTERM or SIGINT (in-flight requests get a grace period, then exit 0);
    SIGHUP applies `reread()` (the CLI's: the file again, with its flags), refusing a
    bad file and keeping the running config. A stop during start-up (etcd's first load, the
    backend opening, priming) ends start-up at once and shuts down the same way."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    heap.one_malloc_arena()  # before any thread starts
    stop, reload, started = asyncio.Event(), asyncio.Event(), asyncio.Event()
    starting = asyncio.current_task()

    def on_stop() -> None:
        if starting is not None and not stop.is_set() and not started.is_set():
            starting.cancel()  # what start-up awaits is abandoned; the exit stack unwinds
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    loop.set_exception_handler(LoopErrors())
    try:
        async with running(config, clock) as daemon:
            started.set()
            await _serving_until(stop, reload, daemon, config, reread)
            systemd.notify("STOPPING=1")
            log.info("stopping")
    except asyncio.CancelledError:
        if not stop.is_set() or started.is_set() or starting is None:
            raise
        starting.uncancel()
        log.info("stopped during start-up")


async def _serving_until(
    stop: asyncio.Event,
    reload: asyncio.Event,
    daemon: Daemon,
    config: Config,
    reread: Reread | None,
) -> None:
    """READY, then serve: reload on SIGHUP until stopped."""
    systemd.notify("READY=1", f"STATUS=serving {len(daemon.inventory.instances())} instances")
    log.info(
        "ready",
        listening=list(daemon.urls),
        admin_socket=str(daemon.admin_socket),
        instances=len(daemon.inventory.instances()),
        associations=len(daemon.inventory.associations()),
        backend=config.backend.kind,
        curl=_curl_hint(daemon.urls[0]),
    )
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(_summaries(daemon.api.ledger, stop), name="guest summaries")
        interval = systemd.watchdog_interval()
        if interval:
            tasks.create_task(_watchdog(interval, stop), name="watchdog")
        while not stop.is_set():
            await _first(stop, reload)
            if reload.is_set() and not stop.is_set():
                reload.clear()
                with heap.bulk():  # the new config and what it built, then frozen
                    config = await _reload(daemon, config, reread)


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _summaries(ledger: Ledger, stop: asyncio.Event) -> None:
    """Guest-caused incidents as one line per guest per interval, with counts: never a line
    per event, never the guest's bytes (a flood costs the host's log nothing)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), GUEST_SUMMARY_SECONDS)
        log_summaries(ledger)


def log_summaries(ledger: Ledger) -> None:
    for key, counts in ledger.summaries():
        log.warning("guest over budget", guest=key, window_seconds=GUEST_SUMMARY_SECONDS, **counts)


async def _watchdog(interval: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        systemd.notify("WATCHDOG=1")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def _reload(daemon: Daemon, current: Config, reread: Reread | None) -> Config:
    """SIGHUP: apply the file's instances, profiles, associations, budgets and [log]; sessions
    that did not change are kept. A file that fails for any reason is refused and logged; the
    running config stays and the daemon keeps serving."""
    if reread is None:
        return current
    systemd.reloading()
    try:  # reading and validating the file (user data included) is off the guest loop
        return await _apply(daemon, current, await asyncio.to_thread(reread))
    except ConfigError as exc:
        log.error("reload refused: the config is invalid; keeping the running one",
                  problems=[str(p) for p in exc.problems])  # fmt: skip
    except Exception as exc:  # any other failure is a reload refused, never an outage
        log.error("reload failed; keeping the running config",
                  error=exc.__class__.__name__, exc_info=exc)  # fmt: skip
    finally:
        systemd.notify("READY=1")
    return current


async def _apply(daemon: Daemon, current: Config, new: Config) -> Config:
    """The new file takes effect: the inventory's new view is planned in bounded steps while
    the current one serves, installed at once, then followed (daemon.apply) before any
    guest request is read."""
    changed: set[str] = set()
    if not daemon.inventory.managed_by:  # an etcd-sourced inventory follows etcd, not the file
        changed = await daemon.inventory.rebase(new.instances, new.profiles, new.associations)
    daemon.api.ledger.policy = new.budgets
    if new.log != current.log:
        configure_logging(new.log.level, new.log.format)
        daemon.api.log_requests = new.log.level == "debug"
    daemon.apply(changed)
    restart_only = [k for k in RESTART_ONLY if getattr(new, k) != getattr(current, k)]
    if restart_only:
        log.warning("reload: these sections change only at restart",
                    sections=[RESTART_ONLY[k] for k in restart_only])  # fmt: skip
    log.info(
        "reloaded",
        changed_associations=sorted(changed),
        instances=len(daemon.inventory.instances()),
    )
    return replace(new, **{k: getattr(current, k) for k in restart_only})


def _curl_hint(url: str) -> str:
    ttl = '-H "X-aws-ec2-metadata-token-ttl-seconds: 21600"'
    header = '-H "X-aws-ec2-metadata-token: $TOKEN"'
    return (
        f"TOKEN=$(curl -sX PUT {url}/latest/api/token {ttl}); "
        f"curl -s {header} {url}/latest/meta-data/iam/security-credentials/"
    )
