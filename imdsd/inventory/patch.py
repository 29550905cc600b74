"""An etcd batch as a change of its own records: the Patch, and how it edits the served view.

A managed (etcd) inventory has no overrides: its effective view is its baseline, so a batch
is applied at its own size, in place, instead of re-planning every record (plan.py); the
next full rebase brings a new view. Never imports aiohttp.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import structlog

from imdsd.inventory.plan import View, same
from imdsd.model import Association, Instance
from imdsd.tokens import subject

log = structlog.get_logger("imdsd.inventory")


@dataclass(frozen=True, slots=True)
class Patch:
    """What changed in a managed (etcd) baseline, to apply without re-planning the rest:
    instances by id, None for gone; `associations` names every instance whose association
    must be looked at again (with the profile its record wants, or None). A changed profile
    is no patch: every association may change with it, so the view is rebuilt in steps.
    Instances a patch replaces move to the end of the served order (a rebuild orders them by
    their records' creation): listings may show them in another order, nothing else."""

    instances: dict[str, Instance | None]
    associations: dict[str, str | None]


def apply(
    patch: Patch, served: View, now: datetime, incarnations: Iterator[int], *, devices_bound: bool
) -> tuple[set[str], set[str]]:
    """Edit the served view in place. Returns the ids whose association changed or went, and
    those that left (as a rebase reports them); then the ids that came or went."""
    came_or_went = _instances(patch, served, now, incarnations, devices_bound=devices_bound)
    changed = _associations(patch, served, came_or_went, now)
    return changed | {iid for iid in came_or_went if iid not in served.instances}, came_or_went


def _instances(
    patch: Patch, served: View, now: datetime, incarnations: Iterator[int], *, devices_bound: bool
) -> set[str]:
    """Swap the patched instances in; returns the ids that came or went."""
    came_or_went: set[str] = set()
    for iid, instance in patch.instances.items():
        old = served.instances.pop(iid, None)
        if old is not None:
            served.whois.discard(old)
        if instance is not None and instance.host_interface and not devices_bound:
            log.warning("instance names host_interface on a host without device-bound"
                        " listeners; skipped", instance=iid)  # fmt: skip
            instance = None
        if instance is None:
            if old is not None:  # gone: a later record is a new incarnation
                came_or_went.add(iid)
                served.launched.pop(iid, None)
                served.subjects.pop(iid, None)
            continue
        served.instances[iid] = instance = same(old, instance)
        served.whois.add(instance)
        if old is None:
            came_or_went.add(iid)
            served.launched.setdefault(iid, now)
            if iid not in served.subjects:
                served.subjects[iid] = subject(iid, next(incarnations))
    return came_or_went


def _associations(patch: Patch, served: View, came_or_went: set[str], now: datetime) -> set[str]:
    """Look again at the associations the patch names and those of the ids that came or
    went; returns the ids whose association changed or went."""
    changed: set[str] = set()
    for iid in patch.associations.keys() | came_or_went:
        wanted = patch.associations.get(iid)
        profile = served.profiles.get(wanted) if wanted else None
        old_association = served.associations.get(iid)
        if iid not in served.instances or profile is None:
            if wanted and iid in served.instances:
                log.warning(
                    "association to an unknown profile skipped", instance=iid, profile=wanted
                )
            if served.associations.pop(iid, None) is not None:
                changed.add(iid)
        elif old_association is None or old_association.profile != profile:
            served.associations[iid] = Association(instance_id=iid, profile=profile,
                                                   associated_at=now)  # fmt: skip
            changed.add(iid)
    return changed
