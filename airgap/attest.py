"""Environment attestation: what a run ran with, recorded (signed) with every run.

Python and platform, every installed distribution (with its wheel's sha256 where an offline
bundle installed it), the egress guard and what it allows, the hub switches, the host's
default routes and interfaces that are up, and the recipe's digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from airgap import guard, netinfo

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


BUNDLE_RECORD = "appliance-bundle.json"  # written into the environment by airgap/install.sh


def _bundle_hashes() -> dict[tuple[str, str], str]:
    """Wheel sha256 by (normalised distribution name, version), where this environment was installed from a bundle."""
    try:
        record = json.loads((Path(sys.prefix) / BUNDLE_RECORD).read_text(encoding="utf-8"))
        return {(_norm(w["name"]), str(w.get("version"))): w["sha256"] for w in record.get("wheels", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def packages() -> list[dict[str, str]]:
    """Installed distributions: name, version, and the wheel's sha256 where a bundle installed it."""
    hashes = _bundle_hashes()
    seen: dict[str, dict[str, str]] = {}
    for d in metadata.distributions():
        name = d.metadata["Name"]
        if not name:
            continue
        entry = {"name": name, "version": d.version}
        # By name and version: a distribution upgraded since, by other means, is not the bundle's.
        if (digest := hashes.get((_norm(name), d.version))) is not None:
            entry["wheel_sha256"] = digest
        seen[_norm(name)] = entry
    return [seen[k] for k in sorted(seen)]


def package_set() -> list[str]:
    """Installed distributions as sorted ``name==version`` lines."""
    return [f"{p['name']}=={p['version']}" for p in packages()]


def environment_attestation(*, recipe_digest: str | None = None) -> dict[str, Any]:
    """What a run ran with, for its signed ``run.started`` event (and `appliance airgap check`)."""
    pkgs = packages()
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages_sha256": hashlib.sha256("\n".join(f"{p['name']}=={p['version']}" for p in pkgs).encode()).hexdigest(),
        "packages": len(pkgs),
        "package_list": pkgs,
        "from_bundle": sum(1 for p in pkgs if "wheel_sha256" in p),
        # What every job runs with (airgap.run sets them, whatever the service's own environment).
        "offline_env_in_jobs": dict(OFFLINE_ENV),
        "proxies_in_jobs": "cleared",
        "default_route": netinfo.default_routes(),
        "interfaces_up": netinfo.interfaces_up(),
        # Jobs always run behind it (airgap.run); the service process when it is `appliance serve`.
        "egress_guard": {"jobs": True, "service": guard.installed(), "allowed": guard.configured_allow()},
        "recipe_digest": recipe_digest,
    }
