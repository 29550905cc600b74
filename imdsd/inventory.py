"""Instances, instance profiles and associations: who is who on this host.

The config file is the baseline; runtime changes (the admin API) are overrides kept in the
state file and applied on top, so a restart or a reload loses nothing acknowledged. Every
change is validated, persisted, then applied by rebuilding the effective view; values are
immutable and unchanged ones keep their identity, so readers (the request path) never see a
half-made change and caches keyed on identity stay warm. Never imports aiohttp.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

import structlog

from imdsd.clock import Clock
from imdsd.errors import ConflictError, NotFoundError
from imdsd.model import Association, Instance, InstanceProfile, MetadataOptions
from imdsd.state import Overrides, StateFile
from imdsd.tokens import subject
from imdsd.whois import Directory

Origin = Literal["config", "runtime", "modified", "etcd"]
log = structlog.get_logger("imdsd.inventory")
# Records a stepwise rebuild handles per turn of the loop (~0.5 ms): the longest a guest
# waits on a reload or an etcd batch's planning (invariant 9).
STEP = 250


@dataclass(frozen=True, slots=True)
class Baseline:
    """What the config file says."""

    instances: tuple[Instance, ...]
    profiles: tuple[InstanceProfile, ...]
    associations: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class _View:
    """An effective view, planned and not yet installed."""

    profiles: dict[str, InstanceProfile]
    instances: dict[str, Instance]
    associations: dict[str, Association]
    whois: Directory
    launched: dict[str, datetime]
    subjects: dict[str, bytes]
    changed: set[str]  # the ids whose association changed or went, and those that left


@dataclass(frozen=True, slots=True)
class Patch:
    """What changed in a managed (etcd) baseline, to apply without re-planning the rest: each
    maps a name to its new record, None for gone. `associations` names every instance whose
    association must be looked at again (with the profile its record wants, or None)."""

    instances: dict[str, Instance | None]
    profiles: dict[str, InstanceProfile | None]
    associations: dict[str, str | None]


def _directory(instances: Iterable[Instance]) -> Generator[None, None, Directory]:
    """Who is who for these instances, made in steps of STEP."""
    whois = Directory(())
    for n, instance in enumerate(instances, 1):
        whois.add(instance)
        if n % STEP == 0:
            yield
    return whois


class Inventory:
    """The instances this host serves, the profiles it may attach, and who has which."""

    def __init__(
        self,
        instances: Iterable[Instance],
        profiles: Iterable[InstanceProfile],
        associations: Iterable[tuple[str, str]],
        clock: Clock,
        state: StateFile | None = None,
        *,
        remembered: tuple[dict[str, bytes], dict[str, datetime]] | None = None,
        managed_by: str | None = None,
        devices_bound: bool = False,
    ) -> None:
        self._clock = clock
        # Set when the baseline is another system's (etcd): the admin API then changes nothing.
        self.managed_by = managed_by
        # Whether the guest listeners are bound to devices: an instance naming host_interface
        # can be served only then (config/host.py devices_bound()).
        self.devices_bound = devices_bound
        self._state = state
        self._overrides = state.load() if state else Overrides()
        self._instances: dict[str, Instance] = {}
        self._whois = Directory(())
        # Each time an id (re)appears it is a new incarnation, and IMDSv2 tokens name it. A warm
        # restart takes over the previous process's (`remembered`: subjects, launch times), so
        # guests' tokens and pendingTime survive it.
        self._incarnations = itertools.count(secrets.randbits(48))
        self._subjects: dict[str, bytes] = dict(remembered[0]) if remembered else {}
        self._launched: dict[str, datetime] = dict(remembered[1]) if remembered else {}
        self.version = 0  # counts rebuilds: what the vault keeps may have changed
        # The ids that came or went (a new subject and launch time, or none) since the vault
        # last took them (vault/sealer.py); None while nobody keeps them (no vault).
        self.changed: set[str] | None = None
        self._associations: dict[str, Association] = {}
        self._profiles: dict[str, InstanceProfile] = {}
        self._baseline = Baseline(tuple(instances), tuple(profiles), tuple(associations))
        self._lock = asyncio.Lock()  # admin changes, one at a time (commit)
        self._rebuild()

    # -- reading (the request path uses instance_at and association) --------------------------

    def instance_at(self, address: str, scope: str | None = None) -> Instance | None:
        """The instance that owns a socket peer address in a scope (whois.py)."""
        return self._whois.instance_at(address, scope)

    def scopes(self) -> set[str]:
        """The devices ("dev:NAME") and namespaces ("netns:NAME") instances arrive through."""
        return self._whois.scopes()

    def instance(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def remembered(self) -> tuple[dict[str, bytes], dict[str, datetime]]:
        """Token subjects and launch times, for the warm-restart vault."""
        return dict(self._subjects), dict(self._launched)

    def token_subject(self, instance_id: str) -> bytes:
        """What this incarnation's IMDSv2 tokens are bound to: an id removed and added again
        is a new incarnation, and tokens minted for the old one no longer verify."""
        return self._subjects[instance_id]

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def launched_at(self, instance_id: str) -> datetime:
        """When this host started serving the instance (EC2's pendingTime)."""
        return self._launched[instance_id]

    def profile(self, name: str) -> InstanceProfile | None:
        return self._profiles.get(name)

    def profiles(self) -> list[InstanceProfile]:
        return list(self._profiles.values())

    def association(self, instance_id: str) -> Association | None:
        return self._associations.get(instance_id)

    def associations(self) -> list[Association]:
        return list(self._associations.values())

    def origin(self, instance_id: str) -> Origin:
        """Where the instance's record comes from: the config, the admin API, or both."""
        if self.managed_by:
            return "etcd"
        if instance_id in self._overrides.added:
            return "runtime"
        if instance_id in self._overrides.options:
            return "modified"
        return "config"

    def association_origin(self, instance_id: str) -> Origin:
        if self.managed_by:
            return "etcd"
        return "runtime" if instance_id in self._overrides.associations else "config"

    # -- changing: commit() (the admin API) and reload() (a new baseline) ---------------------

    async def commit(self, change: Callable[[], Overrides]) -> set[str]:
        """Apply one change (e.g. `lambda: inventory.associate(i, p)`) as the admin API must:
        one at a time, planned and validated against the state the previous change left,
        persisted in a worker thread (write, fsync, rename, fsync: never on the loop that
        serves the guests), then applied on the loop. Returns the ids whose association
        changed or went."""
        if self.managed_by:
            raise ConflictError(f"this host's inventory comes from {self.managed_by}: "
                                "change it with `imdsd fleet`")  # fmt: skip
        async with self._lock:
            overrides = change()
            if self._state is not None:  # persisted before it takes effect or is acknowledged
                await asyncio.to_thread(self._state.save, overrides)
            self._overrides = overrides
            return self._rebuild()

    def reload(self, instances: Iterable[Instance], profiles: Iterable[InstanceProfile],
               associations: Iterable[tuple[str, str]]) -> set[str]:  # fmt: skip
        """A new config baseline (SIGHUP); the recorded overrides still apply on top."""
        self._baseline = Baseline(tuple(instances), tuple(profiles), tuple(associations))
        return self._rebuild()

    async def rebase(self, instances: Iterable[Instance], profiles: Iterable[InstanceProfile],
                     associations: Iterable[tuple[str, str]]) -> set[str]:  # fmt: skip
        """reload() as the running daemon does it (a SIGHUP, an etcd batch): the new view is
        planned in bounded steps while the current one serves (nothing on the loop that
        serves the guests runs long, invariant 9), then installed in one step. Admin commits
        wait for it (the lock), so a reload racing a commit never loses either."""
        async with self._lock:
            self._baseline = Baseline(tuple(instances), tuple(profiles), tuple(associations))
            return await self._rebuilt_in_steps()

    def patch(self, patch: Patch) -> set[str]:
        """An etcd batch as a change, applied at once and at its own size (a managed inventory
        has no overrides: its effective view is its baseline, which is not rebuilt; the next
        full rebase() brings a new one). Returns the ids whose association changed or went,
        and those that left, as rebase() does."""
        assert self.managed_by and not self._lock.locked()  # noqa: S101 -- the follower's path
        now, changed, came_or_went = self._clock.now(), set(), set()
        for name, profile in patch.profiles.items():
            if profile is None:
                self._profiles.pop(name, None)
            else:
                self._profiles[name] = profile
        for iid, instance in patch.instances.items():
            old = self._instances.pop(iid, None)
            if old is not None:
                self._whois.discard(old)
            if instance is not None and instance.host_interface and not self.devices_bound:
                log.warning("instance names host_interface on a host without device-bound"
                            " listeners; skipped", instance=iid)  # fmt: skip
                instance = None
            if instance is None:
                if old is not None:  # gone: a later record is a new incarnation
                    came_or_went.add(iid)
                    self._launched.pop(iid, None)
                    self._subjects.pop(iid, None)
                continue
            self._instances[iid] = instance = self._same(old, instance)
            self._whois.add(instance)
            if old is None:
                came_or_went.add(iid)
                self._launched.setdefault(iid, now)
                if iid not in self._subjects:
                    self._subjects[iid] = subject(iid, next(self._incarnations))
        for iid in patch.associations.keys() | came_or_went:
            wanted = patch.associations.get(iid)
            profile = self._profiles.get(wanted) if wanted else None
            old_association = self._associations.get(iid)
            if iid not in self._instances or profile is None:
                if wanted and iid in self._instances:
                    log.warning(
                        "association to an unknown profile skipped", instance=iid, profile=wanted
                    )
                if self._associations.pop(iid, None) is not None:
                    changed.add(iid)
            elif old_association is None or old_association.profile != profile:
                self._associations[iid] = Association(instance_id=iid, profile=profile,
                                                      associated_at=now)  # fmt: skip
                changed.add(iid)
        self.version += 1
        if self.changed is not None:
            self.changed.update(came_or_went)
        return changed | {iid for iid in came_or_went if iid not in self._instances}

    # Each change below only plans: it validates against the effective view and returns the
    # overrides that would make it, changing nothing until commit() persists and applies them.

    def add_instance(self, instance: Instance) -> Overrides:
        """Register an instance; its id and every address must be new."""
        if instance.id in self._instances:
            raise ConflictError(f"instance {instance.id} already exists")
        if instance.host_interface is not None and not self.devices_bound:
            raise ConflictError(f"instance {instance.id} names host_interface, but this host's"
                                " guest listeners are not bound to devices: set [imds]"
                                " bind_to_devices (and guest_devices)")  # fmt: skip
        taken = self._whois.owner(instance)
        if taken is not None:
            where = f" on {instance.scope}" if instance.scope else ""
            raise ConflictError(f"address {taken[0]}{where} already belongs to {taken[1].id}")
        changed = self._changed()
        # A config instance removed earlier stays removed: the added record replaces it (the
        # libvirt hook removes and re-adds on every stop and start, maybe with a new address).
        changed.added[instance.id] = instance
        return changed

    def remove_instance(self, instance_id: str) -> Overrides:
        """Forget an instance (and its association)."""
        self._require_instance(instance_id)
        changed = self._changed()
        if changed.added.pop(instance_id, None) is None:
            changed.removed.add(instance_id)
        changed.options.pop(instance_id, None)
        changed.associations.pop(instance_id, None)
        return changed

    def set_options(self, instance_id: str, options: MetadataOptions) -> Overrides:
        """EC2's ModifyInstanceMetadataOptions; takes effect on the next request."""
        self._require_instance(instance_id)
        changed = self._changed()
        if instance_id in changed.added:
            changed.added[instance_id] = replace(changed.added[instance_id], options=options)
        else:
            changed.options[instance_id] = options
        return changed

    def associate(self, instance_id: str, profile_name: str) -> Overrides:
        """EC2's AssociateIamInstanceProfile: the instance must have no association yet."""
        if instance_id in self._associations:
            current = self._associations[instance_id].profile.name
            raise ConflictError(f"instance {instance_id} already has an association ({current})")
        return self._set_association(instance_id, profile_name)

    def replace_association(self, instance_id: str, profile_name: str) -> Overrides:
        """EC2's ReplaceIamInstanceProfileAssociation: swap an associated instance's profile."""
        if instance_id not in self._associations:
            raise ConflictError(f"instance {instance_id} has no association to replace")
        return self._set_association(instance_id, profile_name)

    def disassociate(self, instance_id: str) -> Overrides:
        """EC2's DisassociateIamInstanceProfile."""
        if instance_id not in self._associations:
            raise ConflictError(f"instance {instance_id} has no association")
        changed = self._changed()
        changed.associations[instance_id] = None
        return changed

    # -- internals ----------------------------------------------------------------------------

    def _set_association(self, instance_id: str, profile_name: str) -> Overrides:
        self._require_instance(instance_id)
        if profile_name not in self._profiles:
            raise NotFoundError(f"instance profile {profile_name!r} does not exist")
        changed = self._changed()
        changed.associations[instance_id] = profile_name
        return changed

    def _require_instance(self, instance_id: str) -> Instance:
        instance = self._instances.get(instance_id)
        if instance is None:
            raise NotFoundError(f"instance {instance_id} does not exist")
        return instance

    def _changed(self) -> Overrides:
        o = self._overrides
        return Overrides(dict(o.added), set(o.removed), dict(o.options), dict(o.associations))

    def _rebuild(self) -> set[str]:
        """Recompute the effective view and install it at once (an admin commit, a start)."""
        plan = self._plan()
        while True:
            try:
                next(plan)
            except StopIteration as done:
                return self._install(done.value)

    async def _rebuilt_in_steps(self) -> set[str]:
        """The same, planned in steps of STEP records, each a turn of the loop: the guests are
        served (by the current view) between them. Installing the plan is one step."""
        plan = self._plan()
        while True:
            try:
                next(plan)
            except StopIteration as done:
                return self._install(done.value)
            await asyncio.sleep(0)

    def _plan(self) -> Generator[None, None, _View]:
        """The effective view the baseline and the overrides make now, changing nothing: a
        generator that yields every STEP records (unchanged values keep their identity)."""
        profiles = {p.name: p for p in self._baseline.profiles}
        instances = yield from self._effective_instances()
        now = self._clock.now()
        launched: dict[str, datetime] = {}
        subjects: dict[str, bytes] = {}
        for n, iid in enumerate(instances, 1):
            launched[iid] = self._launched.get(iid, now)
            subjects[iid] = self._subjects.get(iid) or subject(iid, next(self._incarnations))
            if n % STEP == 0:
                yield
        associations = yield from self._effective_associations(instances, profiles, now)
        changed = yield from self._changed_ids(instances, associations)
        whois = yield from _directory(instances.values())
        return _View(profiles, instances, associations, whois, launched, subjects, changed)

    def _changed_ids(
        self, instances: dict[str, Instance], associations: dict[str, Association]
    ) -> Generator[None, None, set[str]]:
        """The ids whose association changed or went, and those that left the inventory."""
        changed: set[str] = set()
        ids = itertools.chain(self._associations, self._instances, associations)
        for n, iid in enumerate(ids, 1):
            if self._associations.get(iid) is not associations.get(iid) or iid not in instances:
                changed.add(iid)
            if n % STEP == 0:
                yield
        return changed

    def _install(self, view: _View) -> set[str]:
        """Swap the planned view in (one step); returns the ids whose association changed or
        went, and those that left the inventory (what was kept for them must go too)."""
        self.version += 1
        if self.changed is not None:
            self.changed.update(view.instances.keys() ^ self._instances.keys())
        self._profiles, self._launched, self._subjects = view.profiles, view.launched, view.subjects
        self._whois = view.whois
        self._instances, self._associations = view.instances, view.associations
        return view.changed

    def _effective_instances(self) -> Generator[None, None, dict[str, Instance]]:
        o = self._overrides
        out: dict[str, Instance] = {}
        for n, instance in enumerate(self._baseline.instances, 1):
            if n % STEP == 0:
                yield
            if instance.id in o.removed:
                continue
            if instance.host_interface and not self.devices_bound:
                # an etcd record on a host whose listeners are device-less
                log.warning("instance names host_interface on a host without device-bound"
                            " listeners; skipped", instance=instance.id)  # fmt: skip
                continue
            out[instance.id] = instance
        yield
        if o.added:  # a runtime instance never takes an address from the config's
            whois = yield from _directory(out.values())
            for iid, added in o.added.items():
                if iid in out or whois.owner(added) is not None:
                    log.warning("runtime instance conflicts with the config; skipped", instance=iid)
                    continue
                out[iid] = added
                whois.add(added)
        for iid, options in o.options.items():
            if iid in out:
                out[iid] = replace(out[iid], options=options)
        same: dict[str, Instance] = {}
        for n, (iid, instance) in enumerate(out.items(), 1):
            same[iid] = self._same(self._instances.get(iid), instance)
            if n % STEP == 0:
                yield
        return same

    def _effective_associations(
        self, instances: dict[str, Instance], profiles: dict[str, InstanceProfile], now: datetime
    ) -> Generator[None, None, dict[str, Association]]:
        wanted: dict[str, str | None] = dict(self._baseline.associations)
        wanted.update(self._overrides.associations)
        out: dict[str, Association] = {}
        for n, (iid, name) in enumerate(wanted.items(), 1):
            if n % STEP == 0:
                yield
            profile = profiles.get(name) if name else None
            if iid not in instances or profile is None:
                if name and iid in instances:
                    log.warning(
                        "association to an unknown profile skipped", instance=iid, profile=name
                    )
                continue
            old = self._associations.get(iid)
            keep = old is not None and old.profile == profile
            out[iid] = (
                old
                if keep and old
                else Association(instance_id=iid, profile=profile, associated_at=now)
            )
        return out

    @staticmethod
    def _same(old: Instance | None, new: Instance) -> Instance:
        return old if old is not None and old == new else new
