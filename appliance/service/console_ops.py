"""Reads the operator console needs and the CLI did not: who am I here, a run's metrics, a stage's log.

Each is authorized like its neighbours (`service.info`, `run.show`) and recorded. They read
what the service already holds: the caller's grants under the signed policy, the ``metrics``
view of the ledger (signed ``metrics.recorded`` events), and a stage's ``job.log`` in the
run's work folder (the tail only, bounded).
"""

from __future__ import annotations

import shutil
from typing import Any

from airgap import netinfo
from appliance.jobs.runner import LOG
from appliance.service.caller import Caller
from appliance.service.resolve import resolve_run
from keys.errors import ApplianceError

MAX_LOG_LINES = 2000
MAX_POINTS = 20_000


def whoami(svc: Any, caller: Caller) -> dict[str, Any]:
    """The caller's roles and permissions (and which of them need a second person), the home's free disk."""
    svc.authorize(caller, "service.info", "service")
    policy = svc.policy
    permissions = sorted(policy.permissions_of(caller.user, caller.groups))
    everything = {p for _, granted in policy.table() for p in granted}
    usage = shutil.disk_usage(svc.home.root)
    return {
        "user": caller.user,
        "groups": list(caller.groups),
        "roles": list(policy.roles_of(caller.user, caller.groups)),
        "permissions": permissions,
        "two_person": sorted(p for p in permissions if policy.two_person(p) is not None),
        # Requests under a two-person rule this caller may decide (the approvals screen's "decide").
        "may_approve": sorted(p for p in everything if policy.two_person(p) is not None and policy.may_approve(caller.user, caller.groups, p)),
        # Which roles grant each permission: what a disabled control tells the user to ask for.
        "granting": {p: list(policy.granting(p)) for p in sorted(everything)},
        "policy_version": policy.version,
        "policy_digest": policy.digest,
        "disk": {"free": usage.free, "total": usage.total},
        # The host's side of the air gap, as `appliance airgap check` reads it (a default route warns).
        "default_routes": netinfo.default_routes(),
    }


def metrics(svc: Any, caller: Caller, *, run: str, since: int = -1) -> dict[str, Any]:
    """A run's training metrics after step ``since``: {name: [[step, value], …]} from the signed ledger."""
    svc.authorize(caller, "run.show", run)
    run_id = resolve_run(svc.ledger, run)
    rows = svc.ledger.select(
        "SELECT stage, step, name, value FROM metrics WHERE run_id = ? AND step > ? ORDER BY step, name LIMIT ?",
        [run_id, since, MAX_POINTS],
    )
    series: dict[str, list[list[float]]] = {}
    last = since
    for stage, step, name, value in rows:
        series.setdefault(str(name), []).append([int(step), float(value)])
        last = max(last, int(step))
    return {"run_id": run_id, "series": series, "last_step": last, "stages": sorted({str(r[0]) for r in rows})}


def log_tail(svc: Any, caller: Caller, *, run: str, stage: str, lines: int = 200) -> dict[str, Any]:
    """The last ``lines`` lines of a stage's job log."""
    svc.authorize(caller, "run.show", run)
    run_id = resolve_run(svc.ledger, run)
    if "/" in stage or stage.startswith("."):
        raise ApplianceError(f"{stage!r} is not a stage name", "give a stage of the run, e.g. train (`appliance runs show RUN` lists them)")
    base = svc.home.work_dir / run_id / stage
    # Training writes its log in the stage's folder; the other stages' jobs in <stage>/job/.
    path = next((p for p in (base / LOG, base / "job" / LOG) if p.is_file()), base / LOG)
    lines = max(1, min(int(lines), MAX_LOG_LINES))
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - lines * 400))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return {"run_id": run_id, "stage": stage, "lines": [], "note": f"stage {stage} of run {run_id} has no job log (it ran in the service, or not yet)"}
    return {"run_id": run_id, "stage": stage, "lines": text.splitlines()[-lines:], "note": ""}
