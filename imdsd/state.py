"""The state file: runtime changes (admin API) recorded as overrides on top of the config.

The config file stays the baseline; this file says what changed since: instances added or
removed, metadata options modified, associations set or removed. Every write is crash-safe:
a temporary file is written and fsynced, renamed over the old one, and the directory fsynced,
so a SIGKILL at any instant leaves either the old state or the new one. Never imports aiohttp.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imdsd.errors import ImdsdError
from imdsd.model import Instance, MetadataOptions

FORMAT_VERSION = 1
FILE_NAME = "state.json"


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
                "added": {iid: _instance_dict(i) for iid, i in sorted(self.added.items())},
                "removed": sorted(self.removed),
                "options": {iid: asdict(o) for iid, o in sorted(self.options.items())},
                "associations": dict(sorted(self.associations.items())),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Overrides:
        data = json.loads(text)
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown state format version {data.get('version')!r}")
        return cls(
            added={iid: _instance_from(d) for iid, d in data["added"].items()},
            removed=set(data["removed"]),
            options={iid: MetadataOptions(**o) for iid, o in data["options"].items()},
            associations=dict(data["associations"]),
        )


class StateError(ImdsdError):
    """The state file exists but cannot be read or written."""


class StateFile:
    """One JSON file in the state directory, replaced atomically."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME

    def load(self) -> Overrides:
        """The recorded overrides; none when the file does not exist yet."""
        try:
            return Overrides.from_json(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return Overrides()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(f"cannot read the state file {self.path}: {exc}") from None

    def save(self, overrides: Overrides) -> None:
        """Write, fsync, rename over the old file, fsync the directory."""
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            temporary = directory / f".{FILE_NAME}.{os.getpid()}.tmp"
            with temporary.open("w", encoding="utf-8") as out:
                out.write(overrides.to_json())
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
            descriptor = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError as exc:
            raise StateError(f"cannot write the state file {self.path}: {exc.strerror}") from None


def _instance_dict(instance: Instance) -> dict[str, Any]:
    data = asdict(instance)
    data["addresses"] = list(instance.addresses)
    return data


def _instance_from(data: dict[str, Any]) -> Instance:
    return Instance(**{**data, "addresses": tuple(data["addresses"]),
                       "options": MetadataOptions(**data["options"])})  # fmt: skip
