"""The Roles Anywhere test rig: a test PKI, the host's files, the fake endpoint, and the config
that points imdsd at them (used here and by the contract suite)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from imdsd.config import Config
from tests.backends.rolesanywhere.fake import PROFILE, REGION, TRUST_ANCHOR, FakeRolesAnywhere
from tests.backends.rolesanywhere.pki import (
    Authority,
    HostFiles,
    cert_pem,
    intermediate,
    key_pem,
    leaf,
    new_key,
    root_ca,
    server_certificate,
    write_host,
)
from tests.fakes import FakeClock
from tests.helpers import ROLE_A, ROLE_B, make_config

ROLE_SHORT = "arn:aws:iam::111111111111:role/one-hour"  # MaxSessionDuration 1h
ROLE_DENIED = "arn:aws:iam::111111111111:role/not-in-the-profile"
DAY = timedelta(days=1)


@dataclass
class Rig:
    directory: Path
    clock: FakeClock
    root: Authority
    middle: Authority
    fake: FakeRolesAnywhere
    ca_bundle: Path | None = None

    def host(
        self,
        kind: str = "rsa",
        *,
        chain: bool = True,
        lifetime: timedelta = DAY,
        starts: timedelta = -timedelta(hours=1),
        issuer: Authority | None = None,
        name: str = "host",
    ) -> HostFiles:
        """The host's key and certificate (from the intermediate, chain file beside it)."""
        key = new_key(kind)
        by = issuer or (self.middle if chain else self.root)
        cert = leaf(by, key, self.clock.now() + starts, lifetime)
        return write_host(self.directory / name, cert, key, (by.certificate,) if chain else ())

    def section(self, files: HostFiles, extra: str = "", *, kind: str = "rolesanywhere") -> str:
        bundle = f'ca_bundle = "{self.ca_bundle}"\n' if self.ca_bundle else ""
        return (
            f'[backend]\nkind = "{kind}"\n[backend.rolesanywhere]\nregion = "{REGION}"\n'
            f'trust_anchor_arn = "{TRUST_ANCHOR}"\nprofile_arn = "{PROFILE}"\n'
            f'endpoint = "{self.fake.url}"\ntimeout = "2s"\n{bundle}{files.toml()}{extra}'
        )

    def config(self, files: HostFiles, extra: str = "") -> Config:
        return make_config(self.section(files, extra))


@asynccontextmanager
async def rig(directory: Path, clock: FakeClock, *, tls: bool = False) -> AsyncIterator[Rig]:
    """A started fake that trusts a root CA (the intermediate's issuer)."""
    root = root_ca("Test Root CA", clock.now())
    middle = intermediate(root, "Test Issuing CA", clock.now())
    fake = FakeRolesAnywhere(
        anchor=root.certificate, clock=clock, roles={ROLE_A: 43200, ROLE_B: 43200, ROLE_SHORT: 3600}
    )
    bundle, context = _tls(directory) if tls else (None, None)
    await fake.start(context)
    try:
        yield Rig(directory, clock, root, middle, fake, bundle)
    finally:
        await fake.close()


def _tls(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A TLS CA (its bundle for the clients) and the fake's server context."""
    real_now = datetime.now(UTC)  # TLS checks the real time, not the test's clock
    tls_ca = root_ca("Test TLS CA", real_now)
    cert, key = server_certificate(tls_ca, real_now)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.pem").write_bytes(cert_pem(cert))
    (directory / "server-key.pem").write_bytes(key_pem(key))
    bundle = directory / "tls-ca.pem"
    bundle.write_bytes(tls_ca.pem())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "server.pem", directory / "server-key.pem")
    return bundle, context
