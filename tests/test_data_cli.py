"""The data steward's commands on a finished run: dataset card, dropped samples, skipped files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.slow


def test_card_matches_the_ledger(finished_run: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, summary = finished_run
    code, out, err = cli(capsys, "--home", str(home), "data", "card", summary.run_id[:12], "--json")  # type: ignore[attr-defined]
    assert code == 0, err
    card = json.loads(out)
    stats = summary.stats  # type: ignore[attr-defined]
    assert card["curation"]["documents_out"] == stats["curate"]["documents_out"]
    assert card["tokens"]["train"] == stats["shard"]["train_tokens"]
    assert card["curation"]["dropped_by_rule"] == stats["curate"]["dropped"]
    assert sum(s["documents_in"] for s in card["curation"]["by_source"].values()) == card["curation"]["documents_in"]
    code, md, _ = cli(capsys, "--home", str(home), "data", "card", "latest")
    assert code == 0 and md.startswith("# Dataset card") and "## Duplicates" in md


def test_dropped_samples_per_filter(finished_run: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, summary = finished_run
    dropped = summary.stats["curate"]["dropped"]  # type: ignore[attr-defined]
    name = next(iter(sorted(dropped)))
    flt = name.split(".")[0]
    code, out, err = cli(capsys, "--home", str(home), "data", "dropped", "latest", "--filter", flt, "--json", "--limit", "3")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["dropped"][name] == dropped[name]
    assert 1 <= len(payload["samples"]) <= 3
    assert all(s["filter"] == flt and s["text"] for s in payload["samples"])
    code, out, _ = cli(capsys, "--home", str(home), "data", "dropped", "latest", "--filter", flt)
    assert code == 0 and f"{flt}." in out
    code, _, err = cli(capsys, "--home", str(home), "data", "dropped", "latest", "--filter", "nonsense")
    assert code == 2 and "no drops by a filter named 'nonsense'" in err and flt in err


def test_ledger_views_for_auditors(finished_run: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, summary = finished_run
    code, out, err = cli(capsys, "--home", str(home), "ledger", "query", "SELECT filter, rule, documents FROM data_drops", "--json")
    assert code == 0, err
    drops = {f"{r['filter']}.{r['rule']}": r["documents"] for r in json.loads(out)}
    assert drops == summary.stats["curate"]["dropped"]  # type: ignore[attr-defined]
    code, out, _ = cli(
        capsys,
        "--home",
        str(home),
        "ledger",
        "query",
        "SELECT kind FROM artifacts WHERE kind IN ('dataset-card', 'curation-report', 'dropped-samples', 'ingest-report')",
        "--json",
    )
    assert sorted(r["kind"] for r in json.loads(out)) == ["curation-report", "dataset-card", "dropped-samples", "ingest-report"]
    # The card descends from the curation report, which descends from the raw documents.
    code, out, _ = cli(
        capsys, "--home", str(home), "ledger", "query", "SELECT a.kind FROM artifacts c, ancestors(c.digest) a WHERE c.kind = 'dataset-card'", "--json"
    )
    kinds = {r["kind"] for r in json.loads(out)}
    assert {"curation-report", "raw-documents", "token-shards", "source"} <= kinds
