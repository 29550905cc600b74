"""The shipped unit: valid for systemd, hardened to 2.0 or lower, and saying what the daemon does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # systemd-analyze on the unit files

UNIT = Path(__file__).parents[1] / "systemd" / "imdsd.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_unit_says_what_the_daemon_does() -> None:
    """Type=notify with a watchdog, check-config before start, reload by SIGHUP, no restart on
    a bad config (exit 3), the three directories, and CAP_NET_BIND_SERVICE alone."""
    d = directives()
    assert d["Type"] == ["notify"] and d["WatchdogSec"]
    assert d["ExecStartPre"] == [
        "/opt/imdsd/current/bin/imdsd check-config --config /etc/imdsd/imdsd.toml"
    ]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert (d["Restart"], d["RestartPreventExitStatus"]) == (["on-failure"], ["3"])
    assert d["StateDirectory"] == d["RuntimeDirectory"] == d["ConfigurationDirectory"] == ["imdsd"]
    assert d["CapabilityBoundingSet"] == d["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert d["LimitNOFILE"] == ["65536"]  # explicit: systemd's default soft limit is 1024


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed")
@pytest.mark.parametrize("name", ["nftables-imdsd.nft", "nftables-imdsd-tenants.nft"])
def test_nftables_example_parses(name: str) -> None:
    """The host wiring examples are valid nftables (checked by `nft --check`, nothing loaded):
    the bridge host's, and the multi-tenant host's that keeps guest devices to the metadata
    port."""
    example = UNIT.parents[1] / "config" / name
    done = subprocess.run(
        ["nft", "--check", "-f", str(example)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (ExecStart pointed at an imdsd that exists here)."""
    unit = tmp_path / "imdsd.service"
    imdsd = Path(sys.executable).with_name("imdsd")
    unit.write_text(UNIT.read_text().replace("/opt/imdsd/current/bin/imdsd", str(imdsd)))
    done = subprocess.run(
        [str(ANALYZE), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "imdsd.service" not in done.stderr, done.stderr


@needs_analyze
def test_unit_exposure_is_at_most_2() -> None:
    """`systemd-analyze security` rates the unit 2.0 or lower (the README prints the figure)."""
    done = subprocess.run([str(ANALYZE), "security", "--offline=true", str(UNIT)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    match = re.search(r"Overall exposure level for imdsd\.service: (\d+\.\d)", done.stdout)
    assert match is not None, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0
    readme = (UNIT.parents[1] / "README.md").read_text()
    assert f"rates the unit **{match.group(1)}**" in readme


def test_install_system_into_a_staging_root(tmp_path: Path) -> None:
    """`make install-system DESTDIR=...`: a versioned venv with a `current` link, the unit whose
    ExecStart is that venv's imdsd, sysusers and tmpfiles entries, and a starter config that
    the installed imdsd accepts; a second install (an upgrade) keeps an edited config. The
    installed unit passes `systemd-analyze verify` and rates 2.0 or lower."""
    root = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(root), "PYTHON": sys.executable}
    done = subprocess.run(["make", "-s", "install-system"], cwd=UNIT.parents[1], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    version = re.search(
        r'__version__ = "(.+)"', (UNIT.parents[1] / "imdsd" / "__init__.py").read_text()
    )
    assert version is not None
    assert os.readlink(root / "opt/imdsd/current") == version.group(1)
    imdsd = root / "opt/imdsd/current/bin/imdsd"
    config = root / "etc/imdsd/imdsd.toml"
    assert (config.stat().st_mode & 0o777) == 0o640
    check = subprocess.run(
        [str(imdsd), "check-config", "--config", str(config)], capture_output=True, text=True
    )
    assert check.returncode == 0 and "ok (0 instances" in check.stdout, check.stderr
    assert "u imdsd" in (root / "usr/lib/sysusers.d/imdsd.conf").read_text()
    assert (
        "d /var/lib/imdsd 0750 imdsd imdsd" in (root / "usr/lib/tmpfiles.d/imdsd.conf").read_text()
    )
    unit = root / "etc/systemd/system/imdsd.service"
    assert (
        f"ExecStart={'/opt/imdsd/current/bin/imdsd'} run --config /etc/imdsd/imdsd.toml"
        in unit.read_text()
    )
    config.write_text(config.read_text() + "# edited by the operator\n")
    again = subprocess.run(["make", "-s", "install-system"], cwd=UNIT.parents[1], env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0 and config.read_text().endswith("# edited by the operator\n")
    if ANALYZE is None:
        pytest.skip("systemd-analyze is not installed")
    staged = tmp_path / "imdsd.service"
    staged.write_text(
        unit.read_text().replace("/opt/imdsd/current", str(root / "opt/imdsd/current"))
    )
    verify = subprocess.run(
        [ANALYZE, "verify", str(staged)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and "imdsd.service" not in verify.stderr, verify.stderr
    security = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    rating = re.search(r"Overall exposure level for imdsd\.service: (\d+\.\d)", security.stdout)
    assert rating is not None and float(rating.group(1)) <= 2.0


@needs_analyze
@pytest.mark.parametrize("layout", ["devices.conf", "netns.conf"])
def test_each_layouts_drop_in_verifies_and_rates_at_most_2(tmp_path: Path, layout: str) -> None:
    """Issue 18's least privilege: the unit with a layout's drop-in (device-bound listeners:
    netlink allowed; a namespace per tenant: sockets passed by imdsd-netns@.socket, no
    CAP_SYS_ADMIN) still verifies, with the socket unit, and rates 2.0 or lower."""
    drop_in = (UNIT.parent / "layouts" / layout).read_text()
    granted = [line for line in drop_in.splitlines() if "CAP_" in line and line[0] != "#"]
    assert not any("CAP_SYS_ADMIN" in line or "CAP_NET_RAW" in line for line in granted)
    imdsd = Path(sys.executable).with_name("imdsd")
    merged = tmp_path / "imdsd.service"
    merged.write_text(UNIT.read_text().replace("/opt/imdsd/current/bin/imdsd", str(imdsd))
                      + "\n" + drop_in)  # fmt: skip
    socket_unit = tmp_path / "imdsd-netns@ovnmeta-net7.socket"
    socket_unit.write_text((UNIT.parent / "imdsd-netns@.socket").read_text())
    done = subprocess.run([str(ANALYZE), "verify", str(merged), str(socket_unit)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rated = subprocess.run([str(ANALYZE), "security", "--offline=true", str(merged)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    match = re.search(r"Overall exposure level for imdsd\.service: (\d+\.\d)", rated.stdout)
    assert match is not None and float(match.group(1)) <= 2.0, rated.stdout + rated.stderr
