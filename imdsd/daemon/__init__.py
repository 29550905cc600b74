"""The composition root: the only place where imdsd's objects are created and wired.

`running()` reads as its phases, top to bottom: the state (what this host knows: inventory,
sessions, tokens, taken over from the vault), the guest edge (listeners answer from the first
second, invariant 8), the control plane (the admin socket, metrics), then the backend (which
may wait on the network) and the fleet's etcd, and last priming up to the start-up deadline.
On exit everything closes in reverse order. serve.py runs it as a process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import structlog

from imdsd import __version__, heap, systemd
from imdsd.admin.app import make_admin_app
from imdsd.backends import Opener, has_upstream, opener
from imdsd.backends.base import Backend, SignsWithCertificate
from imdsd.backends.deferred import Deferred
from imdsd.backends.measured import Measured
from imdsd.backends.shared import ProfileScoped
from imdsd.budgets import Ledger, connection_ceiling
from imdsd.clock import Clock
from imdsd.config import Config
from imdsd.config.host import devices_bound
from imdsd.daemon.sites import SHUTDOWN_GRACE_SECONDS, serving, unix_site, url
from imdsd.errors import ConfigError, Problem
from imdsd.fleet.source import FleetSource
from imdsd.imds import render
from imdsd.imds.app import MetadataApi
from imdsd.imds.listener import serving_guests
from imdsd.imds.scoped import ScopedListeners, wanted_scopes
from imdsd.imds.server import GuestServer
from imdsd.imds.tree import TreeCache
from imdsd.inventory import Inventory
from imdsd.metrics import Metrics, make_metrics_app
from imdsd.ratelimit import RateLimit
from imdsd.scheduler import Rotator
from imdsd.sessions import SessionCache
from imdsd.signatures import open_signer
from imdsd.signatures.cache import SignatureCache
from imdsd.state import StateFile
from imdsd.tokens import TokenIssuer
from imdsd.vault import KEY_NAME as VAULT_KEY
from imdsd.vault import Vault, restore, sealing, vault_key

log = structlog.get_logger("imdsd")
# A burst of connections from one guest must not fill the accept queue for the others (the
# kernel drops SYNs past it: a one-second retransmit for whoever comes next). Over-cap
# connections are refused as fast as they arrive, so a deep queue drains; Linux caps it at
# net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 4096
REUSE_MARGIN = timedelta(minutes=1)
__all__ = ["SHUTDOWN_GRACE_SECONDS", "Daemon", "running"]


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
    listeners: ScopedListeners

    def apply(self, instance_ids: set[str]) -> None:
        """Follow an inventory change that has just taken effect, at once (invariant 9): what
        belonged to instances that left (tree, budget account) is dropped; new or replaced
        associations are due for a session now, issued behind this call (a large batch's
        sessions are reconciled in steps behind it: Rotator.reconcile_all). Nothing here
        waits: the next guest request already sees the change."""
        gone = [i for i in instance_ids if self.inventory.instance(i) is None]
        self.api.trees.forget(gone)
        # Signed off the loop, before asked; handed to the notary behind this call, in steps
        # (reading 1,000 instances' records for it took ~1 ms of this turn).
        self.api.trees.prepare_soon(self.inventory, instance_ids)
        self.api.ledger.forget(gone)
        self.rotator.reconcile_all(instance_ids)
        self.listeners.changed()  # a device or namespace may have come or gone

    async def settled(self, instance_ids: set[str]) -> None:
        """Wait until these instances' sessions are issued or have failed (the admin verbs
        that promise a session on return); the change itself was applied before."""
        await asyncio.gather(*(self.rotator.settle(i) for i in instance_ids))


@dataclass(slots=True)
class State:
    """What this host knows before it serves anyone: phase one."""

    inventory: Inventory
    sessions: SessionCache
    tokens: TokenIssuer
    state_file: StateFile
    vault: Vault | None
    fleet: FleetSource | None


@asynccontextmanager
async def running(
    config: Config, clock: Clock, *, open_backend: Opener | None = None
) -> AsyncIterator[Daemon]:
    """Start everything; yield the running daemon; stop everything on exit. `open_backend`
    opens the issuer (default: the configured kind's)."""
    async with AsyncExitStack() as stack:
        # The backend opens after the listeners (opening may wait on the network) but closes
        # after them too, so requests in flight finish with it: its own stack, entered first.
        backend_stack = await stack.enter_async_context(AsyncExitStack())
        # Start-up builds what lives until a reload: no cyclic collection meanwhile (each
        # would walk it all, stopping the guests), then frozen (daemon/heap.py).
        resume_collections = heap.paused()
        stack.callback(resume_collections)  # start-up failed or was cancelled
        metrics, ready, deferred = Metrics(), asyncio.Event(), Deferred()
        known = _state(config, clock, metrics)
        rotator = Rotator(_scoped(Measured(deferred, metrics), config, clock), known.inventory,
                          known.sessions, config.rotation, clock,
                          rate=_rate_cap(config))  # fmt: skip
        stack.push_async_callback(rotator.aclose)
        if known.vault:
            sealed = sealing(known.vault, known.inventory, known.sessions, known.tokens)
            await stack.enter_async_context(sealed)
        api = _guest_api(config, clock, known, metrics)
        stack.enter_context(api.trees.signing(known.inventory))  # identity documents, off the loop
        open_backend = open_backend or opener(config.backend.kind)  # its import: not after
        urls, scoped = await _guest_edge(stack, config, api, known.inventory)
        await asyncio.sleep(0)  # from here on, guests are answered between each phase's steps
        metrics.watch_listeners(scoped.status, lambda: scoped.rebinds)
        stack.enter_context(metrics.watch_loop())  # the guest loop's lag, by a probe on it
        metrics_url = None
        if config.host.metrics is not None:
            sites = serving(make_metrics_app(metrics, ready), (config.host.metrics,))
            metrics_url = (await stack.enter_async_context(sites))[0]
        daemon = Daemon(urls=urls, admin_socket=config.host.admin_socket, metrics_url=metrics_url,
                        inventory=known.inventory, sessions=known.sessions, rotator=rotator,
                        api=api, listeners=scoped)  # fmt: skip
        await stack.enter_async_context(_control(config, clock, daemon, known))
        await asyncio.sleep(0)
        log.info("listening", listening=list(urls), admin_socket=str(config.host.admin_socket))
        # Invariant 8: the backend opens only now (the sts backend resolves the host's
        # credentials, maybe over the network); a backend that cannot open still exits 1.
        backend = await backend_stack.enter_async_context(open_backend(config.backend, clock))
        deferred.open(backend)
        if isinstance(backend, SignsWithCertificate):  # imdsd_host_certificate_expiry_seconds
            metrics.watch_certificate(backend.certificate_expiry, clock)
        deadline = config.rotation.startup_deadline.total_seconds()
        if known.fleet:  # after the listeners: etcd is a dependency like the upstream
            following = known.fleet.following(known.inventory, daemon.apply, deadline=deadline)
            await stack.enter_async_context(following)
        ready.set()  # /readyz: serving (an association without a session gets EC2's failure doc)
        # Invariant 8: nothing above awaited the upstream. Priming now fills the sessions, up
        # to the start-up deadline; what is still waiting then carries on in the background.
        rotator.start()
        await rotator.prime(deadline)
        api.trees.resume_signing()  # a cold start's documents, now that priming is done
        resume_collections()
        yield daemon


def _state(config: Config, clock: Clock, metrics: Metrics) -> State:
    """Phase one: the inventory (the config and state file, or the fleet's cached records),
    sessions, the token key and incarnations, taken over from the vault on a warm restart."""
    state_file = StateFile(config.host.state_directory)
    vault = _vault(config)
    taken = vault.load() if vault else None
    kept = taken.token_key if taken and config.host.keep_tokens else None
    tokens = TokenIssuer(clock, kept)  # a new key: every guest token minted before dies
    remembered = (taken.subjects, taken.launched) if taken else None
    fleet = None
    if config.inventory.source == "etcd":
        fleet = FleetSource(config.inventory.etcd, config.host.state_directory, clock)
        if state_file.path.exists():
            log.warning("state file ignored: this host's inventory comes from etcd",
                        state_file=str(state_file.path), inventory=fleet.name)  # fmt: skip
        # the baseline is the fleet's last known records; no state-file overrides
        inventory = Inventory(*fleet.mirror.baseline(), clock, None, remembered=remembered,
                              managed_by=fleet.name,
                              devices_bound=devices_bound(config.imds, ()))  # fmt: skip
        metrics.watch_source(fleet.status)
    else:
        bound = devices_bound(config.imds, config.instances)
        inventory = Inventory(config.instances, config.profiles, config.associations, clock,
                              state_file, remembered=remembered, devices_bound=bound)  # fmt: skip
    sessions = SessionCache(render.credentials, render.failure, render.read_credentials)
    if taken:
        restore(taken, inventory, sessions, clock)
    metrics.watch(inventory, sessions, clock)
    return State(inventory=inventory, sessions=sessions, tokens=tokens, state_file=state_file,
                 vault=vault, fleet=fleet)  # fmt: skip


async def _guest_edge(
    stack: AsyncExitStack, config: Config, api: MetadataApi, inventory: Inventory
) -> tuple[tuple[str, ...], ScopedListeners]:
    """Phase two, opened: the guest listeners. Device-less on [imds] listeners, or, where they
    are bound to devices, once per device; and once inside each named namespace."""
    server = GuestServer(api)
    addresses = [(x.host, x.port) for x in config.imds.listeners]
    bound = inventory.devices_bound
    guests = serving_guests(server, [] if bound else addresses, backlog=LISTEN_BACKLOG,
                            grace=SHUTDOWN_GRACE_SECONDS)  # fmt: skip
    opened = await stack.enter_async_context(guests)
    devices = config.imds.guest_devices
    scoped = ScopedListeners(server, addresses,
                             lambda: wanted_scopes(inventory.scopes(), devices, bound),
                             backlog=LISTEN_BACKLOG, devices=bound,
                             passed=systemd.listen_fds())  # fmt: skip
    await scoped.start()
    stack.push_async_callback(scoped.close)  # closed before the server's shutdown above
    return tuple(url(a) for a in (addresses if bound else opened)), scoped


def _guest_api(config: Config, clock: Clock, known: State, metrics: Metrics) -> MetadataApi:
    """Phase two: the pipeline every guest request goes through (opened by the caller)."""
    signer = open_signer(config.signing, config.host.state_directory)
    return MetadataApi(inventory=known.inventory, sessions=known.sessions, tokens=known.tokens,
                       clock=clock, metrics=metrics,
                       ledger=Ledger(config.budgets, connection_ceiling()),
                       trees=TreeCache(SignatureCache(signer, config.host.state_directory)),
                       log_requests=config.log.level == "debug")  # fmt: skip


def _control(
    config: Config, clock: Clock, daemon: Daemon, known: State
) -> AbstractAsyncContextManager[None]:
    """Phase three: the admin API on its unix socket."""
    info = {
        "version": __version__,
        "started_at": clock.now().isoformat(),
        "listeners": list(daemon.urls),
        "backend": config.backend.kind,
        "state_file": str(known.state_file.path),
        "admin_socket": str(config.host.admin_socket),
    }
    source = known.fleet.status if known.fleet else lambda: {"source": "file"}
    rotator = daemon.rotator
    admin = make_admin_app(daemon.inventory, daemon.sessions, clock, daemon.api.ledger,
                           apply=daemon.apply, settled=daemon.settled, rotate=rotator.refresh,
                           due=rotator.due, info=info, source=source,
                           listening=daemon.listeners.status)  # fmt: skip
    return unix_site(admin, config.host.admin_socket)


def _vault(config: Config) -> Vault | None:
    if not config.host.warm_restart:
        return None
    path = config.host.vault_key or config.host.state_directory / VAULT_KEY
    try:
        return Vault(config.host.state_directory, vault_key(path), config.backend)
    except ValueError:
        allowed = "32 random bytes, or their base64 (generated when the file does not exist)"
        raise ConfigError([Problem("state.key_file", str(path), allowed)]) from None


def _rate_cap(config: Config) -> RateLimit | None:
    """rotation.max_rate guards an upstream's quota; the embedded issuer has none to guard."""
    return RateLimit(config.rotation.max_rate) if has_upstream(config.backend.kind) else None


def _scoped(backend: Backend, config: Config, clock: Clock) -> Backend:
    """session_scope = "profile" shares one upstream session among a profile's instances."""
    if config.backend.kind == "sts" and config.backend.sts.session_scope == "profile":
        return ProfileScoped(backend, clock, reuse_for=config.rotation.jitter + REUSE_MARGIN)
    return backend
