"""The daemon as users run it: `python -m imdsd run --config FILE`, a separate process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import host_sections
from tests.process import log_events

DEMO = """
[imds]
listeners = ["127.0.0.1:0"]

{host}

[log]
level = "debug"

[[instance_profiles]]
name = "demo-profile"
role_arn = "arn:aws:iam::123456789012:role/demo-role"

[[instances]]
id = "i-0123456789abcdef0"
addresses = ["127.0.0.1"]
metadata_options = {{ http_tokens = "{tokens}" }}

[[associations]]
instance = "i-0123456789abcdef0"
profile = "demo-profile"
"""


@dataclass
class Running:
    url: str
    process: subprocess.Popen[str]
    log: Path

    def lines(self) -> list[dict[str, object]]:
        return log_events(self.log)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(extra: str = "", tokens: str = "required") -> Running:
        config = tmp_path / f"imdsd-{len(started)}.toml"
        config.write_text(
            DEMO.format(tokens=tokens, host=host_sections(tmp_path / f"d{len(started)}")) + extra
        )
        log = tmp_path / f"daemon-{len(started)}.log"
        with log.open("w") as out:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                [sys.executable, "-m", "imdsd", "run", "--config", str(config), "--log-format", "json"],
                stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ},
            )  # fmt: skip
        running = Running(url="", process=process, log=log)
        started.append(running)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None:
            ready = [line for line in running.lines() if line.get("event") == "ready"]
            if ready:
                running.url = str(ready[0]["listening"][0])  # type: ignore[index]
                return running
            time.sleep(0.05)
        raise AssertionError(f"daemon did not become ready:\n{log.read_text()}")

    yield start
    for running in started:
        running.process.terminate()
        running.process.wait(timeout=10)
