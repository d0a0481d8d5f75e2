"""Dataset card: what went into the training data and what was taken out, JSON + Markdown.

Built from the reports the data stages wrote (ingest, curation) and the shard manifest, so
every figure in it is one a stage measured; the service records the card as an artifact
whose lineage points at those reports. The JSON is for tools, the Markdown for people.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from keys.digest import sha256_file
from keys.files import atomic_write_text
from pipeline.errors import DataError
from pipeline.result import StageResult, write_json
from pipeline.shard_format import MANIFEST

CARD_VERSION = "appliance-dataset-card/v1"


def write_ingest_report(result: StageResult, out_dir: Path) -> Path:
    """The ingest stage's figures and every skipped file, as a file the card (and an auditor) can read."""
    return write_json(Path(out_dir) / "ingest_report.json", {"stats": result.stats, "skipped": result.skipped})


def _load(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the {what} {path}: {exc}", "re-run the stage that writes it") from None


def build_card(ingest_report: Path, curation_report: Path, shards_dir: Path) -> dict[str, Any]:
    """The card as a dict (see ``run_card`` for the files)."""
    ingest = _load(ingest_report, "ingest report")
    curation = _load(curation_report, "curation report")
    # Counts from the manifest alone: the service verified every shard when it stored them,
    # and re-hashing gigabytes of shards for a few numbers would double the stage's I/O.
    manifest = _load(Path(shards_dir) / MANIFEST, "shard manifest")
    tokens = {split: sum(int(e["tokens"]) for e in manifest.get("shards", []) if e.get("split") == split) for split in ("train", "val")}
    stats = ingest.get("stats", {})
    return {
        "card": CARD_VERSION,
        "sources": {
            "files": stats.get("files", 0),
            "files_read": stats.get("files_read", 0),
            "files_skipped": stats.get("files_skipped", 0),
            "records_skipped": stats.get("records_skipped", 0),
            "skipped_by_reason": stats.get("skipped_by_reason", {}),
            "by_format": stats.get("by_format", {}),
            "documents": stats.get("documents", 0),
            "bytes": stats.get("bytes", 0),
            "skipped_files": [s["path"] for s in ingest.get("skipped", []) if s.get("whole_file")],
        },
        "curation": {
            "documents_in": curation["documents_in"],
            "documents_out": curation["documents_out"],
            "bytes_in": curation["bytes_in"],
            "bytes_out": curation["bytes_out"],
            "by_source": curation["by_source"],
            "dropped_by_filter": curation["dropped_by_filter"],
            "dropped_by_rule": curation["dropped_by_rule"],
            "c4_lines_removed": curation["c4_lines_removed"],
            "pii": curation["pii"],
            "dedup": curation["dedup"],
        },
        "tokens": {
            "train": tokens["train"],
            "val": tokens["val"],
            "total": tokens["train"] + tokens["val"],
            "documents": manifest.get("documents", {}),
            "vocab_size": manifest.get("vocab_size"),
            "tokenizer_sha256": manifest.get("tokenizer_sha256"),
            "dataset_sha256": manifest.get("dataset_sha256"),
        },
        "config": curation.get("config", {}),
    }


def render_markdown(card: dict[str, Any]) -> str:
    """The card for people: the same figures as the JSON, as tables."""
    src, cur, tok = card["sources"], card["curation"], card["tokens"]
    lines = [
        "# Dataset card",
        "",
        f"{cur['documents_out']:,} documents ({_mb(cur['bytes_out'])}) and {tok['total']:,} tokens "
        f"({tok['train']:,} train, {tok['val']:,} validation) from {src['files_read']:,} source files "
        f"({src['documents']:,} documents, {_mb(src['bytes'])}).",
        "",
        "## Sources",
        "",
        "| source | documents in | bytes in | documents out | bytes out |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in cur["by_source"].items():
        lines.append(f"| {name} | {row['documents_in']:,} | {row['bytes_in']:,} | {row['documents_out']:,} | {row['bytes_out']:,} |")
    lines += ["", "| format | files | documents | bytes |", "|---|---:|---:|---:|"]
    for fmt, row in sorted(src["by_format"].items()):
        lines.append(f"| {fmt} | {row.get('files', 0):,} | {row.get('documents', 0):,} | {row.get('bytes', 0):,} |")
    lines += ["", "## Skipped at ingest", ""]
    if src["files_skipped"] or src["records_skipped"]:
        lines.append(f"{src['files_skipped']:,} whole files and {src['records_skipped']:,} records skipped (every one is recorded in the ledger).")
        lines += ["", "| reason | count |", "|---|---:|"]
        lines += [f"| {reason} | {count:,} |" for reason, count in sorted(src["skipped_by_reason"].items())]
    else:
        lines.append("Nothing was skipped.")
    lines += ["", "## Dropped during curation", "", "| filter | rule | documents |", "|---|---|---:|"]
    for name, count in cur["dropped_by_rule"].items():
        flt, _, rule = name.partition(".")
        lines.append(f"| {flt} | {rule} | {count:,} |")
    lines += ["", f"Lines removed inside kept documents by the C4 line rules: {cur['c4_lines_removed']:,}."]
    pii = cur["pii"]
    lines += ["", "## Personal data and secrets", ""]
    if not pii.get("enabled", True):
        lines.append("Redaction was switched off in the recipe.")
    elif pii["matches"]:
        lines += [f"{pii['documents_with_matches']:,} documents had matches.", "", "| type | matches |", "|---|---:|"]
        lines += [f"| {name} | {count:,} |" for name, count in pii["matches"].items()]
    else:
        lines.append("No matches.")
    dd = cur["dedup"]
    lines += [
        "",
        "## Duplicates",
        "",
        f"Exact duplicates dropped: {dd['exact_dropped']:,}. Near duplicates dropped: {dd['near_dropped']:,} "
        f"in {dd['near_clusters']:,} clusters (MinHash, word {dd['ngram']}-grams, {dd['bands']} bands x {dd['rows']} rows); "
        "the lowest doc_id of each cluster is kept.",
    ]
    if dd["largest_clusters"]:
        lines += ["", "| kept doc_id | cluster size | other members (first 10) |", "|---:|---:|---|"]
        lines += [f"| {c['kept_doc_id']} | {c['size']} | {', '.join(map(str, c['members']))} |" for c in dd["largest_clusters"]]
    lines += [
        "",
        "## Tokens",
        "",
        f"Vocabulary {tok['vocab_size']:,}; tokenizer sha256 `{tok['tokenizer_sha256']}`; dataset sha256 `{tok['dataset_sha256']}`.",
        "",
    ]
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def run_card(ingest_report: Path, curation_report: Path, shards_dir: Path, out_dir: Path) -> StageResult:
    """Write ``out_dir/card/dataset_card.json`` and ``dataset_card.md``."""
    card = build_card(ingest_report, curation_report, shards_dir)
    folder = Path(out_dir) / "card"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "dataset_card.json", card)
    atomic_write_text(folder / "dataset_card.md", render_markdown(card), mode=0o644)
    return StageResult(
        outputs={"card": folder},
        stats={
            "documents": card["curation"]["documents_out"],
            "tokens": card["tokens"]["total"],
            "card_sha256": sha256_file(folder / "dataset_card.json"),
        },
    )
