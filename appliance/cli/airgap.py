"""`appliance airgap check`: is this machine air-gapped, and do jobs run behind the guard?"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from appliance.cli.common import connect, emit


def job_probe() -> dict[str, Any] | None:
    """What a real job process sees: started as the job runner starts jobs (its environment, airgap.run)."""
    from appliance.jobs.launch import LaunchOptions
    from appliance.jobs.runner import job_env

    done = subprocess.run(
        [sys.executable, "-m", "airgap.run", "airgap.selftest"], env=job_env(LaunchOptions()), capture_output=True, text=True, timeout=120, check=False
    )
    try:
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return None


def cmd_airgap_check(args: argparse.Namespace) -> int:
    """Check the air gap: the egress guard in jobs (a real probe) and the service, hub switches, proxies, default route, packages."""
    from airgap.attest import environment_attestation
    from airgap.check import overall, verdicts

    service_guard = None
    if getattr(args, "socket", None) or os.environ.get("APPLIANCE_SOCKET"):
        with connect(args) as client:
            service_guard = bool(client.call("service.info").get("egress_guard"))
    att = environment_attestation()
    items = verdicts(att, job_probe(), service_guard)
    verdict = overall(items)
    width = max(len(i.name) for i in items)
    lines = [f"{i.verdict.upper():<5} {i.name:<{width}}  {i.detail}" + (f"\n      fix: {i.fix}" if i.fix else "") for i in items]
    emit(args, {"verdict": verdict, "items": [i.as_dict() for i in items], "attestation": att}, "\n".join(lines) + f"\nverdict: {verdict}")
    return 1 if verdict == "fail" else 0


def register(sub: Any, add: Any) -> None:
    group = sub.add_parser("airgap", help="the air gap: checks").add_subparsers(dest="airgap_command", required=True, metavar="COMMAND")
    add("check", cmd_airgap_check, group)
