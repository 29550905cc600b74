"""What every bench writes and sends. Config files, one way: a head (a loopback listener, the
host's own sections, quiet logs, budgets no bench client can reach: each bench measures the
path, not the throttle), instance profiles, and instances with their associations. And one
request on a blocking socket (a poll that costs the daemon nothing: no event loop built per
poll on a two-core machine), and the daemon started as users run it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import host_sections

ROLE = "arn:aws:iam::123456789012:role/bench"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
PUT_TOKEN = f"PUT /latest/api/token HTTP/1.1\r\nHost: b\r\n{TTL}: 21600\r\n\r\n".encode()


def head(directory: Path, why: str, *, port: int = 0, extra: str = "",
         warm_restart: bool = True) -> str:  # fmt: skip
    """Everything but the inventory; `why` says who the budgets must let through, `extra` is
    more sections (rotation, an etcd inventory)."""
    host = host_sections(directory, metrics="")
    if not warm_restart:
        host = host.replace("[state]\n", "[state]\nwarm_restart = false\n")
    return f"""
[imds]
listeners = ["127.0.0.1:{port}"]
{host}
[log]
level = "warning"
[budgets]  # {why}: measure the path, not the throttle
requests_per_second = 100000
burst = 100000
connections = 1024
{extra}"""


def profile(name: str, role: str = ROLE) -> str:
    return f'[[instance_profiles]]\nname = "{name}"\nrole_arn = "{role}"\n'


def iid(n: int) -> str:
    return f"i-{n:017x}"


def instance(n: int, address: str, *, tokens: str | None = None,
             user_data: str | None = None) -> str:  # fmt: skip
    """The n-th instance (its id: iid(n)); `tokens` its http_tokens, else the default."""
    text = f'[[instances]]\nid = "{iid(n)}"\naddresses = ["{address}"]\n'
    if tokens is not None:
        text += f'metadata_options = {{ http_tokens = "{tokens}" }}\n'
    if user_data is not None:
        text += f"user_data = {toml_string(user_data)}\n"
    return text


def association(n: int, to: str = "bench") -> str:
    return f'[[associations]]\ninstance = "{iid(n)}"\nprofile = "{to}"\n'


def toml_string(text: str) -> str:
    """A TOML basic string (its escapes are JSON's for what a bench writes)."""
    return json.dumps(text)


def one(port: int, request: bytes, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """One request on its own connection from `source`: (status, body). An answer cut short
    or not coming within 10 s is an OSError (pollers retry or give up at their deadline)."""
    with socket.create_connection(("127.0.0.1", port), 10, (source, 0)) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += _received(sock)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += _received(sock)
    return int(head.split(b" ", 2)[1]), body


def _received(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the daemon closed the connection before a whole answer")
    return chunk


def get(path: str, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return f"GET {path} HTTP/1.1\r\nHost: b\r\n{extra}\r\n".encode()


def token(port: int, source: str = "127.0.0.1") -> str:
    """An IMDSv2 token for the instance at `source`."""
    status, body = one(port, PUT_TOKEN, source)
    assert status == 200, status
    return body.decode()


def start(config: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`imdsd run` on `config`, logging JSON to `log` (a file: no pipe the daemon could block
    on), and its port once it says it listens."""
    log.unlink(missing_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "imdsd", "run", "--config", str(config),
                                    "--log-format", "json", "--log-level", "info"], stdout=out)  # fmt: skip
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the daemon did not start: see {log}")
        for line in log.read_bytes().split(b"\n")[:-1]:  # complete lines only
            event = json.loads(line)
            if event.get("event") == "listening":
                return process, int(event["listening"][0].rsplit(":", 1)[1])
        time.sleep(0.002)
