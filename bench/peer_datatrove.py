"""The peer side of the curation benchmark: datatrove running FineWeb's filters and MinHash.

What runs is FineWeb's own recipe (datatrove ``examples/fineweb.py`` and
``examples/minhash_deduplication.py``), minus the steps that need the network or are not
part of curation (WARC reading, URL filter, Trafilatura, fastText language id, the
``TokensCounter`` that downloads a GPT-2 tokenizer):

1. filter: ``JsonlReader`` -> ``GopherRepetitionFilter()`` -> ``GopherQualityFilter()``
   -> ``C4QualityFilter(filter_no_terminal_punct=False)`` -> ``FineWebQualityFilter()``
   -> ``JsonlWriter``, all with datatrove's (= FineWeb's) defaults;
2. MinHash in its four stages (signatures, buckets, cluster, filter) with
   ``MinhashConfig(hash_config=HashConfig(precision=64), num_buckets=14,
   hashes_per_bucket=8, n_grams=5)``: 112 hashes of word 5-grams, pairs found when all 8
   hashes of one of 14 bands agree (similarity threshold about 0.72). Stage 2 runs one task
   per bucket and stage 3 one task, as in the example; stages 1 and 4 run ``workers`` tasks
   on the same input, which MinHash requires.

datatrove splits work by file, never inside one, so the corpus is first cut into
``workers`` contiguous shards (``seconds_prepare``, not counted in the totals): on one file
only one task would do any work, which would understate what datatrove can do.

It runs in its own virtualenv (``.venv-bench``, see bench/README.md) as a subprocess of the
driver; this module imports datatrove only inside ``run_datatrove`` so the driver can
import it from the product's environment. datatrove's logs go to
``WORKDIR/datatrove/datatrove.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

# FineWeb's MinHash parameters (datatrove examples/fineweb.py and minhash_deduplication.py).
NUM_BUCKETS = 14
HASHES_PER_BUCKET = 8
N_GRAMS = 5
HASH_PRECISION = 64


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Point file descriptor 2 at ``path``: datatrove's worker processes inherit it, so
    their loguru and tqdm output lands there too, not on the driver's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def split_corpus(corpus_jsonl: Path, dest: Path, shards: int) -> tuple[int, int]:
    """Cut ``corpus_jsonl`` into ``shards`` contiguous files of about equal bytes; return
    (documents, bytes). Contiguous, so "keep the first of a cluster" means the same
    document as in the unsplit file."""
    dest.mkdir(parents=True, exist_ok=True)
    total = corpus_jsonl.stat().st_size
    per_shard = max(1, -(-total // shards))
    docs = 0
    shard = 0
    written = 0
    out = (dest / f"{shard:05d}.jsonl").open("wb")
    try:
        with corpus_jsonl.open("rb") as src:
            for line in src:
                if not line.strip():
                    continue
                if written >= per_shard * (shard + 1) and shard < shards - 1:
                    out.close()
                    shard += 1
                    out = (dest / f"{shard:05d}.jsonl").open("wb")
                out.write(line)
                written += len(line)
                docs += 1
    finally:
        out.close()
    for extra in range(shard + 1, shards):
        (dest / f"{extra:05d}.jsonl").touch()
    return docs, total


def _count_jsonl(folder: Path) -> int:
    count = 0
    for path in sorted(folder.glob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            count += sum(1 for line in fh if line.strip())
    return count


def _read_ids(folder: Path) -> list[str]:
    ids: list[str] = []
    for path in sorted(folder.glob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            ids.extend(str(json.loads(line)["id"]) for line in fh if line.strip())
    return sorted(ids)


def _step_counts(stats_json: Path) -> dict[str, dict[str, int]]:
    """Per pipeline step, how many documents it dropped and forwarded (datatrove's stats.json)."""
    if not stats_json.is_file():
        return {}
    counts: dict[str, dict[str, int]] = {}
    for step in json.loads(stats_json.read_text()):
        stats = step.get("stats", {})
        row = {}
        for key in ("total", "dropped", "forwarded", "documents"):
            value = stats.get(key)
            if isinstance(value, dict):
                value = value.get("total")
            if isinstance(value, (int, float)):
                row[key] = int(value)
        # "🔻 - FILTER: 👯 Gopher Repetition" -> "FILTER: Gopher Repetition"
        name = " ".join(re.sub(r"[^\x20-\x7e]", "", step.get("name", "?")).split()).lstrip("- ")
        counts[name] = row
    return counts


def run_datatrove(corpus_jsonl: Path, workdir: Path, workers: int) -> dict[str, Any]:
    """Filter and MinHash-dedup ``corpus_jsonl`` with datatrove as FineWeb did; see the module docstring."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not corpus_jsonl.is_file():
        raise FileNotFoundError(f"{corpus_jsonl}: no such corpus file (build one with bench/corpus.py)")
    # Never reach for the Hub: this machine is offline and a retry loop would be timed.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    root = workdir / "datatrove"
    # LocalPipelineExecutor skips tasks it finds completed in its logging folder; a stale
    # folder would make a rerun look instantaneous.
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    inputs, filtered, minhash, deduped, logs = (
        root / "input", root / "filtered", root / "minhash", root / "deduped", root / "logs"
    )  # fmt: skip

    started = time.perf_counter()
    docs_in, bytes_in = split_corpus(corpus_jsonl, inputs, workers)
    seconds_prepare = time.perf_counter() - started

    def reader(folder: Path) -> JsonlReader:
        return JsonlReader(str(folder), text_key="text", id_key="id")

    config = MinhashConfig(
        hash_config=HashConfig(precision=HASH_PRECISION),
        num_buckets=NUM_BUCKETS,
        hashes_per_bucket=HASHES_PER_BUCKET,
        n_grams=N_GRAMS,
    )
    filter_stage = LocalPipelineExecutor(
        pipeline=[
            reader(inputs),
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            C4QualityFilter(filter_no_terminal_punct=False),
            FineWebQualityFilter(),
            JsonlWriter(str(filtered)),
        ],
        tasks=workers,
        workers=workers,
        logging_dir=str(logs / "filter"),
    )
    minhash_stages = [
        LocalPipelineExecutor(
            pipeline=[reader(filtered), MinhashDedupSignature(output_folder=str(minhash / "signatures"), config=config)],
            tasks=workers,
            workers=workers,
            logging_dir=str(logs / "signatures"),
        ),
        LocalPipelineExecutor(
            pipeline=[MinhashDedupBuckets(input_folder=str(minhash / "signatures"), output_folder=str(minhash / "buckets"), config=config)],
            tasks=config.num_buckets,
            workers=workers,
            logging_dir=str(logs / "buckets"),
        ),
        LocalPipelineExecutor(
            pipeline=[MinhashDedupCluster(input_folder=str(minhash / "buckets"), output_folder=str(minhash / "remove_ids"), config=config)],
            tasks=1,
            workers=1,
            logging_dir=str(logs / "clusters"),
        ),
        LocalPipelineExecutor(
            pipeline=[
                reader(filtered),
                MinhashDedupFilter(input_folder=str(minhash / "remove_ids")),
                JsonlWriter(str(deduped)),
            ],
            tasks=workers,
            workers=workers,
            logging_dir=str(logs / "filter_dups"),
        ),
    ]

    log = root / "datatrove.log"
    stage_seconds: list[float] = []
    try:
        with _stderr_to(log):
            t0 = time.perf_counter()
            filter_stage.run()
            seconds_filter = time.perf_counter() - t0
            for stage in minhash_stages:
                t = time.perf_counter()
                stage.run()
                stage_seconds.append(time.perf_counter() - t)
            seconds_minhash = time.perf_counter() - t0 - seconds_filter
    except BaseException:
        # The traceback alone says little: datatrove's own account is in its log.
        print(f"datatrove failed; its log is {log}", file=sys.stderr)
        raise

    kept_ids = _read_ids(deduped)
    return {
        "peer": f"datatrove {version('datatrove')}",
        "workers": workers,
        "seconds_prepare": round(seconds_prepare, 3),
        "seconds_filter": round(seconds_filter, 3),
        "seconds_minhash": round(seconds_minhash, 3),
        "seconds_minhash_stages": {name: round(s, 3) for name, s in zip(("signatures", "buckets", "cluster", "filter"), stage_seconds)},
        "seconds_total": round(seconds_filter + seconds_minhash, 3),
        "docs_in": docs_in,
        "docs_after_filter": _count_jsonl(filtered),
        "docs_kept": len(kept_ids),
        "kept_ids": kept_ids,
        "bytes_in": bytes_in,
        "filter_steps": _step_counts(logs / "filter" / "stats.json"),
        "log": str(log),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="corpus.jsonl written by bench/corpus.py")
    parser.add_argument("workdir", type=Path, help="scratch folder; WORKDIR/datatrove is replaced")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, help="write the result as JSON here (default: stdout)")
    args = parser.parse_args(argv)
    result = run_datatrove(args.corpus, args.workdir, args.workers)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
        summary = {k: v for k, v in result.items() if k != "kept_ids"}
        print(json.dumps(summary, indent=1))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
