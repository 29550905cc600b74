"""SigV4 with an X.509 key: the signature of one IAM Roles Anywhere request, as AWS's credential
helper (rolesanywhere-credential-helper) and the iam-rolesanywhere-session package make it.

SigV4's canonical request over Content-Type, Host, X-Amz-Date, X-Amz-X509 (the leaf, DER in
base64) and X-Amz-X509-Chain (the intermediates, comma-separated); its string to sign signed
directly by the private key (PKCS#1 v1.5 SHA-256 for RSA, DER ECDSA SHA-256 for EC);
`Credential=<the leaf's serial in decimal>/<date>/<region>/rolesanywhere/aws4_request`.
Pure and synchronous (callers run it in a thread); returns headers, never logs.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from datetime import datetime
from urllib.parse import quote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

SERVICE = "rolesanywhere"
CONTENT_TYPE = "application/json"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def algorithm(key: PrivateKey) -> str:
    """AWS4-X509-RSA-SHA256 or AWS4-X509-ECDSA-SHA256, from the key."""
    return f"AWS4-X509-{'RSA' if isinstance(key, rsa.RSAPrivateKey) else 'ECDSA'}-SHA256"


def sign(certificate: x509.Certificate, chain: Sequence[x509.Certificate], key: PrivateKey,
         region: str, url: str, body: bytes, now: datetime) -> dict[str, str]:  # fmt: skip
    """The headers (Authorization included) that sign a POST of `body` to `url` at `now`."""
    parts = urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    headers = {"content-type": CONTENT_TYPE, "host": parts.netloc, "x-amz-date": amz_date,
               "x-amz-x509": _der64(certificate)}  # fmt: skip
    if chain:
        headers["x-amz-x509-chain"] = ",".join(_der64(c) for c in chain)
    names = sorted(headers)
    signed = ";".join(names)
    canonical = "\n".join([
        "POST", quote(parts.path or "/", safe="/-_.~"), "",  # no query string
        "".join(f"{n}:{headers[n].strip()}\n" for n in names), signed,
        hashlib.sha256(body).hexdigest(),
    ])  # fmt: skip
    scope = f"{amz_date[:8]}/{region}/{SERVICE}/aws4_request"
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    to_sign = "\n".join([algorithm(key), amz_date, scope, digest]).encode()
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(to_sign, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = key.sign(to_sign, ec.ECDSA(hashes.SHA256()))
    headers["authorization"] = (f"{algorithm(key)} Credential={certificate.serial_number}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature.hex()}")  # fmt: skip
    return headers


def _der64(certificate: x509.Certificate) -> str:
    return base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()
