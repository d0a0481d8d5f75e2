"""Clean + filter + dedup throughput against datatrove, on the same corpus, in the same run.

Both sides read the same ``corpus.jsonl`` and run FineWeb's filter chain (Gopher
repetition, Gopher quality, C4 without the terminal-punctuation rule, FineWeb quality)
and MinHash near-dedup with 14 bands x 8 rows over word 5-grams. Ours also normalises
text and drops exact duplicates first (as the appliance always does); PII redaction is
off on our side because datatrove's FineWeb chain has no equivalent step.

Printed: documents/s and MB/s of each side (input bytes over wall time, reading the
jsonl included), the ratio ours / datatrove, and how far the kept sets agree. Nothing
is asserted: this is a measurement.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -c constraints/cpu.txt -e . \\
        && .venv-bench/bin/pip install datatrove==0.10.1 spacy          # once (see bench/README.md)
    .venv-bench/bin/python bench/bench_curate.py [--mb 220] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402

from bench.corpus import build_corpus  # noqa: E402
from pipeline.clean import CleanConfig  # noqa: E402
from pipeline.curate import CurateSettings, run_curate  # noqa: E402
from pipeline.ingest import IngestConfig, run_ingest  # noqa: E402
from pipeline.pii import PiiConfig  # noqa: E402


def run_ours(corpus: Path, work: Path, workers: int) -> dict:
    start = time.perf_counter()
    ingest = run_ingest(corpus.parent, work / "ingest", IngestConfig(include=[corpus.name]))
    t_ingest = time.perf_counter() - start
    settings = CurateSettings(clean=CleanConfig(workers=workers, min_chars=0), pii=PiiConfig(enabled=False))
    res = run_curate(ingest.outputs["raw"], work / "curate", settings)
    total = time.perf_counter() - start
    # Map our doc_ids back to the corpus ids (the jsonl's "id" field) through the record (line) number.
    raw = pq.read_table(ingest.outputs["raw"], columns=["doc_id", "record"]).to_pydict()
    line_of = dict(zip(raw["doc_id"], raw["record"]))
    ids = [json.loads(line)["id"] for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept_doc_ids = pq.read_table(res.outputs["dataset"], columns=["doc_id"]).column(0).to_pylist()
    kept = {ids[line_of[d] - 1] for d in kept_doc_ids}
    return {
        "seconds_ingest": t_ingest,
        "seconds_total": total,
        "docs_in": res.stats["documents_in"],
        "docs_kept": len(kept),
        "kept_ids": kept,
        "dropped": res.stats["dropped"],
    }


def run_peer(corpus: Path, work: Path, workers: int, python: str) -> dict:
    out = work / "datatrove.json"
    cmd = [python, str(ROOT / "bench" / "peer_datatrove.py"), str(corpus), str(work / "datatrove"), "--workers", str(workers), "--out", str(out)]
    subprocess.run(cmd, check=True)
    result = json.loads(out.read_text())
    result["kept_ids"] = set(result["kept_ids"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=220.0, help="corpus size in MB (default 220)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes on each side (default 2)")
    parser.add_argument("--data", default=str(ROOT / "bench-data"), help="where the corpus and outputs go")
    parser.add_argument("--corpus", help="an existing corpus.jsonl (default: build one of --mb under --data)")
    parser.add_argument("--peer-python", default=sys.executable, help="python that has datatrove installed")
    args = parser.parse_args()

    data = Path(args.data)
    corpus_dir = data / f"corpus-{int(args.mb)}mb"
    corpus = Path(args.corpus) if args.corpus else corpus_dir / "corpus.jsonl"
    if not corpus.is_file():
        print(f"building a {args.mb:.0f} MB corpus in {corpus_dir} …", flush=True)
        build_corpus(corpus_dir, target_bytes=int(args.mb * 1e6))
    megabytes = corpus.stat().st_size / 1e6
    work = data / f"run-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)

    print(f"corpus: {corpus} ({megabytes:.1f} MB), {args.workers} workers each", flush=True)
    ours = run_ours(corpus, work / "ours", args.workers)
    peer = run_peer(corpus, work, args.workers, args.peer_python)

    def line(name: str, r: dict) -> str:
        secs = r["seconds_total"]
        return f"{name:<11} {r['docs_in'] / secs:9.0f} docs/s  {megabytes / secs:7.2f} MB/s  {secs:7.1f} s  kept {r['docs_kept']:,} of {r['docs_in']:,}"

    print(line("appliance", ours))
    print(line("datatrove", peer))
    ratio = peer["seconds_total"] / ours["seconds_total"]
    both = ours["kept_ids"] & peer["kept_ids"]
    union = ours["kept_ids"] | peer["kept_ids"]
    print(f"speed ratio appliance / datatrove: {ratio:.2f}x")
    print(
        f"kept-set agreement: {len(both):,} kept by both, {len(ours['kept_ids'] - peer['kept_ids']):,} only by the appliance, "
        f"{len(peer['kept_ids'] - ours['kept_ids']):,} only by datatrove; Jaccard {len(both) / max(1, len(union)):.3f}"
    )
    print(f"appliance drops by rule: {json.dumps(ours['dropped'], sort_keys=True)}")
    for key in ("seconds_filter", "seconds_minhash"):
        if key in peer:
            print(f"datatrove {key}: {peer[key]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
