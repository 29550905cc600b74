"""The command line: exit codes and one-line messages (0 ok, 1 runtime failure, 3 bad config)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from imdsd.cli import main
from tests.helpers import config_text

REPO = Path(__file__).parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "imdsd.toml"
    path.write_text(text)
    return path


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file: exit 0 and a one-line summary."""
    assert main(["check-config", "--config", str(write(tmp_path, config_text()))]) == 0
    out = capsys.readouterr().out
    assert out.endswith("ok (4 instances, 2 instance profiles, 2 associations, backend local)\n")


def test_check_config_names_an_etcd_inventory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the etcd source the summary says where the inventory comes from."""
    text = '[inventory]\nsource = "etcd"\n[inventory.etcd]\nhost = "hv-1"\n'
    assert main(["check-config", "--config", str(write(tmp_path, text))]) == 0
    out = capsys.readouterr().out
    assert out.endswith("ok (inventory from etcd /imdsd/hosts/hv-1/ at http://127.0.0.1:2379, "
                        "backend local)\n")  # fmt: skip


def test_shipped_configs_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    """The dev config (make run) and the example config both pass check-config."""
    for name in ("imdsd.dev.toml", "imdsd.example.toml"):
        assert main(["check-config", "--config", str(REPO / "config" / name)]) == 0, (
            capsys.readouterr().err
        )


def test_check_config_bad_exits_3_with_every_problem(tmp_path: Path) -> None:
    """A bad file, as a real process: exit 3, one stderr line per problem, nothing on stdout."""
    path = write(
        tmp_path,
        '[rotation]\nconcurrency = 0\n[[instances]]\nid = "vm1"\naddresses = ["127.0.0.2"]\n',
    )
    done = subprocess.run([sys.executable, "-m", "imdsd", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "imdsd: rotation.concurrency: got 0; allowed: an integer from 1 to 1024",
        'imdsd: instances[0].id: got "vm1"; allowed: "i-" followed by 8 or 17 lowercase hex digits',
    ]


def test_run_refuses_bad_config_with_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`run` validates the same way and never starts on a bad file."""
    assert main(["run", "--config", str(write(tmp_path, '[log]\nlevel = "loud"\n'))]) == 3
    assert "log.level" in capsys.readouterr().err


def test_missing_config_file_is_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config path that does not exist is a config error, one line."""
    assert main(["check-config", "--config", str(tmp_path / "nope.toml")]) == 3
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "nope.toml" in err


def test_run_reports_unbindable_listener_with_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A listener address in use: one line on stderr and exit status 1, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = config_text().replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"', 1)  # the guest one
        assert main(["run", "--config", str(write(tmp_path, text)), "--log-format", "json"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("imdsd: cannot start:") and "Traceback" not in err


def test_bad_state_file_is_a_bad_config(tmp_path: Path) -> None:
    """check-config reads the state file too, and so does run: a hand-edited record is one
    stderr line naming the file and its key path, and exit 3 (systemd does not restart)."""
    config = write(tmp_path, config_text())
    state = Path(next(line.split('"')[1] for line in config.read_text().splitlines()
                      if line.startswith("directory = ")))  # fmt: skip
    state.mkdir(parents=True, exist_ok=True)
    (state / "state.json").write_text(
        '{"version": 2, "added": {}, "removed": [], "associations": {},'
        ' "options": {"i-0aaaaaaaaaaaaaaaa": {"hop_limit": 0}}}'
    )
    expected = f"imdsd: {state / 'state.json'}: options.i-0aaaaaaaaaaaaaaaa.hop_limit: got 0; allowed: an integer from 1 to 64\n"
    for verb in ("check-config", "run"):
        done = subprocess.run([sys.executable, "-m", "imdsd", verb, "--config", str(config)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert (done.returncode, done.stderr, done.stdout) == (3, expected, ""), verb


def test_every_verb_and_option_has_help() -> None:
    """Every subcommand at every depth, and every option and argument, says what it is for."""
    from imdsd.cli import _parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, where: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, child in action.choices.items():
                    if not helps.get(name):
                        missing.append(f"{where} {name}")
                    walk(child, f"{where} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")

    walk(_parser(), "imdsd")
    assert missing == []


def test_help_and_admin_verbs_load_neither_the_daemon_nor_botocore() -> None:
    """`imdsd --help` and an admin verb import neither imdsd.daemon, botocore, aiohttp nor gRPC, so
    they start fast (the daemon's imports cost half a second)."""
    code = (
        "import sys; from imdsd.cli import main\n"
        "try:\n    main(['status', '--socket', '/nonexistent/admin.sock'])\nexcept SystemExit: pass\n"
        "print(sorted(m for m in ('imdsd.daemon', 'botocore', 'aiohttp', 'grpc', 'aetcd') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_identity_files_are_checked(tmp_path: Path) -> None:
    """check-config loads the [identity] key and certificate: a missing file is one line naming
    identity.key_file, exit 3; identity certificate prints nothing without a key yet (exit 1)."""
    text = (
        config_text()
        + f'[identity]\nkey_file = "{tmp_path}/no-key.pem"\ncertificate_file = "{tmp_path}/no-cert.pem"\n'
    )
    config = write(tmp_path, text)
    done = subprocess.run([sys.executable, "-m", "imdsd", "check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 3
    assert done.stderr.startswith(
        f"imdsd: identity.key_file: got {tmp_path}/no-key.pem (FileNotFoundError)"
    )
    fresh = write(tmp_path, config_text())
    none = subprocess.run([sys.executable, "-m", "imdsd", "identity", "certificate", "--config", str(fresh)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert none.returncode == 1 and "no identity certificate yet" in none.stderr
