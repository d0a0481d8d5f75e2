"""Curation at scale: dedup memory, local workers, a two-node Ray cluster, filters, datatrove.

On one corpus (``bench/corpus.py``, built under ``--data`` if missing; the issue's size is
``--mb 1024`` and more), in one run, each measurement in its own child process:

1. ``curate`` with 1 local worker and with 2, in-memory dedup (``memory_mb = 0``);
2. ``curate`` with 2 local workers and disk-backed dedup (``memory_mb = --budget-mb``):
   peak RSS of the process holding the dedup keys, against (1); and with 2 local workers
   writing the task journal (sealed, as under the service): what relaunching costs;
3. ``curate`` on a two-node Ray cluster on this machine (a head and a worker node, 1 CPU
   each, on 127.0.0.1 in a network namespace holding only ``lo``: ``tests/ray_cluster.py``;
   needs root and ``pip install 'sovereign-appliance[ray]'``; ``--no-ray`` skips it);
4. the quality filters alone, before (the frozen reference) and after, MB/s on one core
   (``bench/bench_filters.py``);
5. with ``--peer``, datatrove on the same corpus in the same run (``bench/bench_curate.py``,
   which needs ``.venv-bench``: see bench/README.md).

Every curate run must give the same three outputs, byte for byte: the table says so.
Printed: documents/s, MB/s, peak RSS and the ratios. Nothing is asserted.

    .venv/bin/python bench/bench_scale.py --mb 1024 [--budget-mb 256] [--no-ray] [--peer] [--only dedup]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUTPUTS = ("dataset.parquet", "dropped.parquet", "curation.json")


def _proc_field(name: str, key: str) -> int | None:
    """The number after ``key:`` in ``/proc/self/<name>`` (kB in status, bytes in io)."""
    for line in Path("/proc/self", name).read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return None


def _peak_mb() -> float:
    # VmHWM, not ru_maxrss: ru_maxrss is carried over from the parent through fork and exec.
    kb = _proc_field("status", "VmHWM")
    return float("nan") if kb is None else kb / 1024


class _AnonPeak:
    """The highest RssAnon of this process, sampled every 50 ms: memory the process itself holds.
    VmHWM also counts the pages of memory-mapped files it has read (the stage maps its parquet
    inputs), which the kernel can drop at any time; on a 1 GB corpus those are most of it."""

    def __init__(self) -> None:
        import threading

        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kb = max(self.peak_kb, _proc_field("status", "RssAnon") or 0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def _written_mb() -> float:
    # Bytes this process sent to storage: outputs, dedup spill, and the task journal when on.
    written = _proc_field("io", "write_bytes")
    return float("nan") if written is None else written / 1e6


def child_curate(raw: Path, out: Path, workers: int, memory_mb: int, ray_address: str, journal: bool = False) -> dict[str, Any]:
    """One curate run in this process (a child of the driver); its figures and output digests.

    With ``journal``, every finished batch is also written to a task journal sealed under a
    scratch key, as a stage job under the service does (`pipeline.task_journal`)."""
    from keys import sealed
    from pipeline.clean import CleanConfig
    from pipeline.curate import CurateSettings, run_curate
    from pipeline.minhash import DedupConfig
    from pipeline.parallel import stage_tasks
    from pipeline.pii import PiiConfig
    from pipeline.settings.cluster import ClusterConfig

    cluster = ClusterConfig(executor="ray", ray_address=ray_address) if ray_address else ClusterConfig()
    settings = CurateSettings(clean=CleanConfig(workers=workers, min_chars=0), pii=PiiConfig(enabled=False), dedup=DedupConfig(memory_mb=memory_mb))
    tasks: dict[str, Any] = {"cluster": cluster}
    if journal:
        key_id, key = sealed.new_key()
        sealed.add_key(key_id, key)
        sealed.seal_path(out / "task-journal", key_id)
        tasks |= {"journal": out / "task-journal", "inputs": [raw]}
    anon = _AnonPeak()
    start = time.perf_counter()
    with stage_tasks(**tasks) as stats:
        res = run_curate(raw, out, settings)
    wall = time.perf_counter() - start
    return {
        "seconds": wall,
        "peak_mb": _peak_mb(),
        "anon_peak_mb": anon.stop(),
        "written_mb": _written_mb(),
        "tasks": stats.as_dict(),
        "docs_in": res.stats["documents_in"],
        "docs_out": res.stats["documents_out"],
        "bytes_in": res.stats["bytes_in"],
        "digests": {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in OUTPUTS},
    }


def _spawn(args: list[str], prefix: list[str] | None = None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([*(prefix or []), sys.executable, __file__, "--child", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _curate(
    raw: Path, out: Path, workers: int, memory_mb: int = 0, ray_address: str = "", prefix: list[str] | None = None, journal: bool = False
) -> dict[str, Any]:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    result = _spawn(["curate", str(raw), str(out), str(workers), str(memory_mb), ray_address, "journal" if journal else "-"], prefix)
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _, _, what, raw, out, workers, memory_mb, address, journal = sys.argv
        print(json.dumps(child_curate(Path(raw), Path(out), int(workers), int(memory_mb), address, journal == "journal")))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=1024, help="corpus size in MB (default 1024)")
    ap.add_argument("--data", type=Path, default=ROOT / "bench-data")
    ap.add_argument("--budget-mb", type=int, default=256, help="[dedup] memory_mb of the disk-backed run")
    ap.add_argument("--no-ray", action="store_true", help="skip the two-node Ray cluster")
    ap.add_argument("--only", choices=["dedup"], help="dedup: only the two 2-worker runs, in memory and on disk (no Ray, filters or peer)")
    ap.add_argument("--peer", action="store_true", help="also run datatrove on the corpus (bench/bench_curate.py, needs .venv-bench)")
    args = ap.parse_args()

    from bench.corpus import build_corpus
    from pipeline.ingest import IngestConfig, run_ingest

    folder = args.data / f"corpus-{args.mb:g}mb"
    corpus = folder / "corpus.jsonl"
    if not corpus.exists():
        print(f"building {corpus} ({args.mb:g} MB)…", flush=True)
        build_corpus(folder, int(args.mb * 1_000_000))
    work = args.data / f"scale-{args.mb:g}mb"
    raw = work / "ingest" / "raw.parquet"
    if not raw.exists():
        start = time.perf_counter()
        run_ingest(folder, work / "ingest", IngestConfig(include=[corpus.name]))
        print(f"ingest: {time.perf_counter() - start:.1f} s", flush=True)

    runs: dict[str, dict[str, Any]] = {}
    plan = [("local, 1 worker", 1, 0, False), ("local, 2 workers", 2, 0, False), (f"local, 2 workers, memory_mb={args.budget_mb}", 2, args.budget_mb, False)]
    plan.append(("local, 2 workers, task journal", 2, 0, True))
    if args.only == "dedup":
        plan = plan[1:3]
    for name, workers, memory, journal in plan:
        runs[name] = _curate(raw, work / "out", workers, memory, journal=journal)
        print(f"{name}: {runs[name]['seconds']:.1f} s", flush=True)
    if not args.no_ray and not args.only:
        from tests.ray_cluster import ADDRESS, ClusterUnavailable, loopback_cluster

        try:
            with loopback_cluster(ROOT, num_cpus=1) as ns:
                runs["Ray, 2 nodes x 1 CPU"] = _curate(raw, work / "out", 2, 0, ADDRESS, ns)
        except ClusterUnavailable as exc:
            print(f"Ray cluster skipped: {exc}")

    first = next(iter(runs.values()))
    mb_in = first["bytes_in"] / 1e6
    print(f"\ncorpus {corpus} ({mb_in:.1f} MB, {first['docs_in']:,} documents; {first['docs_out']:,} kept)\n")
    print(f"{'curate':44} {'s':>8} {'docs/s':>9} {'MB/s':>7} {'peak MB':>8} {'anon MB':>8}  same output")
    for name, r in runs.items():
        same = r["digests"] == first["digests"]
        print(
            f"{name:44} {r['seconds']:8.1f} {r['docs_in'] / r['seconds']:9.0f} {mb_in / r['seconds']:7.2f} {r['peak_mb']:8.0f} {r['anon_peak_mb']:8.0f}  {same}"
        )
    two = runs["local, 2 workers"]
    disk = runs[f"local, 2 workers, memory_mb={args.budget_mb}"]
    print()
    if "local, 1 worker" in runs:
        print(f"2 workers / 1 worker: {runs['local, 1 worker']['seconds'] / two['seconds']:.2f}x")
    print(
        f"dedup on disk / in memory: peak RSS {disk['peak_mb'] / two['peak_mb']:.2f}x, "
        f"peak anonymous {disk['anon_peak_mb'] / two['anon_peak_mb']:.2f}x, time {disk['seconds'] / two['seconds']:.2f}x"
    )
    if "local, 2 workers, task journal" in runs:
        journaled = runs["local, 2 workers, task journal"]
        print(
            f"with the task journal / without: time {journaled['seconds'] / two['seconds']:.2f}x, "
            f"{journaled['written_mb'] - two['written_mb']:.1f} MB more written ({journaled['tasks']['computed']} batches journaled)"
        )
    if "Ray, 2 nodes x 1 CPU" in runs:
        ray = runs["Ray, 2 nodes x 1 CPU"]
        print(f"Ray 2 nodes / local 2 workers: {two['seconds'] / ray['seconds']:.2f}x the speed")
    if args.only:
        return 0

    print("\nfilters alone, one core (bench/bench_filters.py):", flush=True)
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_filters.py"), "--jsonl", str(corpus), "--rounds", "2"], cwd=ROOT, check=False)
    if args.peer:
        print("\ndatatrove on the same corpus (bench/bench_curate.py):", flush=True)
        peer = ROOT / ".venv-bench" / "bin" / "python"
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "bench_curate.py"), "--corpus", str(corpus), "--workers", "2", "--peer-python", str(peer)],
            cwd=ROOT,
            check=False,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
