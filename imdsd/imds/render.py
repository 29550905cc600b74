"""EC2-shaped bodies, byte for byte: JSON documents, listings and error pages.

EC2's JSON documents put a space on both sides of the colon and indent by two spaces;
timestamps are UTC to the second (`%Y-%m-%dT%H:%M:%SZ`, exactly what botocore parses).
Pure functions of their arguments: no I/O, no clock.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from http import HTTPStatus

from imdsd.model import Association, Instance, Role, Session

IDENTITY_DOCUMENT_VERSION = "2017-09-30"
CREDENTIAL_TYPE = "AWS-HMAC"
CLOSE = b"\n}"  # the end of every document
_string = json.encoder.encode_basestring_ascii  # what json.dumps does with a str, minus its checks


def ec2_time(when: datetime) -> str:
    """EC2's timestamp form: UTC, whole seconds, trailing Z."""
    t = when.astimezone(UTC)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}Z"


def document(fields: Iterable[tuple[str, object]]) -> bytes:
    """A JSON object laid out as EC2 lays it out (`"Key" : value`, two-space indent)."""
    return _open(fields) + CLOSE


def _open(fields: Iterable[tuple[str, object]]) -> bytes:
    """A document without its closing brace (a caller may add fields to it, then close it)."""
    body = ",\n".join(
        f"  {_string(k)} : {_string(v) if type(v) is str else json.dumps(v)}" for k, v in fields
    )
    return ("{\n" + body).encode()


def credentials(session: Session, role: Role) -> tuple[bytes, bytes, bytes]:
    """The credential documents in parts: the fields up to Expiration, open (what the legacy
    and the extended document share: a session's bytes are kept once); the legacy document's
    closing (CLOSE); the extended document's, AccountId then the brace (one per account,
    shared by its sessions)."""
    fields: list[tuple[str, object]] = [
        ("Code", "Success"),
        ("LastUpdated", ec2_time(session.issued_at)),
        ("Type", CREDENTIAL_TYPE),
        ("AccessKeyId", session.access_key_id),
        ("SecretAccessKey", session.secret_access_key),
        ("Token", session.token),
        ("Expiration", ec2_time(session.expiration)),
    ]
    return _open(fields), CLOSE, account_closing(role.account_id)


@functools.lru_cache(maxsize=4096)
def account_closing(account_id: str) -> bytes:
    """`,` AccountId and the closing brace: the extended document's end for this account."""
    return f",\n  {_string('AccountId')} : {_string(account_id)}".encode() + CLOSE


def read_credentials(document: bytes) -> Session:
    """The session a credential document carries (issue and expiry to the second)."""
    d = json.loads(document)
    return Session(
        access_key_id=d["AccessKeyId"],
        secret_access_key=d["SecretAccessKey"],
        token=d["Token"],
        issued_at=datetime.fromisoformat(d["LastUpdated"]),
        expiration=datetime.fromisoformat(d["Expiration"]),
    )


def failure(code: str, message: str, when: datetime) -> bytes:
    """EC2's answer when it cannot provide credentials: HTTP 200, Code is not Success."""
    return document([("Code", code), ("Message", message), ("LastUpdated", ec2_time(when))])


def info(association: Association) -> bytes:
    """iam/info: LastUpdated is when the association last changed."""
    return document(
        [
            ("Code", "Success"),
            ("LastUpdated", ec2_time(association.associated_at)),
            ("InstanceProfileArn", association.profile.arn),
            ("InstanceProfileId", association.profile.id),
        ]
    )


def identity_document(instance: Instance, account_id: str, pending: datetime) -> bytes:
    """dynamic/instance-identity/document, with EC2's fields in EC2's order."""
    return document(
        [
            ("accountId", account_id),
            ("architecture", "x86_64"),
            ("availabilityZone", instance.availability_zone),
            ("billingProducts", None),
            ("devpayProductCodes", None),
            ("marketplaceProductCodes", None),
            ("imageId", instance.image_id),
            ("instanceId", instance.id),
            ("instanceType", instance.instance_type),
            ("kernelId", None),
            ("pendingTime", ec2_time(pending)),
            ("privateIp", instance.local_ipv4),
            ("ramdiskId", None),
            ("region", instance.region),
            ("version", IDENTITY_DOCUMENT_VERSION),
        ]
    )


def listing(names: Iterable[str]) -> bytes:
    """A directory: one name per line, subtrees with a trailing slash, no final newline."""
    return "\n".join(names).encode()


def error_page(status: int) -> bytes:
    """EC2's small XHTML error page for a status (404 - Not Found, 401 - Unauthorized, ...)."""
    title = f"{status} - {HTTPStatus(status).phrase}"
    return (
        '<?xml version="1.0" encoding="iso-8859-1"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
        '\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        " <head>\n"
        f"  <title>{title}</title>\n"
        " </head>\n"
        " <body>\n"
        f"  <h1>{title}</h1>\n"
        " </body>\n"
        "</html>\n"
    ).encode()


ERROR_PAGES = {status: error_page(status) for status in (400, 401, 403, 404, 405, 429, 500)}
