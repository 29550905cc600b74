"""The fleet's records in etcd: the key layout (a contract others write to) and one mirror.

    {prefix}/profiles/{name}                  an [[instance_profiles]] table, as JSON
    {prefix}/hosts/{host}/instances/{id}      an [[instances]] table, as JSON
    {prefix}/hosts/{host}/associations/{id}   {"profile": "<name>"}

Values get exactly the config file's validation. A bad record is skipped with one warning
naming its key and never takes another record down. Pure: no I/O, no etcd client.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import structlog

from imdsd import steps
from imdsd.config import instances as tables
from imdsd.config import profiles as profile_tables
from imdsd.config.reader import Reader, Section
from imdsd.errors import RecordError
from imdsd.inventory import Patch
from imdsd.model import IAM_NAME, INSTANCE_ID, Instance, InstanceProfile
from imdsd.whois import Directory

log = structlog.get_logger("imdsd.etcd")
PROFILE_KEYS = ("name", "path", "id", "role_arn", "external_id")
Kind = Literal["profile", "instance", "association"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Layout:
    """Where one host's records are, under one fleet prefix."""

    prefix: str
    host: str

    @property
    def profiles(self) -> str:
        return f"{self.prefix}/profiles/"

    def hosts(self) -> str:
        return f"{self.prefix}/hosts/"

    def mine(self, host: str | None = None) -> str:
        return f"{self.prefix}/hosts/{host or self.host}/"

    def profile(self, name: str) -> str:
        return f"{self.profiles}{name}"

    def instance(self, iid: str, host: str | None = None) -> str:
        return f"{self.mine(host)}instances/{iid}"

    def association(self, iid: str, host: str | None = None) -> str:
        return f"{self.mine(host)}associations/{iid}"

    def kind(self, key: str) -> tuple[Kind, str] | None:
        """What a key of this host (or a profile) names; None for keys outside the layout."""
        if key.startswith(self.profiles):
            name = key.removeprefix(self.profiles)
            return ("profile", name) if IAM_NAME.fullmatch(name) else None
        rest = key.removeprefix(self.mine()) if key.startswith(self.mine()) else None
        table, _, iid = (rest or "").partition("/")
        if table in ("instances", "associations") and INSTANCE_ID.fullmatch(iid):
            return ("instance" if table == "instances" else "association"), iid
        return None


Record = InstanceProfile | Instance | str  # a profile, an instance, an association's profile
Baseline = tuple[list[Instance], list[InstanceProfile], list[tuple[str, str]]]
# Records a batch may touch to be a patch (one step on the loop, ~3 ms per 1,000): a bigger
# one is a whole baseline, made in steps.
PATCH_MOST = 2_000
PATCH_STEP = 100  # records a patch is made of per turn of the loop
STEP = 250  # records per turn of the daemon's loop when it makes the baseline (~0.5 ms)


def parse(layout: Layout, key: str, value: bytes) -> Record:
    """One record from its key and value, validated like the config file's table."""
    kind = layout.kind(key)
    if kind is None:
        raise RecordError(f"{key}: not a key of the layout")
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise RecordError(f"{key}: not a JSON object") from None
    if not isinstance(data, dict):
        raise RecordError(f"{key}: not a JSON object")
    what, name = kind
    reader = Reader()
    section = Section(reader, data, key)
    record: Record | None = None
    if what == "profile":
        section.reject_unknown(PROFILE_KEYS)
        record = _named(section, "name", name, lambda: _profile(section))
    elif what == "instance":  # instance_in refuses user_data_file: no record names a host file
        record = _named(section, "id", name, lambda: tables.instance_in(section))
    else:
        section.reject_unknown(("profile",))
        record = section.require("profile", str, "the name of an instance profile")
    if reader.problems or record is None:
        raise RecordError(*(str(p) for p in reader.problems))
    return record


def _named(section: Section, field: str, name: str, build: Any) -> Any:
    """The record's own name field must agree with its key (and may be left out)."""
    given = section.data.setdefault(field, name)
    if given != name:
        section.problem(field, json.dumps(given), f"{name!r}, the name in the key")
        return None
    return build()


def _profile(section: Section) -> InstanceProfile | None:
    found = profile_tables.profiles([section])  # problems go to the section's reader
    return found[0] if found else None


class Mirror:
    """This host's records as last seen (etcd's or the cache's), and the inventory they make."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.revision = 0
        self.raw: dict[str, tuple[int, bytes]] = {}  # key -> (create revision, value)
        # by create revision (oldest first, the order claims are settled in), kept in order as
        # records come rather than sorted per batch; re-sorted only when one came out of order
        self._parsed: dict[str, Record] = {}
        self._newest, self._unsorted = 0, False
        self._claimed_twice: set[tuple[str, str]] = set()
        self._unknown_profiles: set[tuple[str, str]] = set()
        # What the last baseline made, kept up to date by patch(): a batch costs its records.
        self._touched: set[str] | None = None  # keys since; None: only a baseline can tell
        self._winners: dict[str, Instance] = {}  # the instances served (their claims won)
        self._owners = Directory(())
        self._wanted: dict[str, str] = {}  # instance id -> the profile its record names

    def put(self, key: str, value: bytes, created: int) -> None:
        """A record written (or read at load); a bad one is dropped with one warning. Only
        this record is parsed: a batch costs what it changes."""
        old = self.raw.get(key)
        if old == (created, value):
            return
        self.raw[key] = (created, value)
        if self._touched is not None:
            self._touched.add(key)
        if old is None or old[0] != created:  # a new key: its place is by its create revision
            self._parsed.pop(key, None)
        try:
            record = parse(self.layout, key, value)
        except RecordError as exc:
            self._parsed.pop(key, None)
            log.warning("fleet record skipped", record=key, problem=str(exc))
            return
        if key not in self._parsed:
            self._unsorted |= created < self._newest  # etcd's new keys come in order
            self._newest = max(self._newest, created)
        self._parsed[key] = record  # an existing key keeps its place

    def delete(self, key: str) -> None:
        self.raw.pop(key, None)
        self._parsed.pop(key, None)
        if self._touched is not None:
            self._touched.add(key)

    def reset(self, records: dict[str, tuple[int, bytes]], revision: int) -> None:
        """A full load: every key not in `records` is gone."""
        self._touched = None
        for key in set(self.raw) - set(records):
            self.delete(key)
        for key, (created, value) in records.items():
            self.put(key, value, created)
        self.revision = revision

    def baseline(self) -> Baseline:
        """Instances, profiles and associations, as the config file's tables would give them.
        When two instances claim one address in one scope (whois.py), the older record (by
        etcd's create revision) keeps it and the other waits, skipped: a reused address never
        serves two instances."""
        return steps.at_once(self.baseline_in_steps())

    def baseline_in_steps(self) -> Generator[None, None, Baseline]:
        """baseline() as a generator that yields every STEP records (the daemon runs a turn of
        its loop between them)."""
        if self._unsorted:
            self._parsed = dict(sorted(self._parsed.items(), key=lambda kv: self.raw[kv[0]][0]))
            self._unsorted = False
            yield
        profiles: list[InstanceProfile] = []
        instances: dict[str, Instance] = {}
        owners = Directory(())  # a scope's address (or whole device) -> its first claimant
        wanted: list[tuple[str, str]] = []
        claimed_twice: set[tuple[str, str]] = set()
        for n, (key, record) in enumerate(list(self._parsed.items()), 1):
            if n % STEP == 0:
                yield
            if isinstance(record, InstanceProfile):
                profiles.append(record)
            elif isinstance(record, Instance):
                taken = owners.owner(record)
                if taken:
                    claimed_twice.add((record.id, taken[1].id))
                    continue
                owners.add(record)
                instances[record.id] = record
            else:
                wanted.append(((self.layout.kind(key) or ("", ""))[1], record))
        for iid, owner in claimed_twice - self._claimed_twice:  # once per conflict
            log.warning("fleet instance skipped: an address is another instance's",
                        instance=iid, owner=owner)  # fmt: skip
        self._claimed_twice = claimed_twice
        known = {p.name for p in profiles}
        associations = [(i, p) for i, p in wanted if i in instances and p in known]
        unknown = {(i, p) for i, p in wanted if p not in known}
        for iid, name in unknown - self._unknown_profiles:  # once, until it resolves
            log.warning(
                "fleet association to an unknown profile skipped", instance=iid, profile=name
            )
        self._unknown_profiles = unknown
        self._touched, self._winners, self._owners = set(), instances, owners
        self._wanted = dict(wanted)
        return list(instances.values()), profiles, associations

    def patch(self) -> Patch | None:
        """The records changed since the last baseline or patch, as an inventory Patch; None
        when only a whole baseline can tell (and until one is made): after a full load, or
        where an address is claimed twice (who keeps it is settled among all claimants,
        oldest first)."""
        return steps.at_once(self.patch_in_steps())

    def patch_in_steps(self) -> Generator[None, None, Patch | None]:
        """patch(), yielding every PATCH_STEP records (1,000 took ~4 ms in one turn); nothing
        else may change the mirror meanwhile (the follower awaits it)."""
        touched, self._touched = self._touched, None  # set again when the patch is whole
        if touched is None or len(touched) > PATCH_MOST:
            return None
        instances: dict[str, Instance | None] = {}
        associations: dict[str, str | None] = {}
        for n, key in enumerate(touched, 1):
            if n % PATCH_STEP == 0:
                yield
            kind = self.layout.kind(key)
            record = self._parsed.get(key)
            if kind is None:
                continue
            what, name = kind
            if what == "profile":
                return None  # every association may change with it: a whole baseline
            if what == "association":
                wanted = record if isinstance(record, str) else None
                associations[name] = self._set(self._wanted, name, wanted)
            else:
                instance = record if isinstance(record, Instance) else None
                if any(name in pair for pair in self._claimed_twice):
                    return None
                old = self._winners.pop(name, None)
                if old is not None:
                    self._owners.discard(old)
                if instance is not None:
                    if self._owners.owner(instance) is not None:
                        return None
                    self._owners.add(instance)
                    self._winners[name] = instance
                instances[name] = instance
                associations[name] = self._wanted.get(name)
        self._touched = set()
        return Patch(instances, associations)

    def patch_no_more(self) -> None:
        """The next patch() is None (a whole baseline), whatever it would have been."""
        self._touched = None

    @staticmethod
    def _set(table: dict[str, T], name: str, value: T | None) -> T | None:
        if value is None:
            table.pop(name, None)
        else:
            table[name] = value
        return value
