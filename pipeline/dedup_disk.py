"""Exact and MinHash near-duplicate detection beyond memory, in datatrove's shape.

``[dedup] memory_mb > 0`` selects this path; ``curate._dedup`` is the in-memory one, and
both give the same answer, so the dataset is byte-identical whichever runs.

1. While curation's first pass runs, ``DiskDedup.add`` buffers each batch's keys. When the
   buffer holds as many documents as the budget allows, it is written out as sorted run
   files: one of ``(exact key, row)`` records and one of ``(band key, row)`` records per
   band (datatrove's buckets). Documents without band keys are never written to a band.
2. ``DiskDedup.run`` merges the runs of each file kind in bounded blocks (``_merge``).
   Records come out in ``(key, row)`` order, so the first row of each run of equal exact
   keys is its first occurrence, and consecutive equal band keys among the exact-unique
   rows are duplicate pairs, appended to a pairs file.
3. Union-find over the pairs, a bounded chunk at a time, on a parent array that is a file
   mapping (page cache the kernel can write back, not anonymous memory). Hooking a root
   under the smaller root keeps ``parent[x] <= x``, so every component's root is its lowest
   row: the representative ``pipeline.minhash.find_clusters`` gives.

Everything a corpus makes large — runs, pairs, the per-row arrays, the survivors' doc_ids —
lives in the scratch folder, which ``close`` removes; working arrays are sized from the
budget. Rows are survivor indexes in pass-1 order, as in ``curate._dedup``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.settings.dedup import DedupConfig

# Bytes per "MB" of dedup.memory_mb: a module constant so tests can shrink the budget until
# a small corpus needs many runs, merge steps and union-find chunks.
BYTES_PER_MB = 1 << 20
# The largest clusters the report lists, and the members listed for each (curation.json).
TOP_CLUSTERS = 20
TOP_MEMBERS = 10
# No block or chunk goes below this many entries, whatever the budget: numpy's per-call cost
# would dominate, and a merge step must always make progress.
_MIN_ENTRIES = 16
# Runs merged at once: each holds an open file and a block in hand, so many runs (a small
# budget, a large corpus) are merged in rounds of this many, as a sort's merge passes are,
# rather than opening thousands of files with blocks too small to read efficiently.
_FAN_IN = 32

_EXACT = np.dtype([("k0", "<u8"), ("k1", "<u8"), ("row", "<i8")])
_BAND = np.dtype([("k0", "<u8"), ("row", "<i8")])
_PAIR = np.dtype([("u", "<i8"), ("v", "<i8")])


@dataclass(frozen=True)
class ClusterSummary:
    """What the report reads of the near-duplicate clusters.

    ``top``: (representative row, size with the representative, its first member rows),
    largest first then by row, as ``curate`` lists them.
    """

    count: int
    top: list[tuple[int, int, list[int]]]


def summarise_clusters(clusters: list[tuple[int, list[int]]]) -> ClusterSummary:
    """The summary of ``curate._dedup``'s clusters (already largest first, then by row)."""
    return ClusterSummary(len(clusters), [(rep, len(members) + 1, members[:TOP_MEMBERS]) for rep, members in clusters[:TOP_CLUSTERS]])


@dataclass
class DedupResult:
    """Per survivor row: the row it duplicates (-1 if kept) and the kind (0 exact, 1 near)."""

    duplicate_of: np.ndarray
    kind: np.ndarray
    clusters: ClusterSummary


@dataclass
class _Runs:
    """Sorted run files of one kind (exact keys, or one band)."""

    dtype: np.dtype[Any]
    paths: list[Path] = field(default_factory=list)


class DiskDedup:
    """Spill dedup keys to sorted runs in ``folder`` during pass 1, then dedup from disk.

    ``budget`` is the bytes of working arrays allowed (``dedup.memory_mb`` in bytes).
    Call ``close`` on success and on failure: it removes the folder.
    """

    def __init__(self, folder: Path, cfg: DedupConfig, budget: int) -> None:
        self.folder, self.cfg, self.budget = Path(folder), cfg, budget
        # A folder left by a killed run holds stale runs: start from nothing.
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.rows = 0
        bands = cfg.bands if cfg.near else 0
        # Per buffered document: its keys (16 + 8 per band + 1), then at flush time the sort's
        # index, gathered keys and records of one file kind at a time (about 64).
        per_doc = 17 + 8 * bands + 64
        self._cap = max(_MIN_ENTRIES, budget // per_doc)
        self._exact = np.zeros((self._cap, 2), dtype=np.uint64)
        self._bands = np.zeros((self._cap, bands), dtype=np.uint64)
        self._has = np.zeros(self._cap, dtype=bool)
        self._used = 0
        self._exact_runs = _Runs(_EXACT)
        self._band_runs = [_Runs(_BAND) for _ in range(bands)]
        self._ids: BinaryIO | None = open(self.folder / "doc_ids.bin", "wb")  # noqa: SIM115 - closed in run or close

    # -- pass 1 ------------------------------------------------------------------------------

    def add(self, ids: Sequence[int], exact: bytes, bands: np.ndarray | None, has: np.ndarray | None) -> None:
        """Buffer one batch's keys (``curate._BatchResult``'s), spilling sorted runs when full."""
        if self._ids is None:
            raise RuntimeError("DiskDedup.add after the keys were merged")
        n = len(ids)
        self._ids.write(np.asarray(ids, dtype=np.int64).tobytes())
        keys = np.frombuffer(exact, dtype=np.uint64).reshape(n, 2)
        done = 0
        while done < n:
            take = min(n - done, self._cap - self._used)
            at = slice(self._used, self._used + take)
            self._exact[at] = keys[done : done + take]
            if self._band_runs and bands is not None and has is not None:
                self._bands[at] = bands[done : done + take]
                self._has[at] = has[done : done + take]
            else:
                self._has[at] = False
            self._used += take
            done += take
            if self._used == self._cap:
                self._spill()

    def _spill(self) -> None:
        used, first = self._used, self.rows
        if not used:
            return
        rows = np.arange(first, first + used, dtype=np.int64)
        index = len(self._exact_runs.paths)
        exact = self._exact[:used]
        # lexsort is stable and the buffer is in row order: equal keys stay in row order.
        order = np.lexsort((exact[:, 1], exact[:, 0]))
        rec = np.empty(used, dtype=_EXACT)
        rec["k0"], rec["k1"], rec["row"] = exact[order, 0], exact[order, 1], rows[order]
        self._exact_runs.paths.append(self._write(rec, f"exact-{index:06d}.run"))
        del rec, order
        for band, runs in enumerate(self._band_runs):
            column = self._bands[:used, band]
            # find_clusters links only non-zero keys of documents that have keys.
            keep = np.flatnonzero(self._has[:used] & (column != 0))
            order = keep[np.lexsort((column[keep],))]
            brec = np.empty(len(order), dtype=_BAND)
            brec["k0"], brec["row"] = column[order], rows[order]
            runs.paths.append(self._write(brec, f"band{band:03d}-{index:06d}.run"))
        self.rows += used
        self._used = 0

    def _write(self, records: np.ndarray, name: str) -> Path:
        path = self.folder / name
        records.tofile(path)
        return path

    # -- pass 2 ------------------------------------------------------------------------------

    def run(self) -> DedupResult:
        """Exact, then near dedup over everything added; the same answer as ``curate._dedup``."""
        self._spill()
        if self._ids is not None:
            self._ids.close()
            self._ids = None
        # The buffers are no longer needed: give their memory back before merging.
        self._exact = self._bands = np.zeros((0, 0), dtype=np.uint64)
        self._has = np.zeros(0, dtype=bool)
        n = self.rows
        duplicate_of = self._array("duplicate_of", n, np.int64, -1)
        kind = self._array("kind", n, np.int8, 0)
        summary = ClusterSummary(0, [])
        if n == 0:
            return DedupResult(duplicate_of, kind, summary)
        if self.cfg.exact:
            self._exact_pass(duplicate_of)
        if self._band_runs:
            parent = self._array("parent", n, np.int64, None)
            pairs = self.folder / "pairs.bin"
            with open(pairs, "wb") as out:
                for runs in self._band_runs:
                    self._band_pass(runs, duplicate_of, out)
            self._union(parent, pairs)
            summary = self._mark_near(parent, duplicate_of, kind)
            del parent
        return DedupResult(duplicate_of, kind, summary)

    def doc_ids(self, rows: set[int]) -> dict[int, int]:
        """doc_id of each of ``rows`` (survivor rows, as in ``DedupResult``)."""
        if not rows or not self.rows:
            return {}
        ids = np.memmap(self.folder / "doc_ids.bin", dtype=np.int64, mode="r", shape=(self.rows,))
        return {row: int(ids[row]) for row in sorted(rows)}

    def close(self) -> None:
        """Remove the scratch folder (mappings of its files stay valid until dropped)."""
        if self._ids is not None:
            self._ids.close()
            self._ids = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def _array(self, name: str, n: int, dtype: Any, fill: int | None) -> np.ndarray:
        """A per-row array in the scratch folder; ``fill`` None means ``arange``."""
        if n == 0:
            return np.zeros(0, dtype=dtype)
        arr = np.memmap(self.folder / f"{name}.bin", dtype=dtype, mode="w+", shape=(n,))
        step = self._chunk(np.dtype(dtype).itemsize)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            arr[lo:hi] = np.arange(lo, hi) if fill is None else fill
        return arr

    def _chunk(self, bytes_per_entry: int) -> int:
        return max(_MIN_ENTRIES, self.budget // bytes_per_entry)

    def _exact_pass(self, duplicate_of: np.ndarray) -> None:
        head_key: tuple[int, int] | None = None
        head_row = -1
        for rec in _merge(self._exact_runs, self.budget):
            k0, k1, rows = rec["k0"], rec["k1"], rec["row"]
            starts = np.ones(len(rec), dtype=bool)
            starts[1:] = (k0[1:] != k0[:-1]) | (k1[1:] != k1[:-1])
            # A run of equal keys begun in the previous block keeps that block's first row.
            continues = head_key is not None and (int(k0[0]), int(k1[0])) == head_key
            starts[0] = not continues
            idx = np.maximum.accumulate(np.where(starts, np.arange(len(rec)), 0))
            heads = rows[idx]
            if continues:
                heads[idx == 0] = head_row
            dup = heads != rows
            duplicate_of[rows[dup]] = heads[dup]
            head_key, head_row = (int(k0[-1]), int(k1[-1])), int(heads[-1])

    def _band_pass(self, runs: _Runs, duplicate_of: np.ndarray, out: BinaryIO) -> None:
        last_key, last_row = 0, -1
        for rec in _merge(runs, self.budget):
            # Near dedup runs over the exact-unique rows only, as in curate._dedup.
            rec = rec[duplicate_of[rec["row"]] < 0]
            if not len(rec):
                continue
            # Explicit dtypes: a Python int beside uint64 keys would promote them to float64.
            keys = np.concatenate((np.array([last_key], dtype=np.uint64), rec["k0"]))
            rows = np.concatenate((np.array([last_row], dtype=np.int64), rec["row"]))
            # Consecutive equal keys are linked: a chain spans each run of equal keys, which
            # gives the components find_clusters's star (every member to the first) gives.
            link = np.flatnonzero((keys[1:] == keys[:-1]) & (rows[:-1] >= 0))
            pairs = np.empty(len(link), dtype=_PAIR)
            pairs["u"], pairs["v"] = rows[link], rows[link + 1]
            out.write(pairs.tobytes())
            last_key, last_row = int(keys[-1]), int(rows[-1])

    def _union(self, parent: np.ndarray, pairs_path: Path) -> None:
        # About a dozen pair-sized temporaries live at once.
        step = self._chunk(12 * 8)
        with open(pairs_path, "rb") as f:
            while True:
                pairs = np.fromfile(f, dtype=_PAIR, count=step)
                if not len(pairs):
                    break
                u, v = pairs["u"].copy(), pairs["v"].copy()
                del pairs
                while len(u):
                    ru, rv = _find(parent, u), _find(parent, v)
                    # Path compression: the next chunk's finds start next to the root.
                    parent[u], parent[v] = ru, rv
                    differ = ru != rv
                    u, v = ru[differ], rv[differ]
                    # Hook the larger root under the smaller: parent[x] <= x stays true.
                    np.minimum.at(parent, np.maximum(u, v), np.minimum(u, v))
        # Flatten, in ascending blocks: a row's parent is lower, so earlier blocks are
        # already flat and a pointer chain inside the block ends in a few steps.
        step = self._chunk(4 * 8)
        for lo in range(0, len(parent), step):
            hi = min(len(parent), lo + step)
            parent[lo:hi] = _find(parent, np.arange(lo, hi))

    def _mark_near(self, parent: np.ndarray, duplicate_of: np.ndarray, kind: np.ndarray) -> ClusterSummary:
        n = len(parent)
        # The cluster sizes are counted in the parent array itself, block by block in
        # ascending order: a block's representatives are at or below it, where the parents
        # have been read already, so no second row-sized file (or its pages) is needed.
        sizes = parent
        step = self._chunk(6 * 8)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            rep = np.array(parent[lo:hi])
            parent[lo:hi] = 0
            near = np.flatnonzero(rep != np.arange(lo, hi))
            duplicate_of[lo + near] = rep[near]
            kind[lo + near] = 1
            np.add.at(sizes, rep[near], 1)
        count = 0
        top_reps = np.zeros(0, dtype=np.int64)
        top_sizes = np.zeros(0, dtype=np.int64)
        for lo in range(0, n, step):
            block = np.asarray(sizes[lo : lo + step])
            reps = np.flatnonzero(block)
            count += len(reps)
            cand_reps = np.concatenate((top_reps, reps + lo))
            cand_sizes = np.concatenate((top_sizes, block[reps]))
            # Largest first, then by row: the order curate._dedup sorts its clusters in.
            order = np.lexsort((cand_reps, -cand_sizes))[:TOP_CLUSTERS]
            top_reps, top_sizes = cand_reps[order], cand_sizes[order]
        members: dict[int, list[int]] = {int(r): [] for r in top_reps}
        for lo in range(0, n, step):
            if all(len(m) >= TOP_MEMBERS for m in members.values()):
                break
            dup = np.asarray(duplicate_of[lo : lo + step])
            near = np.asarray(kind[lo : lo + step]) == 1
            for head, listed in members.items():
                if len(listed) < TOP_MEMBERS:
                    found = np.flatnonzero(near & (dup == head))[: TOP_MEMBERS - len(listed)]
                    listed.extend(int(r) + lo for r in found)
        return ClusterSummary(count, [(int(r), int(s) + 1, members[int(r)]) for r, s in zip(top_reps, top_sizes)])


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The root of every row in ``x`` (vectorised pointer chasing)."""
    r = np.asarray(parent[x])
    while True:
        p = np.asarray(parent[r])
        if np.array_equal(p, r):
            return r
        r = p


class _Reader:
    """Sequential blocks of one sorted run file."""

    def __init__(self, path: Path, dtype: np.dtype[Any], block: int) -> None:
        self.file = open(path, "rb")  # noqa: SIM115 - closed by _merge
        self.dtype, self.block = dtype, block
        self.done = False

    def read(self) -> np.ndarray:
        data = np.fromfile(self.file, dtype=self.dtype, count=self.block)
        if len(data) < self.block:
            self.done = True
            self.file.close()
        return data


def _merge(runs: _Runs, budget: int) -> Iterator[np.ndarray]:
    """The records of all ``runs``, in (key, row) order, in blocks of bounded size.

    ``runs.paths`` must be in row order: each run's rows all below the next run's.

    Each step tops up every run whose records in hand are fewer than half a block, then
    emits every record up to the smallest last-loaded record of the runs not yet
    exhausted: all unread records are above it, so the output is in order. The run
    holding that record empties its hand, so every step makes progress; topping up the
    others keeps each step about half of everything in hand, not one run's block.
    """
    if not runs.paths:
        return
    if len(runs.paths) > _FAN_IN:
        _reduce(runs, budget)
    fields = [name for name in runs.dtype.names or () if name != "row"] + ["row"]
    # Up to 1.5 blocks per run in hand, plus the step's concatenation and sorted copy.
    block = max(_MIN_ENTRIES, budget // (5 * len(runs.paths) * runs.dtype.itemsize))
    readers = [_Reader(p, runs.dtype, block) for p in runs.paths]
    hand = [np.zeros(0, dtype=runs.dtype) for _ in readers]
    try:
        while True:
            for i, reader in enumerate(readers):
                if 2 * len(hand[i]) < block and not reader.done:
                    hand[i] = np.concatenate((hand[i], reader.read()))
            if not any(len(h) for h in hand):
                return
            limits = [tuple(h[-1][f] for f in fields) for h, r in zip(hand, readers) if len(h) and not r.done]
            bound = min(limits) if limits else None
            out = []
            for i, h in enumerate(hand):
                cut = len(h) if bound is None else _count_at_most(h, fields, bound)
                if cut:
                    out.append(h[:cut])
                    hand[i] = h[cut:]
            merged = np.concatenate(out)
            del out
            # Hands are concatenated in run order, which is row order, and lexsort is stable:
            # sorting on the key alone leaves equal keys in row order.
            yield merged[np.lexsort([merged[f] for f in reversed(fields[:-1])])]
    finally:
        for reader in readers:
            if not reader.done:
                reader.file.close()


def _count_at_most(records: np.ndarray, fields: list[str], bound: tuple[Any, ...]) -> int:
    """How many of ``records`` (sorted over ``fields``) are lexicographically <= ``bound``."""
    lo, hi = 0, len(records)
    for name, value in zip(fields, bound):
        # [lo, hi) agree with bound on the fields before this one, and are sorted on it.
        column = records[name][lo:hi]
        lo, hi = lo + int(np.searchsorted(column, value, "left")), lo + int(np.searchsorted(column, value, "right"))
    return hi


def _reduce(runs: _Runs, budget: int) -> None:
    """Merge neighbouring runs until a single merge can take them all.

    Each round merges just enough consecutive runs (the shortest such window) to leave
    ``_FAN_IN``, so 35 runs cost one extra pass over 4 of them, not over all 35; merging
    neighbours keeps the runs in row order, which ``_merge`` relies on.
    """
    rounds = 0
    while len(runs.paths) > _FAN_IN:
        take = min(_FAN_IN, len(runs.paths) - _FAN_IN + 1)
        sizes = np.array([p.stat().st_size for p in runs.paths])
        window = np.convolve(sizes, np.ones(take, dtype=sizes.dtype), mode="valid")
        at = int(np.argmin(window))
        group = _Runs(runs.dtype, runs.paths[at : at + take])
        path = group.paths[0].with_name(f"{group.paths[0].stem}.merged{rounds}")
        with open(path, "wb") as out:
            for block in _merge(group, budget):
                out.write(block.tobytes())
        for done in group.paths:
            done.unlink()
        runs.paths[at : at + take] = [path]
        rounds += 1
