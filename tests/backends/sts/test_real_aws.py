"""The same flow against AWS STS itself: skipped unless real credentials and a role are given.

Run with: IMDSD_TEST_ROLE_ARN=arn:aws:iam::ACCOUNT:role/NAME (a role that trusts the identity
in your AWS_* environment or profile) pytest -m external_service tests/backends/sts/test_real_aws.py
"""

from __future__ import annotations

import os

import pytest

from imdsd.clock import SystemClock
from imdsd.config import parse
from imdsd.daemon import running
from tests.helpers import SCRATCH, host_sections, http

ROLE = os.environ.get("IMDSD_TEST_ROLE_ARN", "")
REGION = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@pytest.mark.external_service
@pytest.mark.skipif(not ROLE, reason="set IMDSD_TEST_ROLE_ARN and real AWS credentials")
async def test_real_sts_assume_role() -> None:
    """AWS STS issues a session named after the instance; the guest path serves it."""
    config = parse(f"""
[imds]
listeners = ["127.0.0.1:0"]
{host_sections(SCRATCH / "aws")}[backend]
kind = "sts"
[backend.sts]
region = "{REGION}"
duration = "1h"
[rotation]
refresh_before = "30m"
jitter = "1m"
[[instance_profiles]]
name = "external"
role_arn = "{ROLE}"
[[instances]]
id = "i-0123456789abcdef0"
addresses = ["127.0.0.2"]
metadata_options = {{ http_tokens = "optional" }}
[[associations]]
instance = "i-0123456789abcdef0"
profile = "external"
""")
    async with running(config, SystemClock()) as daemon:
        role_name = ROLE.rsplit("/", 1)[1]
        reply = await http(
            daemon.urls[0],
            f"/latest/meta-data/iam/security-credentials/{role_name}",
            source="127.0.0.2",
        )
    assert (
        reply.status == 200
        and '"Code" : "Success"' in reply.text
        and '"AccessKeyId" : "ASIA' in reply.text
    )
