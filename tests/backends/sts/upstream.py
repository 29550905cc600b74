"""The upstream for the sts tests: moto's server (a real STS/IAM/S3 on loopback), set up with
roles, a host user and buckets, and FaultySts, a small aiohttp proxy that misbehaves on cue."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import boto3
from aiohttp import web
from botocore.config import Config

ACCOUNT, PARTNER = "123456789012", "222222222222"
ROLE_A, ROLE_B = f"arn:aws:iam::{ACCOUNT}:role/role-a", f"arn:aws:iam::{ACCOUNT}:role/role-b"
ROLE_DENIED = f"arn:aws:iam::{ACCOUNT}:role/role-denied"
PARTNER_ROLE = f"arn:aws:iam::{PARTNER}:role/partner-reader"
HOST_USER = f"arn:aws:iam::{ACCOUNT}:user/imdsd-host"
HOST_ROLE = f"arn:aws:iam::{ACCOUNT}:role/imdsd-host-role"  # the host's role via Roles Anywhere
HOST_ROLE_SESSION_NAME = "hv-042"  # AWS trusts HOST_ROLE; moto compares principals literally,
HOST_ROLE_SESSION = f"arn:aws:sts::{ACCOUNT}:assumed-role/imdsd-host-role/{HOST_ROLE_SESSION_NAME}"


def _policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def _allow(action: str | list[str], resource: str | list[str]) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource}


TRUST_HOST = _policy({"Effect": "Allow", "Principal": {"AWS": [HOST_USER, HOST_ROLE, HOST_ROLE_SESSION]},
                      "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"]})  # fmt: skip


@dataclass
class Moto:
    url: str
    process: subprocess.Popen[bytes]
    host_key: dict[str, str]

    def host_env(self) -> dict[str, str]:
        """The environment that gives the daemon the host's own credentials (and nothing else)."""
        return {
            "AWS_ACCESS_KEY_ID": self.host_key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": self.host_key["SecretAccessKey"],
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> Moto:
    """moto_server on 127.0.0.1 with IAM authorization on once the setup calls are spent."""
    setup: list[Callable[[Any, Any, Any], Any]] = [
        lambda iam, s3, out: iam.create_user(UserName="imdsd-host"),
        lambda iam, s3, out: out.update(iam.create_access_key(UserName="imdsd-host")["AccessKey"]),
        lambda iam, s3, out: iam.put_user_policy(UserName="imdsd-host", PolicyName="assume", PolicyDocument=_policy(
            _allow(["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"], [ROLE_A, ROLE_B, HOST_ROLE]))),
        lambda iam, s3, out: iam.create_role(RoleName="role-a", AssumeRolePolicyDocument=TRUST_HOST),
        lambda iam, s3, out: iam.create_role(RoleName="role-b", AssumeRolePolicyDocument=TRUST_HOST),
        lambda iam, s3, out: iam.create_role(RoleName="role-denied", AssumeRolePolicyDocument=TRUST_HOST),
        lambda iam, s3, out: iam.put_role_policy(RoleName="role-a", PolicyName="p", PolicyDocument=_policy(
            _allow("s3:GetObject", "arn:aws:s3:::bucket-a/*"), _allow("sts:AssumeRole", PARTNER_ROLE))),
        lambda iam, s3, out: iam.put_role_policy(RoleName="role-b", PolicyName="p", PolicyDocument=_policy(
            _allow("s3:GetObject", "arn:aws:s3:::bucket-b/*"))),
        lambda iam, s3, out: iam.create_role(RoleName="imdsd-host-role", AssumeRolePolicyDocument=TRUST_HOST),
        lambda iam, s3, out: iam.put_role_policy(RoleName="imdsd-host-role", PolicyName="assume", PolicyDocument=_policy(
            _allow(["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"], [ROLE_A, ROLE_B]))),
        lambda iam, s3, out: s3.create_bucket(Bucket="bucket-a"),
        lambda iam, s3, out: s3.create_bucket(Bucket="bucket-b"),
        lambda iam, s3, out: s3.put_object(Bucket="bucket-a", Key="hello.txt", Body=b"from a"),
        lambda iam, s3, out: s3.put_object(Bucket="bucket-b", Key="hello.txt", Body=b"from b"),
    ]  # fmt: skip
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(len(setup))}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    kw = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "AKIASETUPSETUPSETUP0",
          "aws_secret_access_key": "setup", "config": Config(s3={"addressing_style": "path"})}  # fmt: skip
    key: dict[str, str] = {}
    iam, s3 = boto3.client("iam", **kw), boto3.client("s3", **kw)
    for step in setup:
        step(iam, s3, key)
    return Moto(url=url, process=process, host_key=key)


@dataclass
class FaultySts:
    """A real aiohttp server in front of moto: forwards requests, or fails on cue."""

    upstream: str
    fail_rate: float = 0.0  # share of AssumeRole calls answered with a 500
    # pass | outage | throttle | stall | too-long-once | trickle | huge | no-date | bad-date
    mode: str = "pass"
    stall_seconds: float = 30.0
    rng: random.Random = field(default_factory=lambda: random.Random(3))
    seen: list[dict[str, str]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # monotonic arrival of each call
    in_flight: int = 0
    max_in_flight: int = 0
    answered: bytes = b""  # the last answer forwarded from moto, as moto sent it
    url: str = ""
    _runner: web.AppRunner | None = None
    _client: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/"
        self._client = aiohttp.ClientSession()

    async def close(self) -> None:
        if self._client:
            await self._client.close()
        if self._runner:
            await self._runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        form = dict(x.split("=", 1) for x in body.decode().split("&") if "=" in x)
        self.seen.append(form)
        self.times.append(time.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)  # a little latency, so concurrent calls overlap
            fault = self.fault()
            if fault is not None:
                return fault
            return await self.forward(request, body)
        finally:
            self.in_flight -= 1

    def fault(self) -> web.StreamResponse | None:
        if self.mode == "outage" or (self.fail_rate and self.rng.random() < self.fail_rate):
            return web.Response(
                status=500, body=_error_xml("InternalFailure", "boom"), content_type="text/xml"
            )
        if self.mode == "throttle":
            return web.Response(
                status=400, body=_error_xml("Throttling", "Rate exceeded"), content_type="text/xml"
            )
        if self.mode == "too-long-once":
            self.mode = "pass"
            message = (
                "The requested DurationSeconds exceeds the MaxSessionDuration set for this role."
            )
            return web.Response(
                status=400, body=_error_xml("ValidationError", message), content_type="text/xml"
            )
        return None

    async def forward(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if self.mode == "stall":
            await asyncio.sleep(self.stall_seconds)
        assert self._client is not None
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding")
        }
        async with self._client.request(request.method, self.upstream + request.path_qs, data=body,
                                        headers=headers) as reply:  # fmt: skip
            payload = self.answered = await reply.read()
            keep = {
                k: v
                for k, v in reply.headers.items()
                if k.lower() in ("content-type", "date", "x-amzn-requestid")
            }
            if self.mode == "trickle":  # the answer in small pieces, a little apart
                return await self.trickle(request, reply.status, payload, keep)
            if self.mode == "huge":  # the answer, then padding past any sane size (2 MiB)
                payload += b" " * (2 << 20)
            if self.mode in ("no-date", "bad-date"):  # aiohttp adds a Date unless one is set,
                keep = {k: v for k, v in keep.items() if k.lower() != "date"}  # so an empty
                keep["Date"] = "" if self.mode == "no-date" else "yesterday, around noon"  # is none
            return web.Response(status=reply.status, body=payload, headers=keep)

    async def trickle(self, request: web.Request, status: int, payload: bytes,
                      headers: dict[str, str]) -> web.StreamResponse:  # fmt: skip
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(payload)
        await response.prepare(request)
        for start in range(0, len(payload), 100):
            await response.write(payload[start : start + 100])
            await asyncio.sleep(0.005)
        await response.write_eof()
        return response


def _error_xml(code: str, message: str) -> bytes:
    return (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
        f"<Code>{code}</Code><Message>{message}</Message></Error>"
        "<RequestId>req-fault-0001</RequestId></ErrorResponse>"
    ).encode()
