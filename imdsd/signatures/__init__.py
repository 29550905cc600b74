"""The instance identity document's three signatures, made with the operator's key.

EC2 signs with AWS's keys; an on-prem host signs with its operator's, published as a
certificate, so the EC2 user guide's verification commands work unchanged with that
certificate in place of AWS's:
- `signature`: base64 of RSA PKCS#1 v1.5 over SHA-256 of the document's exact bytes;
- `rsa2048`: PKCS#7 SignedData, the document embedded (Binary: LF stays LF), SHA-256, RSA,
  no certificates inside;
- `pkcs7`: EC2 signs this one with DSA and SHA-1, which `cryptography` cannot produce (and
  SHA-1 signatures should not be made anew): it is the same RSA SHA-256 PKCS#7 as `rsa2048`,
  so `openssl smime -verify` works on it with the operator's certificate.
All three are base64 wrapped at 76 characters, without PEM armour, as EC2 serves them.

They are made off the guest loop, before a guest asks, and kept across restarts (cache.py).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from imdsd.config.signing import KeyFiles, SigningConfig
from imdsd.errors import ConfigError, Problem
from imdsd.files import write_atomically

KEY_FILE, CERTIFICATE_FILE = "identity-key.pem", "identity-certificate.pem"
KEY_BITS = 2048
CERTIFICATE_YEARS = 10
WRAP = 76
DIGEST = 32  # SHA-256
WHOLE = 0xFFFFFFFF  # a packed PKCS#7 that keeps its document (not found in it: never so far)


@dataclass(frozen=True, slots=True)
class Signatures:
    """What dynamic/instance-identity/ serves beside the document."""

    signature: bytes
    pkcs7: bytes
    rsa2048: bytes


@dataclass(frozen=True, slots=True)
class _Pair:
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    fingerprint: bytes = field(init=False)  # what a kept signature's digest binds it to

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", self.certificate.fingerprint(hashes.SHA256()))

    def __repr__(self) -> str:
        return "_Pair(key=<hidden>)"


class Signer:
    """Signs identity documents with the key of the instance's region (or the default key).
    A default key still being generated (a host's first start) is waited for at its first use."""

    def __init__(self, default: _Pair | Future[_Pair], regions: dict[str, _Pair]) -> None:
        self._default, self._regions = default, regions

    def __repr__(self) -> str:
        return f"Signer(regions={sorted(self._regions)})"

    def _default_pair(self) -> _Pair:
        if isinstance(self._default, Future):
            self._default = self._default.result()
        return self._default

    def _pair(self, region: str) -> _Pair:
        return self._regions.get(region) or self._default_pair()

    def sign(self, document: bytes, region: str) -> Signatures:
        return unpacked(self.signed(document, region), document)

    def digest(self, document: bytes, region: str) -> bytes:
        """What signatures of this document by this region's key are kept under: a digest of
        the certificate and the document's exact bytes (another key or byte: another digest)."""
        return hashlib.sha256(self._pair(region).fingerprint + document).digest()

    def signed(self, document: bytes, region: str) -> bytes:
        """Packed, as SignatureCache keeps them: the digest, the raw signature, and the PKCS#7
        without the document it embeds (a third of it: put back by unpacked())."""
        pair = self._pair(region)
        signature = pair.key.sign(document, padding.PKCS1v15(), hashes.SHA256())
        signed = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(document)
            .add_signer(pair.certificate, pair.key, hashes.SHA256())
            .sign(
                serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoCerts]
            )
        )
        digest = hashlib.sha256(pair.fingerprint + document).digest()
        at = signed.find(document) if document else -1
        if at >= 0:
            signed = signed[:at] + signed[at + len(document) :]
        return b"".join((digest, len(signature).to_bytes(2, "big"), signature,
                         (at if at >= 0 else WHOLE).to_bytes(4, "big"), signed))  # fmt: skip

    def certificates(self) -> dict[str, bytes]:
        """PEM certificate by region ("" for the default): what the operator publishes."""
        pairs = {"": self._default_pair(), **self._regions}
        return {r: p.certificate.public_bytes(serialization.Encoding.PEM) for r, p in pairs.items()}


def unpacked(entry: bytes, document: bytes) -> Signatures:
    """What Signer.signed packed for `document`, as served: `pkcs7` and `rsa2048` are one
    object. The caller has checked the digest: the document is the one that was signed."""
    end = DIGEST + 2 + int.from_bytes(entry[DIGEST : DIGEST + 2], "big")
    at = int.from_bytes(entry[end : end + 4], "big")
    signed = entry[end + 4 :]
    if at != WHOLE:
        signed = signed[:at] + document + signed[at:]
    return Signatures(wrapped(entry[DIGEST + 2 : end]), wrapped(signed), wrapped(signed))


def wrapped(raw: bytes) -> bytes:
    """Base64, lines of 76 characters, no PEM armour and no final newline."""
    text = base64.b64encode(raw)
    return b"\n".join(text[i : i + WRAP] for i in range(0, len(text), WRAP))


def open_signer(config: SigningConfig, state_directory: Path, *, generate: bool = True) -> Signer:
    """The operator's keys from files; without [identity] files, the host's own key and
    self-signed certificate in the state directory, generated on first start (key 0600) and
    kept across restarts. ConfigError (exit 3) for files that are missing or not RSA/PEM.
    A first start generates the key in a thread (RSA-2048 takes 50-500 ms, OpenSSL releases
    the GIL): the listeners do not wait for it, only a signature asked for before it is done."""
    default: _Pair | Future[_Pair]
    if config.default is not None:
        default = _load(config.default, "identity")
    elif generate and not (state_directory / KEY_FILE).exists():
        default = Future()
        threading.Thread(target=_generate_into, args=(default, state_directory),
                         name="identity key", daemon=True).start()  # fmt: skip
    else:
        default = _generated(state_directory, generate=generate)
    regions = {r: _load(files, f"identity.regions.{r}") for r, files in config.regions.items()}
    return Signer(default, regions)


def check_files(config: SigningConfig) -> None:
    """Every configured key and certificate loads and matches (check-config); ConfigError."""
    if config.default is not None:
        _load(config.default, "identity")
    for region, files in config.regions.items():
        _load(files, f"identity.regions.{region}")


def _load(files: KeyFiles, where: str) -> _Pair:
    try:
        key = serialization.load_pem_private_key(files.key_file.read_bytes(), password=None)
        certificate = x509.load_pem_x509_certificate(files.certificate_file.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        allowed = "a readable PEM RSA private key without a passphrase, and its PEM certificate"
        problem = Problem(
            f"{where}.key_file", f"{files.key_file} ({exc.__class__.__name__})", allowed
        )
        raise ConfigError([problem]) from None
    if not isinstance(key, rsa.RSAPrivateKey) or certificate.public_key() != key.public_key():
        allowed = "an RSA key and the certificate of that key"
        raise ConfigError([Problem(f"{where}.key_file", str(files.key_file), allowed)])
    return _Pair(key, certificate)


def _generate_into(future: Future[_Pair], directory: Path) -> None:
    try:
        future.set_result(_generated(directory, generate=True))
    except BaseException as exc:  # surfaces at the first signature, as that request's 500
        future.set_exception(exc)


def _generated(directory: Path, *, generate: bool) -> _Pair:
    files = KeyFiles(key_file=directory / KEY_FILE, certificate_file=directory / CERTIFICATE_FILE)
    if files.key_file.exists() and files.certificate_file.exists():
        return _load(files, "identity")
    if not generate:
        raise FileNotFoundError(files.certificate_file)
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imdsd instance identity")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365 * CERTIFICATE_YEARS))
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(files.key_file, pem_key, 0o600)
    write_atomically(
        files.certificate_file, certificate.public_bytes(serialization.Encoding.PEM), 0o644
    )
    return _Pair(key, certificate)
