"""Read-only views of a run's data stages for data stewards: dataset card, dropped samples, skips.

Each reads a stored artifact only after checking it (digest, signature, ledger record), so
what a steward is shown is what the ledger proves the run produced.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from appliance.audit import query, verify_artifact
from appliance.home import Home
from keys.errors import ApplianceError
from registry.errors import StoreError
from registry.store import Store

_RUN_ID = re.compile(r"[A-Za-z0-9_.:-]{4,80}")


def resolve_run(home: Home, run: str) -> str:
    """The one recorded run whose id is or starts with ``run``; ``latest`` is the newest."""
    home.require()
    if run == "latest":
        _, rows = query(home, "SELECT run_id FROM runs ORDER BY started_seq DESC LIMIT 1")
        if not rows:
            raise ApplianceError("the ledger records no runs yet", "start one with `appliance run RECIPE` or `appliance demo`")
        return rows[0][0]
    if not _RUN_ID.fullmatch(run):
        raise ApplianceError(f"'{run}' is not a run id", 'copy it from the run summary or `appliance ledger query "SELECT * FROM runs"`')
    _, rows = query(home, f"SELECT run_id FROM runs WHERE run_id LIKE '{run}%' ORDER BY run_id")
    if not rows:
        raise ApplianceError(f"no run with id {run}", 'list runs with `appliance ledger query "SELECT run_id, status FROM runs"`')
    if len(rows) > 1:
        raise ApplianceError(f"{len(rows)} runs start with {run}", "give more of the id")
    return rows[0][0]


def run_artifact(home: Home, run_id: str, kind: str, *, keys: Sequence[Path] = ()) -> Path:
    """The verified stored path of the run's artifact of ``kind`` (e.g. ``dataset-card``)."""
    _, rows = query(home, f"SELECT digest FROM artifacts WHERE run_id = '{run_id}' AND kind = '{kind}' ORDER BY seq DESC LIMIT 1")
    if not rows:
        raise StoreError(
            f"run {run_id} recorded no {kind} artifact",
            'the run may have failed before that stage (see `appliance ledger query "SELECT * FROM stages"`), '
            "or it ran before the appliance produced this artifact",
        )
    digest = rows[0][0]
    verify_artifact(home, digest, keys=keys)
    return Store(home.store_dir).path_of(digest)


def dataset_card(home: Home, run: str, *, keys: Sequence[Path] = ()) -> tuple[dict[str, Any], str]:
    """(card JSON, card Markdown) of a run."""
    run_id = resolve_run(home, run)
    folder = run_artifact(home, run_id, "dataset-card", keys=keys)
    card = json.loads((folder / "dataset_card.json").read_text(encoding="utf-8"))
    return card, (folder / "dataset_card.md").read_text(encoding="utf-8")


def dropped_documents(
    home: Home, run: str, *, filter_name: str | None, rule: str | None, limit: int, keys: Sequence[Path] = ()
) -> tuple[str, list[dict[str, Any]], dict[str, int]]:
    """(run id, sample rows, drop count per "filter.rule") for one filter (or all)."""
    run_id = resolve_run(home, run)
    path = run_artifact(home, run_id, "dropped-samples", keys=keys)
    rows = pq.read_table(path).to_pylist()
    _, counts = query(home, f"SELECT filter, rule, documents FROM data_drops WHERE run_id = '{run_id}' ORDER BY filter, rule")
    totals = {f"{f}.{r}": int(n) for f, r, n in counts}
    known = sorted({name.split(".", 1)[0] for name in totals})
    if filter_name is not None and filter_name not in known:
        raise ApplianceError(
            f"run {run_id} has no drops by a filter named '{filter_name}'",
            f"filters that dropped documents in this run: {', '.join(known) or 'none'}",
        )
    picked = [r for r in rows if (filter_name is None or r["filter"] == filter_name) and (rule is None or r["rule"] == rule)]
    return run_id, picked[:limit], {k: v for k, v in totals.items() if filter_name is None or k.startswith(filter_name + ".")}


def skipped_files(home: Home, run: str) -> tuple[str, list[dict[str, Any]]]:
    """(run id, one row per source file that lost documents at ingest, with its reasons)."""
    run_id = resolve_run(home, run)
    columns, rows = query(
        home,
        f"SELECT path, sha256, whole_file, records_skipped, reasons FROM skipped WHERE run_id = '{run_id}' ORDER BY path",
    )
    out = []
    for row in rows:
        item = dict(zip(columns, row))
        item["reasons"] = json.loads(item["reasons"]) if isinstance(item["reasons"], str) else item["reasons"]
        out.append(item)
    return run_id, out
