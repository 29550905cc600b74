"""The daemon as a separate process, as systemd runs it: config file, JSON log, signals."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path


def log_events(log: Path) -> list[dict[str, object]]:
    """A daemon's JSON log lines so far, complete ones only: a line the daemon is still writing
    (a read can see part of a write to a regular file) is left for the next call."""
    lines = log.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.startswith("{")]


class Proc:
    """A daemon process with its config file, log and (optionally) a notify socket."""

    def __init__(
        self,
        directory: Path,
        config: str,
        notify: Path | None = None,
        watchdog_usec: int = 0,
        nofile: int | None = None,
        until: str = "ready",
        netns: str | None = None,
        sockets: dict[str, socket.socket] | None = None,
    ) -> None:
        """`netns`: run the daemon inside that named network namespace (a test's host).
        `sockets`: passed as systemd's socket activation passes them (descriptors from 3,
        LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID = the daemon's own pid)."""
        self.directory, self.config = directory, directory / "imdsd.toml"
        self.config.write_text(config)
        self.log = directory / f"log-{time.monotonic_ns()}.jsonl"
        env = {**os.environ}
        if notify:
            env["NOTIFY_SOCKET"] = str(notify)
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)

        passed = list((sockets or {}).items())
        if passed:
            env["LISTEN_FDS"] = str(len(passed))
            env["LISTEN_FDNAMES"] = ":".join(name for name, _ in passed)

        # Only where needed: a preexec_fn makes subprocess fork() rather than vfork(), and a
        # test that holds an etcd (gRPC) client then runs gRPC's fork handlers, whose restarted
        # poller met close_fds in the child: "epoll_wait error: Bad file descriptor", and the
        # child died before exec (a CI failure in tests/fleet/test_fleet.py).
        def limit() -> None:  # the open-files limit of the daemon alone (systemd's default: 1024)
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            for index, (_, sock) in enumerate(passed):  # as systemd lays them out
                os.dup2(sock.fileno(), 3 + index, inheritable=True)

        with self.log.open("w") as out:
            inside = ["ip", "netns", "exec", netns] if netns else []
            if passed:  # the shell's pid is the daemon's: it execs it
                inside += ["sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh"]
            self.process = subprocess.Popen([*inside, sys.executable, "-m", "imdsd", "run", "--config",
                                             str(self.config), "--log-format", "json"],
                                            stdout=out, stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=limit if nofile is not None or passed else None,
                                            close_fds=not passed)  # fmt: skip
        self.url = str(self.wait_for(until)["listening"][0])  # type: ignore[index]

    def events(self) -> list[dict[str, object]]:
        return log_events(self.log)

    def wait_for(self, event: str, after: int = 0) -> dict[str, object]:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = [e for e in self.events()[after:] if e.get("event") == event]
            if found:
                return found[0]
            assert self.process.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} in:\n{self.log.read_text()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=10)
