"""The host's X.509 identity for IAM Roles Anywhere: its files, re-read when they change, and
its validity; signing.py makes the signature with it.

Operators issue short-lived certificates (step-ca, Vault PKI, cert-manager, SPIRE) and replace
the files by rename: before each signing (and once a minute, rolesanywhere._watch) the files
are stat()ed, and a changed (device, inode, size, mtime) re-reads them. A half-finished
rotation (a new certificate beside the old key) keeps the previous pair until both match.
Nothing here runs on the event loop: callers use asyncio.to_thread. Never logs, raises or
reprs key material or a signature: errors name the key path, the file and the errno class.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from imdsd.backends.signing import PrivateKey, algorithm, sign
from imdsd.clock import Clock
from imdsd.config.backend import RolesAnywhereConfig
from imdsd.errors import BackendError, ConfigError, Problem

WHERE = "backend.rolesanywhere"
EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
Stamp = tuple[tuple[int, int, int, int], ...]
log = structlog.get_logger("imdsd.rolesanywhere")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Identity:
    """One loaded certificate, its chain and its key, and the files' stamp when read."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey = field(repr=False)
    stamp: Stamp

    @property
    def algorithm(self) -> str:
        return algorithm(self.key)

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def __repr__(self) -> str:
        return f"Identity(serial={self.certificate.serial_number}, not_after={self.not_after})"


def files_of(config: RolesAnywhereConfig) -> tuple[tuple[str, Path], ...]:
    """(key name, path) of each file the identity is read from."""
    found = [
        ("certificate_file", config.certificate_file),
        ("private_key_file", config.private_key_file),
    ]
    if config.certificate_chain_file is not None:
        found.append(("certificate_chain_file", config.certificate_chain_file))
    return tuple(found)


def stamp_of(config: RolesAnywhereConfig) -> Stamp:
    """What changes when a file is replaced or rewritten: device, inode, size, mtime."""
    stamps = []
    for _, path in files_of(config):
        try:
            s = os.stat(path)
        except OSError:
            stamps.append((0, 0, -1, 0))  # gone: a change, and load() names the file
            continue
        stamps.append((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns))
    return tuple(stamps)


def load(config: RolesAnywhereConfig) -> Identity:
    """Read and check the three files; ConfigError with one line naming the key otherwise."""
    stamp = stamp_of(config)
    certificate = _read(
        config.certificate_file,
        "certificate_file",
        x509.load_pem_x509_certificate,
        "a readable PEM X.509 certificate",
    )
    chain: tuple[x509.Certificate, ...] = ()
    if config.certificate_chain_file is not None:
        chain = tuple(
            _read(
                config.certificate_chain_file,
                "certificate_chain_file",
                x509.load_pem_x509_certificates,
                "readable PEM certificates",
            )
        )
    key = _read(
        config.private_key_file,
        "private_key_file",
        lambda data: serialization.load_pem_private_key(data, password=None),
        "a readable PEM private key without a passphrase",
    )
    where = f"{WHERE}.private_key_file"
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) or (
        isinstance(key, ec.EllipticCurvePrivateKey) and not isinstance(key.curve, EC_CURVES)
    ):
        kind = type(key).__name__.removeprefix("_")
        raise ConfigError(
            [
                Problem(
                    where,
                    f"{config.private_key_file} (a {kind})",
                    "an RSA key or an EC key on P-256, P-384 or P-521",
                )
            ]
        )
    if certificate.public_key() != key.public_key():
        raise ConfigError(
            [
                Problem(
                    where,
                    f"{config.private_key_file} (another key's)",
                    f"the private key of {WHERE}.certificate_file's certificate",
                )
            ]
        )
    return Identity(certificate, chain, key, stamp)


def _read(path: Path, key: str, parse: Callable[[bytes], T], allowed: str) -> T:
    try:
        return parse(path.read_bytes())
    except OSError as exc:
        problem = f"{path} ({os.strerror(exc.errno) if exc.errno else exc.__class__.__name__})"
    except (ValueError, TypeError, IndexError):  # not PEM, encrypted, empty
        problem = f"{path} (not usable)"
    raise ConfigError([Problem(f"{WHERE}.{key}", problem, allowed)]) from None


def client_ssl(config: RolesAnywhereConfig) -> ssl.SSLContext | bool:
    """The endpoint's TLS trust: the system's store, or the configured CA bundle."""
    if config.ca_bundle is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(config.ca_bundle))
    except (OSError, ssl.SSLError) as exc:
        ssl_error = isinstance(exc, ssl.SSLError)  # an OSError too, with OpenSSL's words
        reason = "no PEM certificate in it" if ssl_error else exc.strerror or type(exc).__name__
        problem = Problem(f"{WHERE}.ca_bundle", f"{config.ca_bundle} ({reason})",
                          "a readable PEM CA bundle")  # fmt: skip
        raise ConfigError([problem]) from None


def check_files(config: RolesAnywhereConfig) -> None:
    """check-config: the certificate, chain, key and CA bundle load and match; ConfigError."""
    load(config)
    client_ssl(config)


class HostCertificate:
    """The identity in use, re-read when its files change; thread-safe (signing runs in
    threads). Warns once per certificate: a failed re-read, a third of its life left, and
    expired or not yet valid (then it signs nothing: a BackendError says why)."""

    def __init__(self, config: RolesAnywhereConfig, clock: Clock) -> None:
        self._config, self._clock = config, clock
        self._lock = threading.Lock()
        self._identity = load(config)
        self._warned: set[tuple[str, object]] = set()
        self._announce(self._identity, "host certificate loaded")

    def __repr__(self) -> str:
        return f"HostCertificate({self._identity!r})"

    @property
    def expiry(self) -> datetime:
        """When the certificate in use expires (the metric's source)."""
        return self._identity.not_after

    def refresh(self) -> Identity:
        """The identity, re-read first if a file changed (in a thread: it stats and reads)."""
        with self._lock:
            stamp = stamp_of(self._config)
            if stamp != self._identity.stamp:
                try:
                    self._identity = load(self._config)
                except ConfigError as exc:
                    self._warn_once(
                        "reload",
                        stamp,
                        "host certificate files unusable; signing with the previous ones",
                        problem=str(exc),
                    )
                else:
                    self._announce(self._identity, "host certificate reloaded")
            self._check_lifetime(self._identity)
            return self._identity

    def usable(self) -> Identity:
        """The identity to sign with now; BackendError if it is expired or not yet valid."""
        identity = self.refresh()
        now, cert = self._clock.now(), identity.certificate
        if now < cert.not_valid_before_utc:
            self._warn_once(
                "early",
                cert.serial_number,
                "host certificate not yet valid",
                serial=str(cert.serial_number),
                not_before=cert.not_valid_before_utc.isoformat(),
            )
            raise BackendError(
                "HostCertificateNotYetValid",
                "The host's certificate for IAM Roles"
                f" Anywhere is valid only from {_ec2(cert.not_valid_before_utc)};"
                " no request is signed with it before.",
            )
        if now >= identity.not_after:
            self._warn_once(
                "expired",
                cert.serial_number,
                "host certificate expired",
                serial=str(cert.serial_number),
                not_after=identity.not_after.isoformat(),
                file=str(self._config.certificate_file),
            )
            raise BackendError(
                "HostCertificateExpired",
                "The host's certificate for IAM Roles"
                f" Anywhere expired at {_ec2(identity.not_after)}; no request is"
                " signed with it until a valid one is installed.",
            )
        return identity

    def signed_headers(self, url: str, body: bytes) -> dict[str, str]:
        """The headers of one signed POST (in a thread)."""
        identity = self.usable()
        return sign(identity.certificate, identity.chain, identity.key, self._config.region, url,
                    body, self._clock.now())  # fmt: skip

    def _check_lifetime(self, identity: Identity) -> None:
        cert = identity.certificate
        life = identity.not_after - cert.not_valid_before_utc
        left = identity.not_after - self._clock.now()
        if timedelta(0) < left < life / 3:
            self._warn_once(
                "aging",
                cert.serial_number,
                "host certificate has less than a third of its lifetime left",
                serial=str(cert.serial_number),
                not_after=identity.not_after.isoformat(),
                file=str(self._config.certificate_file),
            )

    def _warn_once(self, what: str, which: object, event: str, **fields: object) -> None:
        if (what, which) not in self._warned:
            self._warned.add((what, which))
            log.warning(event, **fields)

    @staticmethod
    def _announce(identity: Identity, event: str) -> None:
        cert = identity.certificate
        log.info(
            event,
            serial=str(cert.serial_number),
            subject=cert.subject.rfc4514_string(),
            not_after=identity.not_after.isoformat(),
            algorithm=identity.algorithm,
        )


def _ec2(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
