"""The composition root: the only place where imdsd's objects are created and wired.

Reads top to bottom: build the inventory and caches, open the listeners (guests are answered
from the first second, invariant 8), then open the backend (which may wait on the network),
start rotation and prime every session up to the start-up deadline; on exit, everything
closes in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import structlog
from aiohttp import web

from imdsd import __version__, systemd
from imdsd.admin.app import make_admin_app
from imdsd.backends import opener
from imdsd.backends.base import Backend
from imdsd.backends.deferred import Deferred
from imdsd.backends.measured import Measured
from imdsd.backends.shared import ProfileScoped
from imdsd.budgets import Ledger, connection_ceiling
from imdsd.clock import Clock
from imdsd.config import Config, load
from imdsd.config.reader import Listener
from imdsd.errors import ConfigError, Problem
from imdsd.fleet.source import FleetSource
from imdsd.imds import render
from imdsd.imds.app import MetadataApi
from imdsd.imds.listener import serving_guests
from imdsd.imds.server import GuestServer
from imdsd.imds.tree import TreeCache
from imdsd.inventory import Inventory
from imdsd.log import LoopErrors
from imdsd.log import configure as configure_logging
from imdsd.metrics import Metrics, make_metrics_app
from imdsd.scheduler import Rotator
from imdsd.sessions import SessionCache
from imdsd.signatures import open_signer
from imdsd.state import StateFile
from imdsd.tokens import TokenIssuer
from imdsd.vault import KEY_NAME as VAULT_KEY
from imdsd.vault import Vault, restore, sealing, vault_key

log = structlog.get_logger("imdsd")
SHUTDOWN_GRACE_SECONDS = 5.0
GUEST_SUMMARY_SECONDS = 60.0  # at most one incident summary line per guest per minute
# A burst of connections from one guest must not fill the accept queue for the others (the
# kernel drops SYNs past it: a one-second retransmit for whoever comes next). Over-cap
# connections are refused as fast as they arrive, so a deep queue drains; Linux caps it at
# net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 4096
ADMIN_SOCKET_MODE = 0o660
REUSE_MARGIN = timedelta(minutes=1)
# Config attributes a reload cannot change -> the config file's name for them
RESTART_ONLY = {"imds": "imds", "rotation": "rotation", "backend": "backend", "host": "host",
                "signing": "identity", "inventory": "inventory"}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Daemon:
    """A running daemon's parts, for the code that started it (the CLI, and tests)."""

    urls: tuple[str, ...]
    admin_socket: Path
    metrics_url: str | None
    inventory: Inventory
    sessions: SessionCache
    rotator: Rotator
    api: MetadataApi

    def apply(self, instance_ids: set[str]) -> None:
        """Follow an inventory change that has just taken effect, at once (invariant 9): what
        belonged to instances that left (tree, budget account, session) is dropped; new or
        replaced associations are due for a session now, issued behind this call. Nothing here
        waits: the next guest request already sees the change."""
        gone = [i for i in instance_ids if self.inventory.instance(i) is None]
        self.api.trees.forget(gone)
        self.api.ledger.forget(gone)
        for instance_id in instance_ids:
            self.rotator.reconcile(instance_id)

    async def settled(self, instance_ids: set[str]) -> None:
        """Wait until these instances' sessions are issued or have failed (the admin verbs
        that promise a session on return); the change itself was applied before."""
        await asyncio.gather(*(self.rotator.settle(i) for i in instance_ids))


@asynccontextmanager
async def running(
    config: Config,
    clock: Clock,
    *,
    wrap_backend: Callable[[Backend], Backend] | None = None,
) -> AsyncIterator[Daemon]:
    """Start everything; yield the running daemon; stop everything on exit."""
    async with AsyncExitStack() as stack:
        deadline = config.rotation.startup_deadline.total_seconds()
        # The backend opens after the listeners (opening may wait on the network) but closes
        # after them too, so requests in flight finish with it: its own stack, entered first.
        backend_stack = await stack.enter_async_context(AsyncExitStack())
        metrics, ready = Metrics(), asyncio.Event()
        deferred = Deferred()
        backend = _scoped(Measured(deferred, metrics), config, clock)
        state = StateFile(config.host.state_directory)
        vault = _vault(config)
        taken = vault.load() if vault else None  # a warm restart takes these over
        kept = taken.token_key if taken and config.host.keep_tokens else None
        tokens = TokenIssuer(clock, kept)  # a new key: every guest token minted before dies
        remembered = (taken.subjects, taken.launched) if taken else None
        fleet = None
        if config.inventory.source == "etcd":
            fleet = FleetSource(config.inventory.etcd, config.host.state_directory, clock)
        if fleet and state.path.exists():
            log.warning("state file ignored: this host's inventory comes from etcd",
                        state_file=str(state.path), inventory=fleet.name)  # fmt: skip
        if fleet:  # the baseline is the fleet's last known records; no state-file overrides
            inventory = Inventory(*fleet.mirror.baseline(), clock, None, remembered=remembered,
                                  managed_by=fleet.name)  # fmt: skip
        else:
            inventory = Inventory(config.instances, config.profiles, config.associations, clock,
                                  state, remembered=remembered)  # fmt: skip
        sessions = SessionCache(render.credentials, render.failure, render.read_credentials)
        if taken:
            restore(taken, inventory, sessions, clock)
        metrics.watch(inventory, sessions, clock)
        if fleet:
            metrics.watch_source(fleet.status)
        metrics_url = None
        if config.host.metrics is not None:
            metrics_urls = _serving(make_metrics_app(metrics, ready), (config.host.metrics,))
            metrics_url = (await stack.enter_async_context(metrics_urls))[0]
        rotator = Rotator(backend, inventory, sessions, config.rotation, clock)
        stack.push_async_callback(rotator.aclose)
        if vault:
            await stack.enter_async_context(sealing(vault, inventory, sessions, tokens))
        ledger = Ledger(config.budgets, connection_ceiling())
        signer = open_signer(config.signing, config.host.state_directory)
        api = MetadataApi(inventory=inventory, sessions=sessions, tokens=tokens,
                          clock=clock, metrics=metrics, ledger=ledger,
                          trees=TreeCache(signer.sign),
                          log_requests=config.log.level == "debug")  # fmt: skip
        addresses = [(listener.host, listener.port) for listener in config.imds.listeners]
        guests = serving_guests(GuestServer(api), addresses, backlog=LISTEN_BACKLOG,
                                grace=SHUTDOWN_GRACE_SECONDS)  # fmt: skip
        urls = tuple(_url(a) for a in await stack.enter_async_context(guests))

        info = {
            "version": __version__,
            "started_at": clock.now().isoformat(),
            "listeners": list(urls),
            "backend": config.backend.kind,
            "state_file": str(state.path),
            "admin_socket": str(config.host.admin_socket),
        }
        daemon = Daemon(urls=urls, admin_socket=config.host.admin_socket, metrics_url=metrics_url,
                        inventory=inventory, sessions=sessions, rotator=rotator,
                        api=api)  # fmt: skip
        source = fleet.status if fleet else lambda: {"source": "file"}
        admin = make_admin_app(inventory, sessions, clock, ledger, apply=daemon.apply,
                               settled=daemon.settled, rotate=rotator.refresh, due=rotator.due,
                               info=info, source=source)  # fmt: skip
        await stack.enter_async_context(_unix_site(admin, config.host.admin_socket))
        log.info("listening", listening=list(urls), admin_socket=str(config.host.admin_socket))
        # Invariant 8: the backend opens only now (the sts backend resolves the host's
        # credentials, maybe over the network); a backend that cannot open still exits 1.
        opener_ = opener(config.backend.kind)
        opened = await backend_stack.enter_async_context(opener_(config.backend, clock))
        deferred.open(wrap_backend(opened) if wrap_backend else opened)
        if fleet:  # after the listeners: etcd is a dependency like the upstream (invariant 8)
            await stack.enter_async_context(
                fleet.following(inventory, daemon.apply, deadline=deadline)
            )
        ready.set()  # /readyz: serving (an association without a session gets EC2's failure doc)
        # Invariant 8: nothing above awaited the upstream. Priming now fills the sessions, up
        # to the start-up deadline; what is still waiting then carries on in the background.
        rotator.start()
        await rotator.prime(deadline)
        yield daemon


def _vault(config: Config) -> Vault | None:
    if not config.host.warm_restart:
        return None
    path = config.host.vault_key or config.host.state_directory / VAULT_KEY
    try:
        return Vault(config.host.state_directory, vault_key(path), config.backend)
    except ValueError:
        allowed = "32 random bytes, or their base64 (generated when the file does not exist)"
        raise ConfigError([Problem("state.key_file", str(path), allowed)]) from None


@asynccontextmanager
async def _serving(
    app: web.Application, listeners: Iterable[Listener]
) -> AsyncIterator[tuple[str, ...]]:
    """Serve `app` on TCP listeners; yields their URLs (real ports where 0 was asked). On exit
    it stops accepting and gives requests in flight SHUTDOWN_GRACE_SECONDS to finish."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_GRACE_SECONDS)  # fmt: skip
    await runner.setup()
    try:
        for listener in listeners:
            await web.TCPSite(runner, listener.host, listener.port, reuse_address=True).start()
        yield tuple(_url(address) for address in runner.addresses)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def _unix_site(app: web.Application, path: Path) -> AsyncIterator[None]:
    """Serve `app` on a unix socket, mode 0660 (the service's group may administer)."""
    _claim_socket_path(path)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(path)).start()
        os.chmod(path, ADMIN_SOCKET_MODE)  # a metadata change on a local socket: not blocking I/O
        yield
    finally:
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a killed daemon; refuse one that a live daemon answers on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another imdsd answers on {path}")


async def serve(
    config: Config,
    clock: Clock,
    config_path: Path | None = None,
    adjust: Callable[[Config], Config] = lambda c: c,
) -> None:
    """Run until SIGTERM or SIGINT (in-flight requests get a grace period, then exit 0);
    SIGHUP reloads `config_path` (through `adjust`, the command line's overrides), refusing a
    bad file and keeping the running config. A stop during start-up (etcd's first load, the
    backend opening, priming) ends start-up at once and shuts down the same way."""
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
            await _serving_until(stop, reload, daemon, config, config_path, adjust)
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
    config_path: Path | None,
    adjust: Callable[[Config], Config],
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
                config = await _reload(daemon, config, config_path, adjust)


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


async def _reload(
    daemon: Daemon, current: Config, path: Path | None, adjust: Callable[[Config], Config]
) -> Config:
    """SIGHUP: apply the file's instances, profiles, associations, budgets and [log]; sessions
    that did not change are kept. A file that fails for any reason is refused and logged; the
    running config stays and the daemon keeps serving."""
    if path is None:
        return current
    systemd.reloading()
    try:  # reading and validating the file (user data included) is off the guest loop
        return _apply(daemon, current, adjust(await asyncio.to_thread(load, path)))
    except ConfigError as exc:
        log.error("reload refused: the config is invalid; keeping the running one",
                  problems=[str(p) for p in exc.problems])  # fmt: skip
    except Exception as exc:  # any other failure is a reload refused, never an outage
        log.error("reload failed; keeping the running config",
                  error=exc.__class__.__name__, exc_info=exc)  # fmt: skip
    finally:
        systemd.notify("READY=1")
    return current


def _apply(daemon: Daemon, current: Config, new: Config) -> Config:
    changed: set[str] = set()
    if not daemon.inventory.managed_by:  # an etcd-sourced inventory follows etcd, not the file
        changed = daemon.inventory.reload(new.instances, new.profiles, new.associations)
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


def _scoped(backend: Backend, config: Config, clock: Clock) -> Backend:
    """session_scope = "profile" shares one upstream session among a profile's instances."""
    if config.backend.kind == "sts" and config.backend.sts.session_scope == "profile":
        return ProfileScoped(backend, clock, reuse_for=config.rotation.jitter + REUSE_MARGIN)
    return backend


def _url(address: object) -> str:
    host, port = address[0], address[1]  # type: ignore[index]
    return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


def _curl_hint(url: str) -> str:
    ttl = '-H "X-aws-ec2-metadata-token-ttl-seconds: 21600"'
    header = '-H "X-aws-ec2-metadata-token: $TOKEN"'
    return (
        f"TOKEN=$(curl -sX PUT {url}/latest/api/token {ttl}); "
        f"curl -s {header} {url}/latest/meta-data/iam/security-credentials/"
    )
