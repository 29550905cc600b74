"""[identity], read into SigningConfig: which key signs the instance identity documents (the
config side only; "identity" alone means who is who).

Without files, the host generates its own key on first start (imdsd.signatures); with them, the
operator's key and certificate sign, per region where `[identity.regions.<region>]` says so.
Key files may sit wherever systemd's LoadCredential= puts them (/run/credentials/imdsd.service/).
Imports no cryptography: reading the config stays cheap for the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imdsd.config.converters import file_path
from imdsd.config.reader import Section

SIGNING_KEYS = ("key_file", "certificate_file", "regions")
_FILES = ("key_file", "certificate_file")
_PATH = "an absolute path, or one relative to the directory imdsd runs in"


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyFiles:
    """A PEM RSA private key (no passphrase) and its PEM certificate."""

    key_file: Path
    certificate_file: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class SigningConfig:
    """The default key pair (None: generated in the state directory) and per-region ones."""

    default: KeyFiles | None = None
    regions: dict[str, KeyFiles] = field(default_factory=dict)


def parse_signing(t: Section) -> SigningConfig:
    regions = {}
    for region, section in t.keyed("regions", _FILES).items():
        files = _files(section)
        if files is None:
            section.problem("key_file", "nothing", "both key_file and certificate_file")
        else:
            regions[region] = files
    return SigningConfig(default=_files(t), regions=regions)


def _files(t: Section) -> KeyFiles | None:
    key = t.take("key_file", file_path, None, _PATH)
    certificate = t.take("certificate_file", file_path, None, _PATH)
    if (key is None) != (certificate is None):
        t.problem("certificate_file" if key else "key_file", "nothing", "both, or neither")
        return None
    return KeyFiles(key_file=key, certificate_file=certificate) if key and certificate else None
