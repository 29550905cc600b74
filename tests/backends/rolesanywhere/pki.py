"""A test PKI made with cryptography: a root CA, an intermediate, and host certificates (RSA or
EC P-256), written as PEM files the way an operator's step-ca or Vault would leave them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_key(kind: str) -> Key:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Authority:
    """A CA: its key and certificate."""

    key: Key
    certificate: x509.Certificate

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: str, issuer: x509.Name, public: object, start: datetime, lifetime: timedelta
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public)  # type: ignore[arg-type]  # one of the key types cryptography takes
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
    )


def root_ca(name: str, now: datetime) -> Authority:
    key = new_key("ec")
    cert = (
        _builder(name, _name(name), key.public_key(), now - timedelta(days=1), timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


def intermediate(parent: Authority, name: str, now: datetime) -> Authority:
    key = new_key("ec")
    cert = (
        _builder(
            name,
            parent.certificate.subject,
            key.public_key(),
            now - timedelta(days=1),
            timedelta(days=365),
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .sign(parent.key, hashes.SHA256())
    )
    return Authority(key, cert)


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def leaf(
    issuer: Authority, key: Key, start: datetime, lifetime: timedelta, name: str = "hv-042.example"
) -> x509.Certificate:
    """A host certificate as Roles Anywhere wants one: not a CA, digitalSignature, clientAuth."""
    return (
        _builder(name, issuer.certificate.subject, key.public_key(), start, lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )


def server_certificate(ca: Authority, now: datetime) -> tuple[x509.Certificate, Key]:
    """A TLS server certificate for 127.0.0.1, for the fake's https listener."""
    import ipaddress

    key = new_key("ec")
    cert = (
        _builder(
            "127.0.0.1",
            ca.certificate.subject,
            key.public_key(),
            now - timedelta(days=1),
            timedelta(days=30),
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


def key_pem(key: Key | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def replace_file(path: Path, data: bytes) -> None:
    """Write beside, then rename over: how certificate tools install a renewed file."""
    staging = path.with_name(path.name + ".new")
    staging.write_bytes(data)
    os.replace(staging, path)


@dataclass
class HostFiles:
    """The files [backend.rolesanywhere] names, in one directory."""

    certificate_file: Path
    private_key_file: Path
    certificate_chain_file: Path | None

    def toml(self) -> str:
        lines = [
            f'certificate_file = "{self.certificate_file}"',
            f'private_key_file = "{self.private_key_file}"',
        ]
        if self.certificate_chain_file is not None:
            lines.append(f'certificate_chain_file = "{self.certificate_chain_file}"')
        return "\n".join(lines) + "\n"


def write_host(
    directory: Path,
    certificate: x509.Certificate,
    key: Key,
    chain: tuple[x509.Certificate, ...] = (),
) -> HostFiles:
    directory.mkdir(parents=True, exist_ok=True)
    files = HostFiles(
        directory / "host.pem",
        directory / "host-key.pem",
        directory / "chain.pem" if chain else None,
    )
    replace_file(files.certificate_file, cert_pem(certificate))
    replace_file(files.private_key_file, key_pem(key))
    if files.certificate_chain_file is not None:
        replace_file(files.certificate_chain_file, cert_pem(*chain))
    return files
