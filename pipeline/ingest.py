"""Ingest: a folder of source files -> ``raw.parquet``, one row per document.

Formats are chosen by (case-insensitive) suffix; ``pipeline.readers`` reads each one:
``.txt``/``.md`` (and any other suffix listed in ``extensions``) and ``.html``/``.htm``
give one document per file; ``.jsonl``/``.ndjson``, also gzip- or zstd-compressed, one per
line; ``.csv`` one per record; ``.parquet`` one per row. Record formats are streamed, so
memory stays flat whatever the size of the corpus.

The folder is walked recursively (``recursive``), keeping files whose POSIX path relative
to the source folder matches an ``include`` glob and no ``exclude`` glob (``*`` stays
inside a folder, ``**`` spans any number of them); hidden files and folders are skipped
unless ``include_hidden``. Files are read in the sorted order of their UTF-8 paths, so
doc_ids (0.., in file then record order) never depend on the file system.

Every problem names the file, the line (1-based; for CSV where the record starts) or row
(0-based, parquet) and a stable reason kind (``pipeline.readers.REASONS``). With
``on_error = "fail"`` (the default) the first one stops the stage with nothing left in
``out_dir``. With ``"skip"`` a bad record is left out and the rest of its file kept; a
file that cannot be read at all (unreadable, binary, not parquet, wrong schema, too large,
a whole-file format that is not UTF-8) is left out whole; a compressed file that is cut
short or damaged keeps the records read before the damage, and the damage is recorded
as one ``truncated`` item. Nothing is dropped silently: each skipped item is a row of
``rejects.parquet`` and is counted in the result's ``skipped`` and ``stats``.

Ingest stays faithful to its sources; normalising and filtering are the clean stage's job.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import DataError
from pipeline.globs import glob_regex
from pipeline.parquet_io import PARQUET_OPTIONS, ROWS_PER_GROUP, ParquetSink, iter_rows, open_parquet
from pipeline.readers import Problem, ReadOptions, SourceFile, format_of
from pipeline.result import ProgressFn, StageResult, no_progress

# The [ingest] table lives in a module without pyarrow, so a recipe loads without it; its names stay importable from here.
from pipeline.settings.ingest import IngestConfig

__all__ = [
    "PARQUET_OPTIONS",
    "RAW_SCHEMA",
    "REJECTS_SCHEMA",
    "ROWS_PER_GROUP",
    "IngestConfig",
    "ParquetSink",
    "find_sources",
    "glob_regex",
    "iter_rows",
    "open_parquet",
    "run_ingest",
]

RAW_SCHEMA = pa.schema(
    [
        ("doc_id", pa.int64()),
        ("source", pa.string()),
        ("source_sha256", pa.string()),
        ("record", pa.int64()),
        ("text", pa.string()),
    ]
)
# One row per skipped item; record -1 is a whole file.
REJECTS_SCHEMA = pa.schema([("path", pa.string()), ("record", pa.int64()), ("reason", pa.string()), ("detail", pa.string())])

# Enough to see the pattern of a file's problems; the full list is in rejects.parquet.
MAX_EXAMPLES = 20
# Records between progress reports inside a file: often enough for a live bar, rare enough to cost nothing.
PROGRESS_EVERY = 1000


def find_sources(source_dir: Path, cfg: IngestConfig) -> tuple[list[tuple[str, Path, str]], int]:
    """(relative path, path, format) of every matching file in sorted order, and how many were ignored.

    Ignored: files seen in the walk but not taken (hidden, unknown suffix, not included or
    excluded); folders that are hidden, excluded with ``dir/**`` or below a non-recursive
    walk are not entered, so their files are not counted.
    """
    if not source_dir.is_dir():
        raise DataError(f"source folder {source_dir} does not exist or is not a folder", "point ingest at the folder that holds the documents")
    suffixes = sorted({e.lower() for e in cfg.extensions}, key=len, reverse=True)
    include = [glob_regex(g) for g in cfg.include]
    exclude = [glob_regex(g) for g in cfg.exclude]
    # "dir/**" excludes everything below dir, so the walk need not go there.
    pruned = [glob_regex(g[:-3]) for g in cfg.exclude if g.endswith("/**")]

    def walk_error(exc: OSError) -> None:
        raise DataError(f"cannot list {exc.filename}: {exc.strerror}", "make the folder readable by the appliance, or remove it from the source folder")

    found: list[tuple[str, Path, str]] = []
    ignored = 0
    for root, dirs, names in os.walk(source_dir, onerror=walk_error):
        rel_root = Path(root).relative_to(source_dir).as_posix()
        prefix = "" if rel_root == "." else rel_root + "/"
        if cfg.recursive:
            dirs[:] = [d for d in dirs if (cfg.include_hidden or not d.startswith(".")) and not any(p.fullmatch(prefix + d) for p in pruned)]
        else:
            dirs.clear()
        for name in names:
            rel = prefix + name
            lower = name.lower()
            suffix = next((s for s in suffixes if lower.endswith(s)), None)
            if (
                suffix is None
                or (name.startswith(".") and not cfg.include_hidden)
                or not any(p.fullmatch(rel) for p in include)
                or any(p.fullmatch(rel) for p in exclude)
            ):
                ignored += 1
                continue
            found.append((rel, Path(root) / name, format_of(suffix)))
    if not found:
        filters = "" if cfg.include == ["**"] and not cfg.exclude else f", include {cfg.include}, exclude {cfg.exclude}"
        raise DataError(
            f"no files with extensions {', '.join(cfg.extensions)} in {source_dir}{filters}" + ("" if cfg.recursive else " (not searching subfolders)"),
            "put the documents there, or set ingest.extensions (and ingest.include / exclude / recursive) to match them",
        )
    found.sort(key=lambda f: os.fsencode(f[0]))
    return found, ignored


@dataclass
class _FileTally:
    """What became of one source file."""

    documents: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    whole_file: str | None = None

    def add(self, problem: Problem, name: str) -> None:
        self.reasons[problem.reason] += 1
        if problem.record < 0:
            self.whole_file = problem.reason
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"record": problem.record, "reason": problem.reason, "detail": f"{name} {problem.detail}"})

    @property
    def records_skipped(self) -> int:
        return sum(self.reasons.values()) - (1 if self.whole_file else 0)


def run_ingest(source_dir: Path, out_dir: Path, cfg: IngestConfig, progress: ProgressFn = no_progress) -> StageResult:
    """Read every matching file under ``source_dir`` into ``out_dir/raw.parquet``.

    Skipped items (``on_error = "skip"``) go to ``out_dir/rejects.parquet``, which exists
    only when something was skipped. Raises DataError on the first problem under
    ``on_error = "fail"``, and when no document at all could be read.
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    files, ignored = find_sources(source_dir, cfg)
    sizes = [_size(path) for _, path, _ in files]
    total = sum(sizes)
    opts = ReadOptions(
        jsonl_field=cfg.jsonl_field,
        parquet_column=cfg.parquet_column,
        csv_column=cfg.csv_column,
        max_document_bytes=cfg.max_document_bytes,
    )
    raw_path, rejects_path = out_dir / "raw.parquet", out_dir / "rejects.parquet"
    inputs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    by_format: dict[str, dict[str, int]] = {}
    doc_id = done = 0
    with ExitStack() as stack:
        sink = stack.enter_context(ParquetSink(raw_path, RAW_SCHEMA))
        rejects: ParquetSink | None = None
        for (rel, path, fmt), size in zip(files, sizes):
            name = _printable(rel)
            source = SourceFile(path, fmt, opts)
            tally = _FileTally()
            for item in source.items():
                if isinstance(item, tuple):
                    sink.add(doc_id=doc_id, source=name, source_sha256=source.sha256, record=item[0], text=item[1])
                    doc_id += 1
                    tally.documents += 1
                    if tally.documents % PROGRESS_EVERY == 0:
                        progress(done + min(source.position, size), total, {"file": name, "documents": doc_id})
                    continue
                if cfg.on_error == "fail":
                    raise DataError(
                        f"{path} {item.detail} [{item.reason}]",
                        f'{item.hint}; or set ingest.on_error = "skip" to leave it out and list it in rejects.parquet',
                    )
                if rejects is None:
                    rejects = stack.enter_context(ParquetSink(rejects_path, REJECTS_SCHEMA))
                rejects.add(path=name, record=item.record, reason=item.reason, detail=f"{name} {item.detail}")
                tally.add(item, name)
            done += size
            progress(done, total, {"file": name, "documents": doc_id})
            nbytes = source.size or size
            inputs.append(
                {
                    "path": name,
                    "sha256": source.sha256,
                    "bytes": nbytes,
                    "format": fmt,
                    "documents": tally.documents,
                    "records_skipped": tally.records_skipped,
                    "skipped": tally.whole_file,
                }
            )
            if tally.reasons:
                skipped.append(
                    {
                        "path": name,
                        "sha256": source.sha256,
                        "whole_file": tally.whole_file is not None,
                        "reasons": dict(sorted(tally.reasons.items())),
                        "records_skipped": tally.records_skipped,
                        "examples": tally.examples,
                    }
                )
            counts = by_format.setdefault(fmt, {"files": 0, "documents": 0, "bytes": 0})
            counts["files"] += 1
            counts["documents"] += tally.documents
            counts["bytes"] += nbytes
        stats = _stats(inputs, skipped, by_format, ignored)
        if doc_id == 0:
            raise _nothing_read(source_dir, stats, skipped)
    if rejects is None:
        rejects_path.unlink(missing_ok=True)  # a previous run's list would describe other data
    outputs = {"raw": raw_path} | ({"rejects": rejects_path} if rejects is not None else {})
    return StageResult(outputs=outputs, stats=stats, inputs=inputs, skipped=skipped)


def _stats(inputs: list[dict[str, Any]], skipped: list[dict[str, Any]], by_format: dict[str, dict[str, int]], ignored: int) -> dict[str, Any]:
    by_reason: Counter[str] = Counter()
    for entry in skipped:
        by_reason.update(entry["reasons"])
    whole = sum(1 for x in inputs if x["skipped"])
    return {
        "files": len(inputs),
        "files_read": len(inputs) - whole,
        "files_skipped": whole,
        "files_ignored": ignored,
        "documents": sum(x["documents"] for x in inputs),
        "records_skipped": sum(x["records_skipped"] for x in inputs),
        "bytes": sum(x["bytes"] for x in inputs),
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "by_format": dict(sorted(by_format.items())),
    }


def _nothing_read(source_dir: Path, stats: dict[str, Any], skipped: list[dict[str, Any]]) -> DataError:
    # An empty corpus would only fail later, in clean or the tokenizer, further from the cause.
    reasons = ", ".join(f"{kind}: {n}" for kind, n in stats["skipped_by_reason"].items()) or "none"
    first = f"; first: {skipped[0]['examples'][0]['detail']}" if skipped else ""
    return DataError(
        f"no documents read from {source_dir}: {stats['files']} files, {stats['files_skipped']} skipped whole, "
        f"{stats['records_skipped']} records skipped (reasons: {reasons}){first}",
        "fix or replace the files named above, or point ingest at the folder that holds the documents",
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # reported as unreadable when it is read


def _printable(rel: str) -> str:
    """``rel`` as valid text: a file name that is not UTF-8 keeps its odd bytes as \\x escapes."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")
    return rel
