"""Instances, instance profiles and associations: who is who on this host.

The config file is the baseline; runtime changes (the admin API) are overrides kept in the
state file and applied on top, so a restart or a reload loses nothing acknowledged. Every
change is validated, persisted, then applied by rebuilding the effective view; values are
immutable and unchanged ones keep their identity, so readers (the request path) never see a
half-made change and caches keyed on identity stay warm. Never imports aiohttp.

Here: the Inventory (reading; commit, reload, rebase, patch; the admin API's change planners).
plan.py plans the effective view in steps; patch.py applies an etcd batch in place.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable, Generator, Iterable
from dataclasses import replace
from datetime import datetime
from typing import Literal

from imdsd import steps
from imdsd.clock import Clock
from imdsd.errors import ConflictError, NotFoundError
from imdsd.inventory.patch import Patch, apply
from imdsd.inventory.plan import STEP, Baseline, Planned, View, effective_view
from imdsd.model import Association, Instance, InstanceProfile, MetadataOptions
from imdsd.state import Overrides, StateFile
from imdsd.whois import Directory

__all__ = ["STEP", "Baseline", "Inventory", "Origin", "Patch"]

Origin = Literal["config", "runtime", "modified", "etcd"]


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
        affected, came_or_went = apply(patch, self._view(), self._clock.now(), self._incarnations,
                                       devices_bound=self.devices_bound)  # fmt: skip
        self.version += 1
        if self.changed is not None:
            self.changed.update(came_or_went)
        return affected

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
        return self._install(steps.at_once(self._plan()))

    async def _rebuilt_in_steps(self) -> set[str]:
        """The same, planned in steps of STEP records, each a turn of the loop: the guests are
        served (by the current view) between them. Installing the plan is one step."""
        return self._install(await steps.between_turns(self._plan()))

    def _plan(self) -> Generator[None, None, Planned]:
        """The effective view the baseline and the overrides make now, changing nothing: a
        generator that yields every STEP records (plan.py)."""
        return effective_view(self._baseline, self._overrides, self._view(), self._clock,
                              self._incarnations, devices_bound=self.devices_bound)  # fmt: skip

    def _view(self) -> View:
        """The view being served (its values, not copies)."""
        return View(self._profiles, self._instances, self._associations, self._whois,
                    self._launched, self._subjects)  # fmt: skip

    def _install(self, view: Planned) -> set[str]:
        """Swap the planned view in (one step); returns the ids whose association changed or
        went, and those that left the inventory (what was kept for them must go too)."""
        self.version += 1
        if self.changed is not None:
            self.changed.update(view.came_or_went)
        self._profiles, self._launched, self._subjects = view.profiles, view.launched, view.subjects
        self._whois = view.whois
        self._instances, self._associations = view.instances, view.associations
        return view.changed
