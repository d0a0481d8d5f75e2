"""Dedup memory: the in-memory path against the disk-backed one ([dedup] memory_mb), same input, same run.

Two measurements, each side in its own child process so that its peak RSS (ru_maxrss) is
its own:

1. ``curate`` on a real corpus (``bench/corpus.py``; built under ``--data`` if missing) with
   ``memory_mb = 0`` and ``memory_mb = --budget-mb``: wall time, peak RSS of the main
   process (which holds the dedup keys; workers are not counted) and whether the three
   outputs are byte-identical. On a small corpus the keys are a small part of the peak.
2. The dedup step alone on ``--rows`` synthetic documents (``--bands`` band keys each,
   ~10 % exact and ~20 % near duplicates): what the keys of a corpus far larger than the
   one above would cost, without curating it.

Printed: wall time and peak RSS of each side and the ratios disk / memory. Nothing is
asserted: this is a measurement.

    .venv/bin/python bench/bench_dedup_memory.py [--mb 20] [--rows 3000000] [--budget-mb 16]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.corpus import build_corpus  # noqa: E402
from pipeline.clean import CleanConfig  # noqa: E402
from pipeline.curate import CurateSettings, _dedup, run_curate  # noqa: E402
from pipeline.dedup_disk import BYTES_PER_MB, DiskDedup, summarise_clusters  # noqa: E402
from pipeline.ingest import IngestConfig, run_ingest  # noqa: E402
from pipeline.minhash import DedupConfig  # noqa: E402
from pipeline.pii import PiiConfig  # noqa: E402

BATCH = 4096
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _peak_mb() -> float:
    """Peak RSS of this process so far, in MB.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and
    exec, so a child started by a large parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KB on most systems


def child_curate(raw: Path, out: Path, memory_mb: int, workers: int) -> dict[str, Any]:
    settings = CurateSettings(clean=CleanConfig(workers=workers, min_chars=0), pii=PiiConfig(enabled=False), dedup=DedupConfig(memory_mb=memory_mb))
    start = time.perf_counter()
    res = run_curate(raw, out, settings)
    seconds = time.perf_counter() - start
    digests = {name: hashlib.sha256(Path(res.outputs[name]).read_bytes()).hexdigest() for name in ("dataset", "dropped", "curation")}
    return {"seconds": seconds, "peak_mb": _peak_mb(), "digests": digests, "docs_in": res.stats["documents_in"], "dropped": res.stats["dropped"]}


def _keys(lo: int, rows: int, bands: int) -> tuple[int, bytes, np.ndarray, np.ndarray]:
    """One batch of synthetic keys; a function of (lo, rows, bands) only, so both sides see the same."""
    rng = np.random.default_rng(lo)
    row = np.arange(lo, min(rows, lo + BATCH), dtype=np.uint64)
    ident = np.where(rng.random(len(row)) < 0.1, rng.integers(0, lo + 1, len(row)).astype(np.uint64), row)
    cluster = np.where(rng.random(len(row)) < 0.2, ident // np.uint64(4), ident + np.uint64(1 << 40)).astype(np.uint64)
    exact = np.stack([ident * _GOLDEN + np.uint64(1), ident ^ _GOLDEN], axis=1)
    keys = np.bitwise_or(cluster[:, None] * _GOLDEN + np.arange(1, bands + 1, dtype=np.uint64), np.uint64(1))
    has = rng.random(len(row)) > 0.02
    keys[~has] = 0
    return len(row), exact.tobytes(), keys, has


def child_keys(rows: int, bands: int, memory_mb: int, scratch: Path) -> dict[str, Any]:
    cfg = DedupConfig(bands=bands, memory_mb=memory_mb)
    base = _peak_mb()
    start = time.perf_counter()
    if memory_mb == 0:
        exact_parts, band_parts, has_parts = [], [], []
        for lo in range(0, rows, BATCH):
            _, exact, keys, has = _keys(lo, rows, bands)
            exact_parts.append(exact)
            band_parts.append(keys)
            has_parts.append(has)
        duplicate_of, _, clusters = _dedup(exact_parts, band_parts, has_parts, rows, cfg)
        summary = summarise_clusters(clusters)
        dropped = int(np.count_nonzero(duplicate_of >= 0))
    else:
        disk = DiskDedup(scratch, cfg, memory_mb * BYTES_PER_MB)
        try:
            for lo in range(0, rows, BATCH):
                n, exact, keys, has = _keys(lo, rows, bands)
                disk.add(range(lo, lo + n), exact, keys, has)
            found = disk.run()
            summary = found.clusters
            dropped = sum(int(np.count_nonzero(found.duplicate_of[lo : lo + (1 << 20)] >= 0)) for lo in range(0, rows, 1 << 20))
        finally:
            disk.close()
    return {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb(), "growth_mb": _peak_mb() - base, "dropped": dropped, "clusters": summary.count}


def spawn(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True, cwd=ROOT)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="real corpus size in MB (default 20; 0 skips part 1)")
    parser.add_argument("--rows", type=int, default=3_000_000, help="synthetic documents for the dedup step alone (default 3M; 0 skips part 2)")
    parser.add_argument("--bands", type=int, default=14, help="band keys per synthetic document (default 14, FineWeb's)")
    parser.add_argument("--budget-mb", type=int, default=16, help="dedup.memory_mb of the disk-backed side (default 16)")
    parser.add_argument("--workers", type=int, default=2, help="curation workers (default 2)")
    parser.add_argument("--data", default=str(ROOT / "bench-data"), help="where the corpus and outputs go")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        what, *rest = args.child
        if what == "curate":
            result = child_curate(Path(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]))
        else:
            result = child_keys(int(rest[0]), int(rest[1]), int(rest[2]), Path(rest[3]))
        print(json.dumps(result))
        return 0

    data = Path(args.data)
    work = data / f"dedup-memory-{int(time.time())}"
    if args.mb > 0:
        corpus_dir = data / f"corpus-{int(args.mb)}mb"
        corpus = corpus_dir / "corpus.jsonl"
        if not corpus.is_file():
            print(f"building a {args.mb:.0f} MB corpus in {corpus_dir} …", flush=True)
            build_corpus(corpus_dir, target_bytes=int(args.mb * 1e6))
        raw = run_ingest(corpus_dir, work / "ingest", IngestConfig(include=[corpus.name])).outputs["raw"]
        print(f"1. curate {corpus} ({corpus.stat().st_size / 1e6:.1f} MB), {args.workers} workers", flush=True)
        mem = spawn("curate", str(raw), str(work / "memory"), "0", str(args.workers))
        disk = spawn("curate", str(raw), str(work / "disk"), str(args.budget_mb), str(args.workers))
        for name, r in (("memory_mb=0", mem), (f"memory_mb={args.budget_mb}", disk)):
            print(f"   {name:<14} {r['seconds']:7.1f} s  peak RSS {r['peak_mb']:8.1f} MB  ({r['docs_in']:,} documents)")
        same = all(mem["digests"][k] == disk["digests"][k] for k in mem["digests"])
        print(
            f"   disk / memory: time {disk['seconds'] / mem['seconds']:.2f}x, peak RSS {disk['peak_mb'] / mem['peak_mb']:.2f}x; outputs byte-identical: {same}"
        )
    if args.rows > 0:
        print(f"2. dedup step alone: {args.rows:,} synthetic documents, {args.bands} bands", flush=True)
        mem = spawn("keys", str(args.rows), str(args.bands), "0", str(work / "keys-memory"))
        disk = spawn("keys", str(args.rows), str(args.bands), str(args.budget_mb), str(work / "keys-disk"))
        for name, r in (("memory_mb=0", mem), (f"memory_mb={args.budget_mb}", disk)):
            print(
                f"   {name:<14} {r['seconds']:7.1f} s  peak RSS {r['peak_mb']:8.1f} MB  (growth {r['growth_mb']:7.1f} MB)  dropped {r['dropped']:,}, clusters {r['clusters']:,}"
            )
        print(
            f"   disk / memory: time {disk['seconds'] / mem['seconds']:.2f}x, peak RSS growth {disk['growth_mb'] / mem['growth_mb']:.3f}x; "
            f"same result: {mem['dropped'] == disk['dropped'] and mem['clusters'] == disk['clusters']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
