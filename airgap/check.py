"""`appliance airgap check`: the environment attestation as a report, one verdict per item.

pass / warn / fail / info. A default route warns (a head node that is air-gapped has none);
the guard missing from jobs, or not refusing, fails; so does a proxy or a hub switch missing in
a job. What a job sees comes from a real job process (`airgap.selftest` run the way jobs run).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from airgap.attest import OFFLINE_ENV


@dataclass(frozen=True)
class Item:
    name: str
    verdict: str  # pass | warn | fail | info
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def verdicts(att: dict[str, Any], probe: dict[str, Any] | None, service_guard: bool | None) -> list[Item]:
    """The report's items from an attestation, a job probe's report, and the service's guard (None: not asked)."""
    items = [
        Item("python", "info", f"{att['implementation']} {att['python']} on {att['platform']} ({att['machine']})"),
        _packages(att),
    ]
    if probe is None:
        items.append(Item("egress guard in jobs", "fail", "the job probe did not run", "run `python -m airgap.run airgap.selftest` and read its error"))
    else:
        works = probe.get("guard") and probe.get("refuses_lookup") and probe.get("refuses_connect")
        items.append(
            Item(
                "egress guard in jobs",
                "pass" if works else "fail",
                "installed; refuses a name lookup and a connection to 127.0.0.2" if works else f"guard {probe}",
                "" if works else "jobs must start through `python -m airgap.run` (the job runner does); reinstall the appliance",
            )
        )
        missing = [k for k, v in OFFLINE_ENV.items() if (probe.get("offline_env") or {}).get(k) != v]
        items.append(
            Item(
                "hub and telemetry switches in jobs",
                "fail" if missing else "pass",
                f"not set: {', '.join(missing)}" if missing else ", ".join(f"{k}={v}" for k, v in OFFLINE_ENV.items()),
                "jobs must start through `python -m airgap.run`" if missing else "",
            )
        )
        proxies = probe.get("proxies") or []
        items.append(
            Item(
                "proxies in jobs",
                "fail" if proxies else "pass",
                f"set: {', '.join(proxies)}" if proxies else "none",
                "jobs must start through `python -m airgap.run`" if proxies else "",
            )
        )
    if service_guard is None:
        items.append(Item("egress guard in the service", "info", "not asked: no service socket given (local mode guards jobs, not this process)"))
    else:
        items.append(
            Item(
                "egress guard in the service",
                "pass" if service_guard else "fail",
                "installed in `appliance serve`" if service_guard else "the service runs without it",
                "" if service_guard else "restart the service with this version (`appliance serve` installs it)",
            )
        )
    routes = att.get("default_route")
    if routes is None:
        items.append(Item("default route", "warn", "the kernel's route tables could not be read", "check /proc/net/route"))
    elif routes:
        shown = "; ".join(f"{r['family']} via {r['via']} on {r['interface']}" for r in routes)
        items.append(
            Item(
                "default route",
                "warn",
                shown,
                "an air-gapped head node needs no default route: remove it (`ip route del default`), keep the cluster's own subnet",
            )
        )
    else:
        items.append(Item("default route", "pass", "none"))
    ifaces = att.get("interfaces_up")
    if ifaces is not None:
        items.append(Item("interfaces up", "info", ", ".join(f"{i['name']} ({i['state']})" for i in ifaces) or "none"))
    allowed = (att.get("egress_guard") or {}).get("allowed") or []
    items.append(Item("allowed addresses", "info", ", ".join(allowed)))
    return items


def _packages(att: dict[str, Any]) -> Item:
    n, bundled = att["packages"], att.get("from_bundle", 0)
    if bundled and bundled == n:
        return Item("packages", "pass", f"{n} installed, every one from a signed offline bundle (wheel sha256 recorded)")
    if bundled:
        return Item("packages", "warn", f"{n} installed, {bundled} from a signed offline bundle", "install into a fresh environment from the bundle alone")
    return Item(
        "packages",
        "warn",
        f"{n} installed, none from a signed offline bundle",
        "install into a fresh environment from a signed offline wheel bundle: `appliance airgap bundle` on a connected machine, `install.sh` on this one (README: Installing on an air-gapped head node)",
    )


def overall(items: list[Item]) -> str:
    kinds = {i.verdict for i in items}
    return "fail" if "fail" in kinds else "warn" if "warn" in kinds else "pass"
