"""The state file: runtime changes (admin API) recorded as overrides on top of the config.

The config file stays the baseline; this file says what changed since: instances added or
removed, metadata options modified, associations set or removed. Records use the config's
own shapes ([[instances]] tables, metadata_options) and are validated on load by the config's
own parsers: a hand-edited `hop_limit = 0` is refused with its key path, like a bad config,
never handed to setsockopt; a `user_data_file` is refused the same way (the admin API never
reads a host file, so neither may a record of what it did). Every write is crash-safe: a
temporary file is written and fsynced, renamed over the old one, and the directory fsynced,
so a SIGKILL at any instant leaves either the old state or the new one. File and folder modes
are set explicitly, so they do not depend on the umask. Never imports aiohttp.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imdsd.config.instances import instance_in, instance_table, options_in
from imdsd.config.reader import Reader, Section, show
from imdsd.errors import ConfigError, Problem, StateError
from imdsd.files import write_atomically
from imdsd.model import IAM_NAME, INSTANCE_ID, Instance, MetadataOptions

FORMAT_VERSION = 2  # 1: instances as dataclass dicts ("options", "local_ipv4"); read as well
FILE_NAME = "state.json"
DIRECTORY_MODE = 0o750  # the service's group may look (systemd's StateDirectoryMode agrees)
FILE_MODE = 0o640


@dataclass(slots=True)
class Overrides:
    """What the admin API changed relative to the config."""

    added: dict[str, Instance] = field(default_factory=dict)  # instances added at runtime
    removed: set[str] = field(default_factory=set)  # config instances removed at runtime
    options: dict[str, MetadataOptions] = field(default_factory=dict)  # modified options
    associations: dict[str, str | None] = field(default_factory=dict)  # None = disassociated

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": FORMAT_VERSION,
                "added": {iid: instance_table(i) for iid, i in sorted(self.added.items())},
                "removed": sorted(self.removed),
                "options": {iid: asdict(o) for iid, o in sorted(self.options.items())},
                "associations": dict(sorted(self.associations.items())),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, source: str) -> Overrides:
        """Parse and validate; ConfigError lists every problem with its key path in `source`."""
        try:
            data = json.loads(text)
        except ValueError:
            raise ConfigError([Problem(source, "text that is not JSON", "a state file")]) from None
        reader = Reader()
        root = Section(reader, data if isinstance(data, dict) else {}, "")
        version = root.data.get("version")
        if version not in (1, FORMAT_VERSION):
            root.problem("version", show(version), f"1 or {FORMAT_VERSION}")
        elif version == 1:
            _upgrade(root.data)
        root.reject_unknown(("version", "added", "removed", "options", "associations"))
        overrides = cls(
            added=_added(root),
            removed=_removed(root),
            options={
                iid: options_in(t)
                for iid, t in root.keyed("options", None).items()
                if _is_id(root, "options", iid)
            },
            associations=_associations(root),
        )
        if reader.problems:
            raise ConfigError([Problem(f"{source}: {p.path}", p.value, p.allowed)
                               for p in reader.problems])  # fmt: skip
        return overrides


def _is_id(root: Section, table: str, key: str) -> bool:
    if INSTANCE_ID.fullmatch(key):
        return True
    root.child(table).problem(key, "a name that is no instance id", '"i-" + 8 or 17 hex digits')
    return False


def _added(root: Section) -> dict[str, Instance]:
    out = {}
    for iid, t in root.keyed("added", None).items():
        instance = instance_in(t)
        if instance is not None and instance.id != iid:
            t.problem("id", show(instance.id), f'the record\'s own key, "{iid}"')
        elif instance is not None:
            out[iid] = instance
    return out


def _removed(root: Section) -> set[str]:
    value = root.data.get("removed", [])
    if not isinstance(value, list) or not all(
        isinstance(v, str) and INSTANCE_ID.fullmatch(v) for v in value
    ):
        root.problem("removed", show(value), "a list of instance ids")
        return set()
    return set(value)


def _associations(root: Section) -> dict[str, str | None]:
    value = root.data.get("associations", {})
    out: dict[str, str | None] = {}
    if not isinstance(value, dict):
        root.problem("associations", show(value), "a table of instance id -> profile name")
        return out
    for iid, name in value.items():
        if not _is_id(root, "associations", iid):
            continue
        if name is not None and not (isinstance(name, str) and IAM_NAME.fullmatch(name)):
            root.child("associations").problem(iid, show(name), "a profile name, or null")
            continue
        out[iid] = name
    return out


def _upgrade(data: dict[str, Any]) -> None:
    """Version 1 stored instances as dataclass dicts: rename and drop the derived fields."""
    for record in (data.get("added") or {}).values():
        if isinstance(record, dict):
            record["metadata_options"] = record.pop("options", {})
            record.pop("local_ipv4", None)
            if isinstance(record.get("tags"), list):  # dataclass dicts hold tags as pairs
                record["tags"] = dict(record["tags"])
            for key in [k for k, v in record.items() if v is None]:
                del record[key]


class StateFile:
    """One JSON file in the state directory, replaced atomically."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME

    def load(self) -> Overrides:
        """The recorded overrides; none when the file does not exist yet. ConfigError for a
        file whose records are invalid, StateError for one that cannot be read."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Overrides()
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"cannot read the state file {self.path}: {exc}") from None
        return Overrides.from_json(text, str(self.path))

    def save(self, overrides: Overrides) -> None:
        """Write, fsync, rename over the old file, fsync the directory (modes set explicitly)."""
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, DIRECTORY_MODE)
            write_atomically(self.path, overrides.to_json().encode(), FILE_MODE)
        except OSError as exc:
            raise StateError(f"cannot write the state file {self.path}: {exc.strerror}") from None
