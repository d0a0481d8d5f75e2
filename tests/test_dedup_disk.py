"""Disk-backed dedup ([dedup] memory_mb > 0): the same answer as the in-memory path, in bounded memory."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pipeline.dedup_disk as dedup_disk
from keys.digest import sha256_file
from pipeline.config import from_mapping
from pipeline.curate import SPILL_DIR, CurateSettings, _dedup, run_curate
from pipeline.dedup_disk import DiskDedup, summarise_clusters
from pipeline.errors import ConfigError, DataError
from pipeline.minhash import DedupConfig
from tests.test_curate import prose, settings, write_raw

ROOT = Path(__file__).resolve().parents[1]


def chained_corpus(seed: int = 11) -> list[tuple[str, str]]:
    """Originals, chains of one-word edits (each edits the previous), exact copies of both."""
    rng = random.Random(seed)
    docs: list[tuple[str, str]] = []
    for i in range(120):
        base = prose(rng, 15)
        docs.append((f"s{i % 4}/a.txt", base))
        words = base.split(" ")
        # A chain: each link is one more word away from the original, so the far end may share
        # no band with it and joins the cluster only through the links between.
        for link in range(rng.randrange(0, 6)):
            words[rng.randrange(len(words))] = f"edit{i}x{link}"
            docs.append((f"s{link % 4}/b.txt", " ".join(words)))
        if rng.random() < 0.5:
            docs.append(("s9/copy.txt", rng.choice(docs)[1]))  # an exact copy of an original or of a near duplicate
    # Copies placed far from their source, and a few documents too short to shingle alike.
    docs += [("s8/late.txt", docs[j][1]) for j in rng.sample(range(len(docs)), 30)]
    docs += [("s7/short.txt", f"Brief note number {i} here.") for i in range(5)]
    return docs


@pytest.fixture(scope="module")
def chained_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_raw(tmp_path_factory.mktemp("raw") / "raw.parquet", chained_corpus())


def test_curate_output_is_byte_identical_on_disk(chained_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = run_curate(chained_raw, tmp_path / "memory", settings(1))
    # A "MB" of 3 KB: a run holds a few dozen documents, so each band has many runs, every
    # merge step is small and the union-find takes many chunks.
    monkeypatch.setattr(dedup_disk, "BYTES_PER_MB", 3000)
    disk = run_curate(chained_raw, tmp_path / "disk", settings(1, dedup=DedupConfig(memory_mb=1)))
    for name in ("dataset", "curation", "dropped"):
        assert sha256_file(memory.outputs[name]) == sha256_file(disk.outputs[name]), name
    report = json.loads(memory.outputs["curation"].read_text())
    assert report["dedup"]["exact_dropped"] > 30 and report["dedup"]["near_dropped"] > 100
    assert report["dedup"]["largest_clusters"][0]["size"] >= 5
    assert "memory_mb" not in report["config"]["dedup"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["curation.json", "dataset.parquet", "dropped.parquet"]


def test_scratch_folder_is_removed_on_failure(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw.parquet", [("a.txt", "x")] * 3)  # every document too short
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no documents left"):
        run_curate(raw, out, settings(1, dedup=DedupConfig(memory_mb=1)))
    assert not out.exists()
    out.mkdir()
    with pytest.raises(DataError):
        run_curate(raw, out, settings(1, dedup=DedupConfig(memory_mb=1)))
    assert not (out / SPILL_DIR).exists() and list(out.iterdir()) == []


def test_bad_memory_mb_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"dedup\.memory_mb") as err:
        from_mapping(DedupConfig, {"memory_mb": -5}, source="r.toml", prefix="dedup")
    assert "memory_mb must be 0 to 1048576 (1 TB), got -5" in str(err.value)
    # Ten orders of magnitude too large: refused when the recipe is read, not mid-stage.
    with pytest.raises(ConfigError, match=r"dedup\.memory_mb must be 0 to 1048576 \(1 TB\), got 10000000000"):
        from_mapping(DedupConfig, {"memory_mb": 10**10}, source="r.toml", prefix="dedup")
    with pytest.raises(ConfigError, match=r"dedup\.memory_mb"):
        from_mapping(DedupConfig, {"memory_mb": "1GB"}, source="r.toml", prefix="dedup")
    assert from_mapping(DedupConfig, {"memory_mb": 512}, source="r.toml", prefix="dedup").memory_mb == 512
    assert CurateSettings().dedup.memory_mb == 0  # the in-memory path stays the default


# -- the dedup step alone, against curate._dedup ---------------------------------------------


def both_ways(tmp_path: Path, exact: np.ndarray, bands: np.ndarray, has: np.ndarray, cfg: DedupConfig, budget: int = 2000, batch: int = 37) -> None:
    """Run curate._dedup and DiskDedup on the same keys, in batches, and compare everything."""
    n = len(exact)
    exact_parts = [exact[i : i + batch].tobytes() for i in range(0, n, batch)]
    band_parts = [bands[i : i + batch] for i in range(0, n, batch)] if cfg.near else []
    has_parts = [has[i : i + batch] for i in range(0, n, batch)] if cfg.near else []
    want_dup, want_kind, clusters = _dedup(exact_parts, band_parts, has_parts, n, cfg)
    disk = DiskDedup(tmp_path / "spill", cfg, budget)
    try:
        for i in range(0, n, batch):
            sl = slice(i, i + batch)
            disk.add(list(range(1000 + i, 1000 + min(n, i + batch))), exact[sl].tobytes(), bands[sl] if cfg.near else None, has[sl] if cfg.near else None)
        got = disk.run()
        np.testing.assert_array_equal(np.asarray(got.duplicate_of), want_dup)
        np.testing.assert_array_equal(np.asarray(got.kind), want_kind)
        assert got.clusters == summarise_clusters(clusters)
        assert disk.doc_ids({0, n - 1} if n else set()) == ({0: 1000, n - 1: 999 + n} if n else {})
    finally:
        disk.close()
    assert not (tmp_path / "spill").exists()


def random_keys(rng: np.random.Generator, n: int, n_bands: int, exact_pool: int, band_pool: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Small pools make collisions; an odd multiplier spreads them over all 64 bits (keys above
    # 2**63 and below 2**53 alike) without making or breaking any.
    spread = np.array([[0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9]], dtype=np.uint64)
    exact = rng.integers(0, exact_pool, size=(n, 1), dtype=np.uint64) * spread + np.uint64(1)
    bands = rng.integers(1, band_pool + 1, size=(n, n_bands), dtype=np.uint64) * spread[:, :1]
    # Same exact key, same band keys: exact duplicates agree on their bands, as real ones do.
    bands = np.where(rng.random((n, 1)) < 0.3, exact[:, :1] * np.uint64(7919) + np.arange(n_bands, dtype=np.uint64), bands)
    bands[bands == 0] = 1
    has = rng.random(n) > 0.1
    bands[~has] = 0
    return exact, bands, has


@pytest.mark.parametrize("seed", range(6))
def test_random_keys_match_the_in_memory_path(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    exact, bands, has = random_keys(rng, n, int(rng.integers(1, 6)), exact_pool=int(rng.integers(1, n + 1)), band_pool=int(rng.integers(2, 4 * n + 3)))
    both_ways(tmp_path, exact, bands, has, DedupConfig(bands=bands.shape[1]), budget=int(rng.integers(500, 20_000)))


@pytest.mark.parametrize(("exact_on", "near_on"), [(True, False), (False, True), (False, False)])
def test_switches(tmp_path: Path, exact_on: bool, near_on: bool) -> None:
    exact, bands, has = random_keys(np.random.default_rng(9), 800, 3, exact_pool=300, band_pool=900)
    both_ways(tmp_path, exact, bands, has, DedupConfig(bands=3, exact=exact_on, near=near_on))


def test_edge_cases(tmp_path: Path) -> None:
    cfg = DedupConfig(bands=3)
    empty = np.zeros((0, 2), dtype=np.uint64), np.zeros((0, 3), dtype=np.uint64), np.zeros(0, dtype=bool)
    both_ways(tmp_path / "none", *empty, cfg)
    n = 500
    distinct = np.stack([np.arange(n), np.arange(n)], axis=1).astype(np.uint64) + np.uint64(1)
    unique_bands = np.arange(1, 3 * n + 1, dtype=np.uint64).reshape(n, 3)
    both_ways(tmp_path / "unique", distinct, unique_bands, np.ones(n, dtype=bool), cfg)
    # Every document shares band 0's key (one above 2**63, where a float64 would round it):
    # one giant cluster, represented by row 0, that spans every merge step.
    giant = unique_bands.copy()
    giant[:, 0] = 0xFFFF_FFFF_FFFF_FF01
    both_ways(tmp_path / "giant", distinct, giant, np.ones(n, dtype=bool), cfg)
    # The same keys, but documents without band keys never cluster, and exact copies of every
    # document: near dedup only sees the first copy of each.
    has = np.arange(n) % 3 != 0
    both_ways(tmp_path / "has", distinct, np.where(has[:, None], giant, 0), has, cfg)
    both_ways(tmp_path / "copies", np.repeat(distinct[:50], 10, axis=0), np.repeat(giant[:50], 10, axis=0), np.ones(n, dtype=bool), cfg)
    # A chain: row i shares band (i % 3) with row i + 1, and rows are added in reverse.
    chain = unique_bands.copy()
    for i in range(n - 1):
        chain[i + 1, i % 3] = chain[i, i % 3]
    both_ways(tmp_path / "chain", distinct, chain, np.ones(n, dtype=bool), cfg, budget=600, batch=1)


# -- memory: peak RSS of the dedup step alone, in child processes ------------------------------

_CHILD = r"""
import hashlib, json, sys
from pathlib import Path
import numpy as np
from pipeline.curate import _dedup
from pipeline.dedup_disk import DiskDedup, summarise_clusters
from pipeline.minhash import DedupConfig

mode, rows, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
cfg, batch = DedupConfig(bands=4), 4096
M = np.uint64(0x9E3779B97F4A7C15)

def keys(lo):
    # Deterministic per batch, so the two children see the same keys without storing them.
    rng = np.random.default_rng(lo)
    row = np.arange(lo, min(rows, lo + batch), dtype=np.uint64)
    ident = np.where(rng.random(len(row)) < 0.1, rng.integers(0, lo + 1, len(row)).astype(np.uint64), row)
    cluster = np.where(rng.random(len(row)) < 0.2, ident // np.uint64(4), ident + np.uint64(1 << 40))
    exact = np.stack([ident * M + np.uint64(1), ident ^ M], axis=1)
    bands = (cluster[:, None] * M + np.arange(1, 5, dtype=np.uint64)) | np.uint64(1)
    has = rng.random(len(row)) > 0.02
    bands[~has] = 0
    return len(row), exact.tobytes(), bands, has

def peak_kb():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from pytest through fork and exec.
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1])

np.zeros(1).sum()
base = peak_kb()
if mode == "memory":
    ex, bp, hp = [], [], []
    for lo in range(0, rows, batch):
        _, e, b, h = keys(lo)
        ex.append(e); bp.append(b); hp.append(h)
    dup, kind, clusters = _dedup(ex, bp, hp, rows, cfg)
    summary = summarise_clusters(clusters)
else:
    disk = DiskDedup(folder, cfg, 4 << 20)
    for lo in range(0, rows, batch):
        n, e, b, h = keys(lo)
        disk.add(list(range(lo, lo + n)), e, b, h)
    res = disk.run()
    dup, kind, summary = res.duplicate_of, res.kind, res.clusters
peak = peak_kb()
digest = hashlib.sha256(repr(summary).encode())
for lo in range(0, rows, 1 << 16):
    digest.update(np.ascontiguousarray(dup[lo : lo + (1 << 16)]).tobytes())
    digest.update(np.ascontiguousarray(kind[lo : lo + (1 << 16)]).tobytes())
print(json.dumps({"growth_kb": peak - base, "digest": digest.hexdigest(), "dropped": int(np.count_nonzero(np.asarray(dup) >= 0))}))
if mode == "disk":
    disk.close()
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS is read from /proc (Linux)")
def test_disk_path_peak_memory_is_far_below_the_in_memory_one(tmp_path: Path) -> None:
    rows = 2_000_000

    def child(mode: str) -> dict[str, int | str]:
        out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(rows), str(tmp_path / mode)], capture_output=True, text=True, cwd=ROOT, check=True)
        result: dict[str, int | str] = json.loads(out.stdout)
        return result

    memory, disk = child("memory"), child("disk")
    assert memory["digest"] == disk["digest"] and int(memory["dropped"]) > rows // 10
    # The in-memory path holds 48 bytes of keys per document and sorts them (hundreds of MB
    # here); the disk path a 4 MB budget plus the mapped per-row arrays it touches.
    assert int(disk["growth_kb"]) * 3 < int(memory["growth_kb"]), (memory, disk)
    assert not (tmp_path / "disk").exists()
