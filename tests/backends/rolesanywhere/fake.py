"""A fake IAM Roles Anywhere CreateSession endpoint that checks what AWS checks.

Written from AWS's documentation of the signing process, not from imdsd's signer: it rebuilds
the SigV4 canonical request from the request as received, verifies the signature with the
public key of the certificate in X-Amz-X509, checks the serial in Credential, the scope, the
date skew, the chain (X-Amz-X509-Chain) up to its trust anchor's CA and every validity period,
the trust anchor, profile and role, and durationSeconds (900..43200, and each role's own
maximum). It answers as the service does: 201 with credentialSet[0].credentials, or an error
with x-amzn-ErrorType and {"message": ...}. A real aiohttp server (TLS optional, so that the
independent iam-rolesanywhere-session client can talk to it), with faults on cue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from imdsd.clock import Clock

REGION = "eu-west-1"
ACCOUNT = "123456789012"
TRUST_ANCHOR = (
    f"arn:aws:rolesanywhere:{REGION}:{ACCOUNT}:trust-anchor/4c5d6e7f-0000-4000-8000-00000000a001"
)
PROFILE = f"arn:aws:rolesanywhere:{REGION}:{ACCOUNT}:profile/4c5d6e7f-0000-4000-8000-00000000b002"
SKEW = timedelta(minutes=5)
AUTHORIZATION = re.compile(
    r"(?P<alg>AWS4-X509-(?:RSA|ECDSA)-SHA256) Credential=(?P<serial>\d+)/(?P<date>\d{8})/"
    r"(?P<region>[^/]+)/rolesanywhere/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]+), ?"
    r"Signature=(?P<signature>[0-9a-f]+)"
)
Mint = Callable[[str, str | None, int], Awaitable[dict[str, str]]]


class Refusal(Exception):  # an answer, not a failure of the fake
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _denied(message: str) -> Refusal:
    return Refusal(403, "AccessDeniedException", message)


def _invalid(message: str) -> Refusal:
    return Refusal(400, "ValidationException", message)


async def random_credentials(role: str, name: str | None, seconds: int) -> dict[str, str]:
    return {
        "accessKeyId": "ASIA" + secrets.token_hex(8).upper(),
        "secretAccessKey": base64.b64encode(secrets.token_bytes(30)).decode(),
        "sessionToken": "IQoJ" + base64.b64encode(secrets.token_bytes(96)).decode(),
    }


@dataclass
class FakeRolesAnywhere:
    anchor: x509.Certificate  # the trust anchor's CA certificate
    clock: Clock
    roles: dict[str, int]  # role ARN the profile lists -> the role's MaxSessionDuration
    accept_role_session_name: bool = False
    mint: Mint = random_credentials
    mode: str = "pass"  # pass | throttle | outage | stall | garbage | huge
    stall_seconds: float = 30.0
    requests: list[dict[str, Any]] = field(default_factory=list)  # headers and body as received
    issued: list[dict[str, str]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=tls).start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            # TLS connections finish their close_notify exchange a few loop turns later: let
            # them, or the loop ends with their transports open (a ResourceWarning).
            await asyncio.sleep(0.05)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = await self.answer(request)
        response.force_close()  # one request per connection: none idles past close() (TLS)
        return response

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append({"headers": request.headers.copy(), "body": body})  # case-blind
        if self.mode == "stall":
            await asyncio.sleep(self.stall_seconds)
        if self.mode in ("garbage", "huge"):  # a broken proxy's 201
            return web.Response(
                status=201, body=b"x" * (2 << 20) if self.mode == "huge" else b"<html>"
            )
        try:
            self._fault()
            if request.method != "POST" or request.path != "/sessions":
                raise Refusal(404, "ResourceNotFoundException", "no such operation")
            self.verify(request, body)
            fields = self.check_body(body)
        except Refusal as refusal:
            self.refusals.append(refusal.message)
            return web.json_response(
                {"message": refusal.message},
                status=refusal.status,
                headers={"x-amzn-ErrorType": refusal.kind, **self._date()},
            )
        credentials = await self.mint(
            fields["roleArn"], fields.get("roleSessionName"), fields["durationSeconds"]
        )
        expiration = self.clock.now() + timedelta(seconds=fields["durationSeconds"])
        credentials = {**credentials, "expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ")}
        self.issued.append(credentials)
        answer = {
            "credentialSet": [
                {
                    "assumedRoleUser": {
                        "arn": fields["roleArn"]
                        .replace(":iam::", ":sts::")
                        .replace(":role/", ":assumed-role/")
                        + "/"
                        + (fields.get("roleSessionName") or "x509"),
                        "assumedRoleId": "AROAEXAMPLE:x509",
                    },
                    "credentials": credentials,
                    "packedPolicySize": 0,
                    "roleArn": fields["roleArn"],
                    "sourceIdentity": "CN=hv-042.example",
                }
            ],
            "subjectArn": f"arn:aws:rolesanywhere:{REGION}:{ACCOUNT}:subject/s-1",
        }
        return web.json_response(answer, status=201, headers=self._date())

    def _date(self) -> dict[str, str]:
        return {"Date": format_datetime(self.clock.now(), usegmt=True)}

    def _fault(self) -> None:
        if self.mode == "throttle":
            raise Refusal(429, "ThrottlingException", "Rate exceeded")
        if self.mode == "outage":
            raise Refusal(500, "InternalServerException", "internal failure")

    def verify(self, request: web.Request, body: bytes) -> None:
        """SigV4 with an X.509 key, as the service checks it."""
        found = AUTHORIZATION.fullmatch(request.headers.get("Authorization", ""))
        if not found:
            raise _denied("Missing or malformed Authorization")
        leaf, chain = self._certificates(request)
        if found["serial"] != str(leaf.serial_number):
            raise _denied("Credential serial does not match the signing certificate")
        amz_date = request.headers.get("X-Amz-Date", "")
        try:
            when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
                tzinfo=self.clock.now().tzinfo
            )
        except ValueError:
            raise _denied("Missing or malformed X-Amz-Date") from None
        if abs(when - self.clock.now()) > SKEW:
            raise _denied("Signature expired: the request time is too far from the server's")
        if found["date"] != amz_date[:8] or found["region"] != REGION:
            raise _denied("Credential scope does not match")
        signed = found["signed"].split(";")
        required = {"host", "x-amz-date", "x-amz-x509", "content-type"}
        if "X-Amz-X509-Chain" in request.headers:
            required.add("x-amz-x509-chain")
        if not required <= set(signed) or signed != sorted(signed):
            raise _denied("SignedHeaders must include " + ", ".join(sorted(required)))
        to_sign = self.string_to_sign(request, body, found["alg"], signed, amz_date)
        self._check_signature(leaf, found["alg"], bytes.fromhex(found["signature"]), to_sign)
        self._check_chain(leaf, chain)

    @staticmethod
    def string_to_sign(
        request: web.Request, body: bytes, algorithm: str, signed: list[str], amz_date: str
    ) -> bytes:
        query = "&".join(
            f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
            for k, v in sorted(request.query.items())
        )
        headers = "".join(f"{n}:{' '.join(request.headers.get(n, '').split())}\n" for n in signed)
        canonical = "\n".join(
            [
                request.method,
                quote(request.raw_path.split("?")[0], safe="/-_.~%"),
                query,
                headers,
                ";".join(signed),
                hashlib.sha256(body).hexdigest(),
            ]
        )
        scope = f"{amz_date[:8]}/{REGION}/rolesanywhere/aws4_request"
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        return "\n".join([algorithm, amz_date, scope, digest]).encode()

    @staticmethod
    def _certificates(request: web.Request) -> tuple[x509.Certificate, list[x509.Certificate]]:
        try:
            leaf = x509.load_der_x509_certificate(base64.b64decode(request.headers["X-Amz-X509"]))
            chain = [
                x509.load_der_x509_certificate(base64.b64decode(part))
                for part in request.headers.get("X-Amz-X509-Chain", "").split(",")
                if part
            ]
        except (KeyError, ValueError, binascii.Error):
            raise _denied("Missing or malformed X-Amz-X509") from None
        return leaf, chain

    @staticmethod
    def _check_signature(
        leaf: x509.Certificate, algorithm: str, signature: bytes, to_sign: bytes
    ) -> None:
        public = leaf.public_key()
        try:
            if isinstance(public, rsa.RSAPublicKey) and algorithm == "AWS4-X509-RSA-SHA256":
                public.verify(signature, to_sign, padding.PKCS1v15(), hashes.SHA256())
            elif (
                isinstance(public, ec.EllipticCurvePublicKey)
                and algorithm == "AWS4-X509-ECDSA-SHA256"
            ):
                public.verify(signature, to_sign, ec.ECDSA(hashes.SHA256()))
            else:
                raise _denied("The algorithm does not match the certificate's key")
        except InvalidSignature:
            raise _denied("The request signature we calculated does not match") from None

    def _check_chain(self, leaf: x509.Certificate, chain: list[x509.Certificate]) -> None:
        now = self.clock.now()
        path = [leaf, *chain]
        for cert in path:
            if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
                raise _denied(f"Certificate {cert.serial_number} is expired or not yet valid")
        for child, parent in zip(path, [*chain, self.anchor], strict=True):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature):
                raise _denied("Untrusted signing certificate") from None
            constraints = parent.extensions.get_extension_for_class(x509.BasicConstraints)
            if not constraints.value.ca:
                raise _denied("Untrusted signing certificate")

    def check_body(self, body: bytes) -> dict[str, Any]:
        try:
            fields = json.loads(body)
        except ValueError:
            raise _invalid("The request body is not JSON") from None
        if fields.get("trustAnchorArn") != TRUST_ANCHOR or fields.get("profileArn") != PROFILE:
            raise Refusal(404, "ResourceNotFoundException", "Unknown trust anchor or profile")
        seconds = fields.get("durationSeconds", 3600)
        if not isinstance(seconds, int) or not 900 <= seconds <= 43200:
            raise _invalid("1 validation error detected: durationSeconds must be 900..43200")
        role = fields.get("roleArn")
        if role not in self.roles:
            raise _denied(f"The profile does not list the role {role}")
        if seconds > self.roles[role]:
            raise _invalid("durationSeconds exceeds the MaxSessionDuration of the role")
        if "roleSessionName" in fields and not self.accept_role_session_name:
            raise _denied("The profile does not accept roleSessionName")
        return {**fields, "durationSeconds": seconds}
