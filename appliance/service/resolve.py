"""The one resolver of run ids and digests, and the service's other internal ledger reads.

Every lookup here is parameterised SQL on the ledger's own views (`Ledger.select`): nothing
a caller typed is ever pasted into a statement. Auditor SQL is a different path entirely
(the sandbox, `Ledger.query`).
"""

from __future__ import annotations

import re
from typing import Any

from keys.errors import ApplianceError
from registry.errors import LedgerError, StoreError
from registry.ledger import Event, Ledger

_RUN_ID = re.compile(r"[A-Za-z0-9_.:-]{1,80}")
_HEX = re.compile(r"[0-9a-f]{8,64}")


def resolve_run(ledger: Ledger, ref: str) -> str:
    """The one recorded run whose id is or starts with ``ref``; ``latest`` is the newest."""
    if ref == "latest":
        rows = ledger.select("SELECT run_id FROM runs ORDER BY started_seq DESC LIMIT 1")
        if not rows:
            raise ApplianceError("the ledger records no runs yet", "start one with `appliance run RECIPE` or `appliance demo`")
        return str(rows[0][0])
    if not isinstance(ref, str) or not _RUN_ID.fullmatch(ref):
        raise ApplianceError(f"'{ref}' is not a run id", "copy it from the run summary or `appliance runs list`")
    rows = ledger.select("SELECT run_id FROM runs WHERE starts_with(run_id, ?) ORDER BY run_id", [ref])
    if not rows:
        raise ApplianceError(f"no run with id {ref}", "list runs with `appliance runs list`")
    if len(rows) > 1:
        raise ApplianceError(f"{len(rows)} runs start with {ref}", "give more of the id")
    return str(rows[0][0])


def resolve_digest(ledger: Ledger, prefix: str, *, kind: str | None = None) -> str:
    """The full digest of the one recorded artifact (of ``kind``) whose digest starts with ``prefix``."""
    cleaned = str(prefix).removeprefix("sha256:").lower()
    if not _HEX.fullmatch(cleaned):
        raise StoreError(f"'{prefix}' is not a digest or digest prefix (8 to 64 hex digits)", "copy the id from `appliance artifact list`")
    if kind is None:
        rows = ledger.select("SELECT DISTINCT digest FROM artifacts WHERE starts_with(digest, ?)", [cleaned])
    else:
        rows = ledger.select("SELECT DISTINCT digest FROM artifacts WHERE starts_with(digest, ?) AND kind = ?", [cleaned, kind])
    if not rows:
        listing = "`appliance model list`" if kind == "model" else "`appliance artifact list`"
        raise StoreError(f"no recorded {kind or 'artifact'} has a digest starting with {cleaned}", f"list them with {listing}")
    if len(rows) > 1:
        raise StoreError(f"{len(rows)} artifacts start with {cleaned}", "give more digits")
    return str(rows[0][0])


def run_status(ledger: Ledger, run_id: str) -> str:
    rows = ledger.select("SELECT status FROM runs WHERE run_id = ?", [run_id])
    return str(rows[0][0]) if rows else "unknown"


def run_rows(ledger: Ledger) -> list[dict[str, Any]]:
    """Every run, oldest first: id, recipe, status, who started it, when, error."""
    cols = ["run_id", "recipe_name", "recipe_digest", "actor", "started_ts", "status", "error", "finished_ts"]
    rows = ledger.select(f"SELECT {', '.join(cols)} FROM runs ORDER BY started_seq")
    return [dict(zip(cols, r, strict=True)) for r in rows]


def run_event(ledger: Ledger, kind: str, run_id: str, *, stage: str | None = None, last: bool = True) -> Event | None:
    """The first (or last) event of ``kind`` for a run (and stage), or None."""
    order = "DESC" if last else "ASC"
    if stage is None:
        seqs = ledger.select(f"SELECT seq FROM events WHERE kind = ? AND body ->> '$.data.run_id' = ? ORDER BY seq {order} LIMIT 1", [kind, run_id])
    else:
        seqs = ledger.select(
            f"SELECT seq FROM events WHERE kind = ? AND body ->> '$.data.run_id' = ? AND body ->> '$.data.stage' = ? ORDER BY seq {order} LIMIT 1",
            [kind, run_id, stage],
        )
    return ledger.event(int(seqs[0][0])) if seqs else None


def run_started(ledger: Ledger, run_id: str) -> dict[str, Any]:
    event = run_event(ledger, "run.started", run_id, last=False)
    if event is None:
        raise LedgerError(f"the ledger has no run.started event for run {run_id}", "list runs with `appliance runs list`")
    return dict(event.data)


def run_events(ledger: Ledger, run_id: str) -> list[Event]:
    """Every event of one run, in order."""
    seqs = ledger.select("SELECT seq FROM events WHERE body ->> '$.data.run_id' = ? ORDER BY seq", [run_id])
    return [ledger.event(int(s)) for (s,) in seqs]


def finished_stages(ledger: Ledger, run_id: str) -> set[str]:
    rows = ledger.select("SELECT DISTINCT stage FROM stages WHERE run_id = ? AND status = 'finished'", [run_id])
    return {str(r[0]) for r in rows}


def stage_artifacts(ledger: Ledger, run_id: str, stage: str) -> list[dict[str, Any]]:
    """The data of every artifact.recorded event of one run's stage, in order."""
    seqs = ledger.select(
        "SELECT seq FROM events WHERE kind = 'artifact.recorded' AND body ->> '$.data.run_id' = ? AND body ->> '$.data.stage' = ? ORDER BY seq",
        [run_id, stage],
    )
    return [dict(ledger.event(int(s)).data) for (s,) in seqs]


def run_artifact_digest(ledger: Ledger, run_id: str, kind: str) -> str | None:
    """The newest artifact of ``kind`` a run recorded (e.g. its dataset card), or None."""
    rows = ledger.select("SELECT digest FROM artifacts WHERE run_id = ? AND kind = ? ORDER BY seq DESC LIMIT 1", [run_id, kind])
    return str(rows[0][0]) if rows else None


def checkpoint_saved(ledger: Ledger, run_id: str, step: int) -> dict[str, Any] | None:
    """The data of this run's ``checkpoint.saved`` event for ``step``, if the ledger has one."""
    seqs = ledger.select(
        "SELECT seq FROM events WHERE kind = 'checkpoint.saved' AND body ->> '$.data.run_id' = ? AND CAST(body ->> '$.data.step' AS BIGINT) = ? "
        "ORDER BY seq DESC LIMIT 1",
        [run_id, int(step)],
    )
    return dict(ledger.event(int(seqs[0][0])).data) if seqs else None
