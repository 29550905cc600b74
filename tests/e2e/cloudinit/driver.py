"""cloud-init's own EC2 datasource against a live daemon, as a booting guest runs it.

Run by the SYSTEM python (`/usr/bin/python3`: Debian's cloud-init package lives in its
dist-packages, not in the project's venv), inside the guest's network namespace, so that
cloud-init's `net.get_interfaces_by_mac()` sees the guest's NIC:

    ip netns exec NS /usr/bin/python3 driver.py http://169.254.X.1:PORT

It builds `DataSourceEc2` with a temporary `Paths`, `metadata_urls` pointed at the daemon and
the SMBIOS read replaced by an EC2 one (uuid and serial starting "ec2", as on EC2's Xen and
Nitro instances: cloud-init's platform check then names the cloud "aws" and takes IMDSv2),
calls `get_data()` and reads what a boot reads next (`network_config`, the SSH keys), then
prints one JSON object: what cloud-init got, every HTTP request it made, and the
instance-data.json it wrote (world-readable on a guest).
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# What EC2's firmware says (the uuid and the serial are the same, lowercase "ec2" first).
EC2_UUID = "ec2e1916-9099-7caf-fd21-012345678901"
TOKEN_HEADER = "X-aws-ec2-metadata-token"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the daemon as the guest reaches it: http://ADDRESS:PORT")
    parser.add_argument("--smbios-uuid", default=EC2_UUID, help="system uuid and serial to report")
    parser.add_argument("--max-wait", type=int, default=10, help="seconds to wait for the service")
    parser.add_argument("--debug", action="store_true", help="cloud-init's debug log on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.debug else logging.WARNING)

    # Imported by name: this file is type-checked in the venv, where cloud-init is absent.
    dmi: Any = importlib.import_module("cloudinit.dmi")
    distros: Any = importlib.import_module("cloudinit.distros")
    helpers: Any = importlib.import_module("cloudinit.helpers")
    net: Any = importlib.import_module("cloudinit.net")
    version: Any = importlib.import_module("cloudinit.version")
    ec2: Any = importlib.import_module("cloudinit.sources.DataSourceEc2")
    requests: Any = importlib.import_module("requests")

    smbios = {
        "system-uuid": args.smbios_uuid,
        "system-serial-number": args.smbios_uuid,
        "system-manufacturer": "Amazon EC2",
        "system-product-name": "m5.large",
        "chassis-asset-tag": "Amazon EC2",
    }
    dmi.read_dmi_data = smbios.get  # what DataSourceEc2._collect_platform_data reads

    # Every HTTP request cloud-init makes goes through requests.Session.request (url_helper's
    # readurl and wait_for_url, retries included): record each one as the daemon saw it.
    sent: list[dict[str, Any]] = []
    real_request = requests.Session.request

    def recorded(session: Any, method: str, url: str, *rest: Any, **kwargs: Any) -> Any:
        headers = kwargs.get("headers") or {}
        entry: dict[str, Any] = {"method": method, "path": urlsplit(url).path, "status": None,
                                 "token": TOKEN_HEADER in headers}  # fmt: skip
        sent.append(entry)
        response = real_request(session, method, url, *rest, **kwargs)
        entry["status"] = response.status_code
        return response

    requests.Session.request = recorded

    with tempfile.TemporaryDirectory(prefix="cloudinit-e2e-") as scratch:
        paths = helpers.Paths(
            {"cloud_dir": f"{scratch}/var/lib/cloud", "run_dir": f"{scratch}/run/cloud-init"}
        )
        sys_cfg = {
            "datasource": {
                "Ec2": {
                    "metadata_urls": [args.url],
                    "max_wait": args.max_wait,
                    "timeout": 5,
                    "retries": 2,
                }
            }
        }
        distro = distros.fetch("debian")("debian", {}, paths)
        ds = ec2.DataSourceEc2(sys_cfg, distro, paths)

        success = bool(ds.get_data())
        crawls_in_get_data = _crawls(sent)
        out: dict[str, Any] = {
            "cloudinit_version": version.version_string(),
            "cloud_name": ds.cloud_name,
            "success": success,
            "metadata_address": ds.metadata_address,
            "interfaces_by_mac": net.get_interfaces_by_mac(),
        }
        if success:
            # What a boot asks next; on "aws" a metadata without `network` makes this property
            # crawl the whole tree again (cloud-init's "stale metadata from prior to upgrade").
            network_config = ds.network_config
            ds.persist_instance_data(write_cache=False)
            userdata = ds.userdata_raw
            if isinstance(userdata, str):
                userdata = userdata.encode()
            run = Path(paths.run_dir)
            out |= {
                "instance_id": ds.get_instance_id(),
                "metadata": ds.metadata,
                "identity": ds.identity,
                "userdata_raw": base64.b64encode(userdata or b"").decode(),
                "public_ssh_keys": ds.get_public_ssh_keys(),
                "fallback_interface": ds.fallback_interface,
                "network_config": network_config,
                "instance_data": (run / "instance-data.json").read_text(),
                "instance_data_mode": oct((run / "instance-data.json").stat().st_mode & 0o777),
            }
        out["crawls_in_get_data"] = crawls_in_get_data
        out["crawls"] = _crawls(sent)
        out["requests"] = sent
    json.dump(out, sys.stdout, default=str, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def _crawls(sent: list[dict[str, Any]]) -> int:
    """How many times the meta-data tree was walked: each walk starts at `/VERSION/meta-data/`."""
    return sum(1 for r in sent if r["method"] == "GET" and r["path"].endswith("/meta-data/"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
