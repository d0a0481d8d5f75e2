"""Quality-filter throughput on one core: the filter chain against its frozen reference.

The peer is ``tests/filters_reference.py``, the filter implementation as it was before the
filters were made faster (issue 17); the product is ``pipeline.filters.FilterChain``. Both
run FineWeb's default chain (Gopher repetition, Gopher quality, C4, FineWeb) over the same
documents in this one process, so the figures are per core. Each round times one pass of
each side over the whole corpus in CPU seconds of this process (``time.process_time``, so
other jobs on the machine slow a round less than they would wall time), alternating sides;
the medians are compared. A first untimed pass of each side warms what each keeps between
documents (the reference's per-word flags, the product's split chunks); its time, the cold
start, is printed too. Whether every verdict agreed is printed, never asserted.

    .venv/bin/python bench/bench_filters.py [--rounds 5] [--jsonl bench-data/corpus-220mb/corpus.jsonl --docs 20000]

Documents: the running Python's stdlib docs corpus (``appliance.demo.build_stdlib_corpus``),
each text whole and cut at blank lines into pieces of at most 2000 characters (see
``tests.filters_reference.corpus_documents``); or the first ``--docs`` documents of a
``bench/corpus.py`` jsonl (prose, near-duplicates and junk, as a crawl).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# One core: nothing the filters call may start threads behind the measurement's back.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.demo import build_stdlib_corpus  # noqa: E402
from pipeline.filters import FilterChain, FiltersConfig, Verdict  # noqa: E402
from tests.filters_reference import ReferenceChain, corpus_documents  # noqa: E402


def load_documents(args: argparse.Namespace) -> tuple[str, list[str]]:
    if args.jsonl:
        docs = []
        with open(args.jsonl, encoding="utf-8") as f:
            for line in f:
                if len(docs) >= args.docs:
                    break
                docs.append(json.loads(line)["text"])
        return f"{args.jsonl} (first {len(docs):,} documents)", docs
    where = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="bench-filters-"))
    corpus = build_stdlib_corpus(where / f"python-{sys.version.split()[0]}-stdlib-docs")
    return f"stdlib docs of Python {corpus.python}, whole and in pieces", corpus_documents(corpus.path)


def one_pass(apply: Callable[[str], Verdict], docs: list[str]) -> tuple[float, list[Verdict]]:
    start = time.process_time()
    verdicts = [apply(doc) for doc in docs]
    return time.process_time() - start, verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed passes of each side (default 5)")
    parser.add_argument("--data", help="where the stdlib corpus is built (default: a temporary folder)")
    parser.add_argument("--jsonl", help="a bench/corpus.py corpus.jsonl instead of the stdlib docs")
    parser.add_argument("--docs", type=int, default=20_000, help="documents read from --jsonl (default 20000)")
    parser.add_argument("--cpu", type=int, default=None, help="pin the process to this CPU (Linux)")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    label, docs = load_documents(args)
    megabytes = sum(len(doc.encode("utf-8")) for doc in docs) / 1e6
    print(f"corpus: {label}: {len(docs):,} documents, {megabytes:.2f} MB", flush=True)

    cfg = FiltersConfig()
    sides = {"reference": ReferenceChain(cfg).apply, "filters": FilterChain(cfg).apply}
    cold = {}
    verdicts = {}
    for name, apply in sides.items():
        cold[name], verdicts[name] = one_pass(apply, docs)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, apply in sides.items():
            elapsed, _verdicts = one_pass(apply, docs)
            seconds[name].append(elapsed)

    for name in sides:
        runs = seconds[name]
        print(
            f"{name:<10} {megabytes / statistics.median(runs):7.2f} MB/s per core (median of {len(runs)}; "
            f"best {megabytes / min(runs):.2f}, cold first pass {megabytes / cold[name]:.2f})"
        )
    ratio = statistics.median(seconds["reference"]) / statistics.median(seconds["filters"])
    print(f"speed ratio filters / reference: {ratio:.2f}x (cold first pass {cold['reference'] / cold['filters']:.2f}x)")
    differ = sum(a != b for a, b in zip(verdicts["reference"], verdicts["filters"]))
    print(f"verdicts: {len(docs) - differ:,} of {len(docs):,} the same (filter, rule, text, lines removed)")
    rules = Counter(f"{v.filter}/{v.rule}" if v.filter else "kept" for v in verdicts["filters"])
    print("verdicts by rule: " + ", ".join(f"{rule} {count}" for rule, count in rules.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
