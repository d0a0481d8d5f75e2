"""Curate: ``raw.parquet`` -> ``dataset.parquet``: normalise, filter, redact, deduplicate.

Per document, in worker processes (``pipeline.parallel``):

1. ``clean_text`` and the size limits (``[clean]``);
2. the quality filters in FineWeb's order (``[filters.*]``, ``pipeline.filters``);
3. PII and secrets redaction (``[pii]``, ``pipeline.pii``), on the filtered text, so the
   dataset never holds what was redacted;
4. the keys for deduplication: a digest of the normalised text and MinHash band keys.

Then, in this process, over all documents: exact duplicates (same normalised text) and
near duplicates (MinHash LSH clusters, ``[dedup]``) are dropped, keeping the document with
the lowest doc_id of each cluster. Batches have a fixed size and results are consumed in
order, so ``dataset.parquet`` is byte-identical for any number of workers and on a re-run.

Outputs: ``dataset.parquet`` (doc_id, source, text, sha256 of the text), ``curation.json``
(every count the dataset card reports: documents and bytes in/out by source, drops per
filter and rule, PII per type, duplicate clusters) and ``dropped.parquet`` (the first
``clean.dropped_samples`` documents each rule dropped, so a data steward can see what a
rule removes before trusting it; with PII redaction on, samples are redacted too, since
they are stored like the dataset).
"""

from __future__ import annotations

from array import array
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.clean import CleanConfig, clean_text
from pipeline.config import to_mapping
from pipeline.dedup_disk import BYTES_PER_MB, ClusterSummary, DiskDedup, summarise_clusters
from pipeline.errors import DataError
from pipeline.filters import FilterChain, FiltersConfig
from pipeline.minhash import DedupConfig, MinHasher, exact_key, find_clusters
from pipeline.parallel import ordered_map, resolve_workers
from pipeline.parquet_io import ParquetSink, iter_rows, open_parquet
from pipeline.pii import KEPT_SUFFIX, PII_TYPES, PiiConfig, Redactor
from pipeline.result import ProgressFn, StageResult, no_progress, write_json

DATASET_SCHEMA = pa.schema([("doc_id", pa.int64()), ("source", pa.string()), ("text", pa.string()), ("sha256", pa.string())])
DROPPED_SCHEMA = pa.schema(
    [
        ("doc_id", pa.int64()),
        ("source", pa.string()),
        ("filter", pa.string()),
        ("rule", pa.string()),
        ("detail", pa.string()),
        ("text", pa.string()),
    ]
)
_STAGE1_SCHEMA = pa.schema([("doc_id", pa.int64()), ("source", pa.string()), ("text", pa.string())])
# Documents per batch: fixed (never derived from the worker count) so results do not depend on it.
BATCH_DOCS = 256
# A sample longer than this is cut: the point is to recognise the kind of document.
SAMPLE_CHARS = 20_000
_HINT = "point at the ingest stage's raw.parquet (re-run ingest if it is damaged)"
# Scratch folder of the disk-backed dedup ([dedup] memory_mb > 0), inside the output folder
# so it is on the same disk as the dataset and goes away with a failed stage.
SPILL_DIR = "dedup-spill"
# Settings that cannot change the output, so the report (and its digest) leaves them out.
_RUNTIME_KEYS = ("workers", "memory_mb")


@dataclass(frozen=True)
class CurateSettings:
    """The recipe tables curation reads."""

    clean: CleanConfig = field(default_factory=CleanConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)


def source_group(source: str) -> str:
    """The "source" a document is counted under in the card: its top-level folder, or its file."""
    return source.split("/", 1)[0]


# -- worker side ---------------------------------------------------------------------------


@dataclass
class _BatchResult:
    documents: int
    ids: list[int]
    sources: list[str]
    texts: list[str]
    exact: bytes  # 16 bytes per kept document
    bands: np.ndarray | None  # (kept, bands) uint64, or None when near dedup is off
    has_bands: np.ndarray | None  # (kept,) bool: False for documents too short to shingle
    sources_in: dict[str, list[int]]  # group -> [documents, bytes]
    drops: Counter[tuple[str, str]]
    samples: list[tuple[int, str, str, str, str, str]]
    pii: Counter[str]
    pii_documents: int
    lines_removed: int


class _Worker:
    def __init__(self, settings: CurateSettings) -> None:
        self.settings = settings
        self.chain = FilterChain(settings.filters)
        self.redactor = Redactor(settings.pii) if settings.pii.enabled else None
        # Dropped samples are stored too: they must not keep what the dataset may not.
        redact_all = PiiConfig(**{name: "redact" for name in PII_TYPES})
        self.sample_redactor = Redactor(redact_all) if settings.pii.enabled else None
        self.hasher = MinHasher(settings.dedup) if settings.dedup.near else None

    def run(self, batch: tuple[list[int], list[str], list[str | None]]) -> _BatchResult:
        ids_in, sources_in, texts_in = batch
        clean, k = self.settings.clean, self.settings.clean.dropped_samples
        out = _BatchResult(len(ids_in), [], [], [], b"", None, None, defaultdict(lambda: [0, 0]), Counter(), [], Counter(), 0, 0)
        exact: list[bytes] = []
        for doc_id, source, raw in zip(ids_in, sources_in, texts_in):
            if raw is None:
                raise DataError(f"raw.parquet doc_id {doc_id}: text is null", _HINT)
            group = out.sources_in[source_group(source)]
            group[0] += 1
            group[1] += len(raw.encode("utf-8"))
            text = clean_text(raw, clean)
            drop: tuple[str, str, str] | None = None
            if len(text) < clean.min_chars:
                drop = ("clean", "too_short", f"{len(text)} characters < clean.min_chars = {clean.min_chars}")
            elif clean.max_chars and len(text) > clean.max_chars:
                drop = ("clean", "too_long", f"{len(text)} characters > clean.max_chars = {clean.max_chars}")
            else:
                verdict = self.chain.apply(text)
                if verdict.text is None:
                    drop = (str(verdict.filter), str(verdict.rule), "")
                else:
                    text = verdict.text
                    out.lines_removed += verdict.lines_removed
                    if self.redactor is not None:
                        red = self.redactor.apply(text)
                        out.pii.update(red.counts)
                        # Kept private addresses are counted for the card, but are no finding.
                        if any(not name.endswith(KEPT_SUFFIX) for name in red.counts):
                            out.pii_documents += 1
                        if red.text is None:
                            drop = ("pii", str(red.dropped_by), 'document holds a type whose pii action is "drop"')
                        else:
                            text = red.text
            if drop is not None:
                out.drops[drop[:2]] += 1
                if out.drops[drop[:2]] <= k:
                    sample = raw if self.sample_redactor is None else (self.sample_redactor.apply(raw).text or "")
                    out.samples.append((doc_id, source, drop[0], drop[1], drop[2], sample[:SAMPLE_CHARS]))
                continue
            out.ids.append(doc_id)
            out.sources.append(source)
            out.texts.append(text)
            exact.append(exact_key(text))
        out.exact = b"".join(exact)
        if self.hasher is not None:
            # One batched call: much faster than document by document. A row of zeros marks
            # a document with no shingles (empty normal form); it never joins a cluster.
            out.bands = self.hasher.band_keys_many(out.texts)
            out.has_bands = np.any(out.bands != 0, axis=1)
        out.sources_in = dict(out.sources_in)
        return out


_WORKER: _Worker | None = None


def _init_worker(settings: CurateSettings) -> None:
    global _WORKER
    _WORKER = _Worker(settings)


def _run_batch(batch: tuple[list[int], list[str], list[str | None]]) -> _BatchResult:
    if _WORKER is None:  # pragma: no cover - the initializer always runs first
        raise RuntimeError("curation worker used before it was initialised")
    return _WORKER.run(batch)


# -- main side -----------------------------------------------------------------------------


def _batches(pf: Any, path: Path) -> Iterator[tuple[list[int], list[str], list[str | None]]]:
    last: int | None = None
    row = 0
    for rows in iter_rows(pf, ["doc_id", "source", "text"], batch_size=BATCH_DOCS):
        for doc_id in rows["doc_id"]:
            # "First occurrence" must mean lowest doc_id, so the order is checked, not assumed.
            if doc_id is None or (last is not None and doc_id <= last):
                raise DataError(f"{path} row {row}: doc_id {doc_id!r} is null, repeated or out of order", _HINT)
            last = doc_id
            row += 1
        yield rows["doc_id"], rows["source"], rows["text"]


def run_curate(raw_parquet: Path, out_dir: Path, settings: CurateSettings, progress: ProgressFn = no_progress) -> StageResult:
    """Curate the ingest stage's ``raw.parquet`` into ``out_dir`` (see the module docstring)."""
    raw_parquet, out_dir = Path(raw_parquet), Path(out_dir)
    created = not out_dir.exists()
    pf = open_parquet(raw_parquet, ["doc_id", "source", "text"], _HINT)
    total = pf.metadata.num_rows
    workers = resolve_workers(settings.clean.workers)
    k = settings.clean.dropped_samples

    sources: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(("documents_in", "bytes_in", "documents_out", "bytes_out"), 0))
    drops: Counter[tuple[str, str]] = Counter()
    pii: Counter[str] = Counter()
    samples: list[tuple[int, str, str, str, str, str]] = []
    exact_parts: list[bytes] = []
    band_parts: list[np.ndarray] = []
    has_parts: list[np.ndarray] = []
    pii_documents = lines_removed = done = survivors = 0

    # Pass 1 (parallel): per-document work; survivors go to a temporary file with their keys.
    stage1 = out_dir / "curate-stage1.parquet"
    stage_pf: Any = None
    spill: DiskDedup | None = None
    try:
        if settings.dedup.memory_mb:
            # Keys go to sorted files as they come, so dedup's memory is the budget, not the corpus.
            spill = DiskDedup(out_dir / SPILL_DIR, settings.dedup, settings.dedup.memory_mb * BYTES_PER_MB)
        with ParquetSink(stage1, _STAGE1_SCHEMA) as sink:
            for res in ordered_map(_run_batch, _batches(pf, raw_parquet), workers=workers, initializer=_init_worker, initargs=(settings,)):
                for group, (docs, size) in res.sources_in.items():
                    sources[group]["documents_in"] += docs
                    sources[group]["bytes_in"] += size
                for key, n in res.drops.items():
                    room = k - min(drops[key], k)
                    if room:
                        samples.extend([s for s in res.samples if (s[2], s[3]) == key][:room])
                    drops[key] += n
                pii.update(res.pii)
                pii_documents += res.pii_documents
                lines_removed += res.lines_removed
                for doc_id, source, text in zip(res.ids, res.sources, res.texts):
                    sink.add(doc_id=doc_id, source=source, text=text)
                if spill is not None:
                    spill.add(res.ids, res.exact, res.bands, res.has_bands)
                else:
                    exact_parts.append(res.exact)
                    if res.bands is not None and res.has_bands is not None:
                        band_parts.append(res.bands)
                        has_parts.append(res.has_bands)
                done += res.documents
                survivors += len(res.ids)
                progress(done, total, {"kept": survivors})
        pf.close()

        # Pass 2: which survivors are duplicates, and of which kept document.
        clusters: ClusterSummary
        if spill is not None:
            found = spill.run()
            duplicate_of, kind, clusters = found.duplicate_of, found.kind, found.clusters
        else:
            duplicate_of, kind, all_clusters = _dedup(exact_parts, band_parts, has_parts, survivors, settings.dedup)
            clusters = summarise_clusters(all_clusters)
            del all_clusters

        # Pass 3: write the dataset (and the dedup samples) from the temporary file.
        out = out_dir / "dataset.parquet"
        stage_pf = open_parquet(stage1, ["doc_id", "source", "text"], _HINT)
        # Every survivor's doc_id, compactly: millions of rows must not cost a Python int each.
        ids_all = array("q")
        dedup_samples: list[tuple[int, str, str, int, str]] = []
        dedup_counts: Counter[str] = Counter()
        chars_out = bytes_out = kept = 0
        row = 0
        with ParquetSink(out, DATASET_SCHEMA) as sink:
            for rows in iter_rows(stage_pf, ["doc_id", "source", "text"]):
                for doc_id, source, text in zip(rows["doc_id"], rows["source"], rows["text"]):
                    if spill is None:
                        ids_all.append(doc_id)
                    if duplicate_of[row] >= 0:
                        rule = "exact" if kind[row] == 0 else "near"
                        dedup_counts[rule] += 1
                        if dedup_counts[rule] <= k:
                            dedup_samples.append((doc_id, source, rule, int(duplicate_of[row]), text[:SAMPLE_CHARS]))
                        row += 1
                        continue
                    data = text.encode("utf-8")
                    sink.add(doc_id=doc_id, source=source, text=text, sha256=sha256(data).hexdigest())
                    group = sources[source_group(source)]
                    group["documents_out"] += 1
                    group["bytes_out"] += len(data)
                    kept += 1
                    chars_out += len(text)
                    bytes_out += len(data)
                    row += 1
            if kept == 0:
                raise DataError(
                    f"no documents left after curating {raw_parquet}: {total} in; dropped: {_top_drops(drops, dedup_counts)}",
                    _empty_hint(_top_drops(drops, dedup_counts)),
                )
        if spill is not None:
            # The doc_ids the samples and the cluster report name: a few, read from disk.
            named = {kept_row for _, _, _, kept_row, _ in dedup_samples}
            named.update(row for rep, _, members in clusters.top for row in (rep, *members))
            doc_of: dict[int, int] | array[int] = spill.doc_ids(named)
            spill.close()
        else:
            doc_of = ids_all
    except BaseException:
        # A failed stage leaves nothing behind (the sinks remove their partial files).
        pf.close()
        if stage_pf is not None:
            stage_pf.close()
        stage1.unlink(missing_ok=True)
        if spill is not None:
            spill.close()
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    stage_pf.close()
    stage1.unlink(missing_ok=True)
    # Dedup samples name the kept document by doc_id, known for every row only after pass 3.
    samples += [(d, s, "dedup", r, f"duplicate of doc_id {doc_of[kept_row]}", t) for d, s, r, kept_row, t in dedup_samples]
    for rule, count in dedup_counts.items():
        drops[("dedup", rule)] = count

    dropped_path = out_dir / "dropped.parquet"
    with ParquetSink(dropped_path, DROPPED_SCHEMA) as dsink:
        for d, s, f, r, det, t in sorted(samples, key=lambda x: (x[2], x[3], x[0])):
            dsink.add(doc_id=d, source=s, filter=f, rule=r, detail=det, text=t)

    cluster_report = [{"kept_doc_id": doc_of[rep], "size": size, "members": [doc_of[m] for m in members]} for rep, size, members in clusters.top]
    by_filter: Counter[str] = Counter()
    for (flt, _), count in drops.items():
        by_filter[flt] += count
    report: dict[str, Any] = {
        "documents_in": total,
        "documents_out": kept,
        "bytes_in": sum(g["bytes_in"] for g in sources.values()),
        "bytes_out": bytes_out,
        "by_source": {name: sources[name] for name in sorted(sources)},
        "dropped_by_filter": dict(sorted(by_filter.items())),
        "dropped_by_rule": {f"{f}.{r}": c for (f, r), c in sorted(drops.items())},
        "c4_lines_removed": lines_removed,
        "pii": {"matches": dict(sorted(pii.items())), "documents_with_matches": pii_documents, "enabled": settings.pii.enabled},
        "dedup": {
            "exact_dropped": dedup_counts["exact"],
            "near_dropped": dedup_counts["near"],
            "near_clusters": clusters.count,
            "largest_clusters": cluster_report,
            "bands": settings.dedup.bands,
            "rows": settings.dedup.rows,
            "ngram": settings.dedup.ngram,
        },
        # Workers and dedup's memory are left out: they cannot change the output, and the report must not either.
        "config": {name: _without_runtime(to_mapping(getattr(settings, name))) for name in ("clean", "filters", "pii", "dedup")},
    }
    report_path = write_json(out_dir / "curation.json", report)
    stats = {
        "documents_in": total,
        "documents_out": kept,
        "bytes_in": report["bytes_in"],
        "bytes_out": bytes_out,
        "chars_out": chars_out,
        "dropped": report["dropped_by_rule"],
        "pii": report["pii"]["matches"],
        "near_dup_clusters": clusters.count,
        "workers": workers,
    }
    return StageResult(outputs={"dataset": out, "curation": report_path, "dropped": dropped_path}, stats=stats)


def _dedup(
    exact_parts: list[bytes], band_parts: list[np.ndarray], has_parts: list[np.ndarray], n: int, cfg: DedupConfig
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, list[int]]]]:
    """For each survivor row: the row it duplicates (-1 if kept), the kind (0 exact, 1 near), and the clusters.

    Clusters are (representative row, other member rows), largest first, then by row.
    """
    duplicate_of = np.full(n, -1, dtype=np.int64)
    kind = np.zeros(n, dtype=np.int8)
    clusters: list[tuple[int, list[int]]] = []
    if n == 0:
        return duplicate_of, kind, clusters
    unique = np.arange(n)
    if cfg.exact:
        keys = np.frombuffer(b"".join(exact_parts), dtype=np.uint64).reshape(n, 2)
        # Stable sort on the key: the first row of each run of equal keys is its first occurrence.
        order = np.lexsort((np.arange(n), keys[:, 1], keys[:, 0]))
        sorted_keys = keys[order]
        starts = np.ones(n, dtype=bool)
        starts[1:] = np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)
        first = order[np.maximum.accumulate(np.where(starts, np.arange(n), 0))]
        duplicate_of[order] = np.where(first == order, -1, first)
        unique = np.flatnonzero(duplicate_of < 0)
    if cfg.near and band_parts:
        bands = np.concatenate(band_parts)[unique]
        has = np.concatenate(has_parts)[unique]
        rep_local = find_clusters(bands, has)
        rep = unique[rep_local]
        near = rep != unique
        duplicate_of[unique[near]] = rep[near]
        kind[unique[near]] = 1
        members: dict[int, list[int]] = defaultdict(list)
        for row, r in zip(unique[near].tolist(), rep[near].tolist()):
            members[r].append(row)
        clusters = sorted(members.items(), key=lambda item: (-len(item[1]), item[0]))
    return duplicate_of, kind, clusters


def _top_drops(drops: Counter[tuple[str, str]], dedup: Counter[str]) -> str:
    merged = Counter({f"{f}.{r}": c for (f, r), c in drops.items()})
    merged.update({f"dedup.{r}": c for r, c in dedup.items()})
    return ", ".join(f"{name} {count}" for name, count in merged.most_common(5)) or "nothing"


def _without_runtime(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in _RUNTIME_KEYS}


# Rules that drop a document for its length: a whole book or log export read as one document.
_LENGTH_RULES = ("clean.too_long", "gopher_quality.long_doc")


def _empty_hint(top: str) -> str:
    hint = f"relax {_setting_for(top)} in the recipe (the rule that dropped most), or add documents"
    if top.split(" ", 1)[0] in _LENGTH_RULES:
        # Most likely a few huge files, each one document: split them rather than relax the rule.
        hint = f'if the corpus is a few large text files, set [ingest] split = "paragraphs" so each becomes many documents; else {hint}'
    return hint


def _setting_for(top: str) -> str:
    """The recipe key or table that governs the first rule in a ``_top_drops`` text."""
    name = top.split(" ", 1)[0]
    fixed = {"clean.too_short": "clean.min_chars", "clean.too_long": "clean.max_chars"}
    if name in fixed:
        return fixed[name]
    group = name.split(".", 1)[0]
    return {"pii": "[pii]", "dedup": "[dedup]"}.get(group, f"[filters.{group}]")
