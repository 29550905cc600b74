"""A guest VM, as a process: boto3 that knows only the metadata endpoint, every socket bound to
the VM's own loopback address. Prints one JSON object with what it could and could not do.

usage: python -m tests.backends.sts.guest SOURCE_ADDRESS AWS_ENDPOINT [PARTNER_ROLE_ARN]
(AWS_EC2_METADATA_SERVICE_ENDPOINT comes from the environment, as in a real guest.)
"""

from __future__ import annotations

import json
import sys

import urllib3.util.connection as connection

SOURCE, ENDPOINT = sys.argv[1], sys.argv[2]
PARTNER = sys.argv[3] if len(sys.argv) > 3 else None
_connect = connection.create_connection


def _bound(address, timeout=connection._DEFAULT_TIMEOUT, source_address=None, socket_options=None):  # type: ignore[no-untyped-def,attr-defined]
    return _connect(address, timeout, (SOURCE, 0), socket_options)


connection.create_connection = _bound  # this VM's traffic leaves from its own address

import boto3  # noqa: E402  (after the patch, so every client uses it)
from botocore.config import Config  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

session = boto3.Session(region_name="us-east-1")
creds = session.get_credentials()
kw = {
    "endpoint_url": ENDPOINT,
    "config": Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
}
out: dict[str, object] = {"method": creds.method if creds else None}
out["access_key"] = creds.get_frozen_credentials().access_key if creds else None
out["arn"] = session.client("sts", **kw).get_caller_identity()["Arn"]
s3 = session.client("s3", **kw)
for bucket in ("bucket-a", "bucket-b"):
    try:
        out[bucket] = s3.get_object(Bucket=bucket, Key="hello.txt")["Body"].read().decode()
    except ClientError as exc:
        out[bucket] = exc.response["Error"]["Code"]
if PARTNER:
    chained = session.client("sts", **kw).assume_role(RoleArn=PARTNER, RoleSessionName="chained")
    c = chained["Credentials"]
    partner = boto3.Session(aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretAccessKey"],
                            aws_session_token=c["SessionToken"], region_name="us-east-1")  # fmt: skip
    out["partner_arn"] = partner.client("sts", **kw).get_caller_identity()["Arn"]
print(json.dumps(out))
