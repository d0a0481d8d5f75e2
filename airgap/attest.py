"""Environment attestation: what the job ran with, recorded with every run.

Hub libraries are forced offline here so that no code path downloads anything; the egress
guard itself comes with the air-gap work and is reported as absent until then.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from airgap import guard

# Every hub client we might pull in honours one of these; setting them makes a stray
# from_pretrained("name") fail fast instead of reaching for the network.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Proxies would route around the guard's address checks (and name a host outside): cleared.
PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "ALL_PROXY", "NO_PROXY")


def force_offline() -> None:
    """Set the hub and telemetry switches, and clear proxies, in this process and its children."""
    os.environ.update(OFFLINE_ENV)
    for name in PROXY_VARS:
        os.environ.pop(name, None)


def _has_default_route() -> bool | None:
    # /proc/net/route lists the kernel's IPv4 routes; a default route has destination 0.
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    return any(line.split()[1] == "00000000" for line in lines if len(line.split()) > 1)


def package_set() -> list[str]:
    """Installed distributions as sorted ``name==version`` lines."""
    names = {f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]}
    return sorted(names, key=str.lower)


def environment_attestation() -> dict[str, Any]:
    """A JSON-able description of the environment a run used."""
    packages = package_set()
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages_sha256": hashlib.sha256("\n".join(packages).encode()).hexdigest(),
        "packages": len(packages),
        "offline_env": {k: os.environ.get(k) for k in OFFLINE_ENV},
        "default_route": _has_default_route(),
        # Jobs always run behind it (airgap.run); the service process when it is `appliance serve`.
        "egress_guard": {"jobs": True, "service": guard.installed(), "allowed": guard.configured_allow()},
    }
