"""The ``[dedup]`` recipe table: exact and MinHash near-duplicate removal (``pipeline.minhash``).

Loads without numpy (``pipeline.minhash`` needs it), so a recipe is checked without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import check

# A budget past any machine's memory is a typo; its buffers would fail to allocate mid-stage.
MAX_MEMORY_MB = 1 << 20


@dataclass(kw_only=True)
class DedupConfig:
    # Identical documents after normalisation are found by one digest per document; keeping
    # them teaches memorisation and leaks into validation, at almost no cost to find.
    exact: bool = True
    # Templated pages, mirrors and lightly edited copies survive exact dedup; FineWeb found
    # removing them with MinHash measurably improves models trained on web text.
    near: bool = True
    # FineWeb's value: short enough that an edit changes few shingles, long enough that
    # common phrases ("one of the most") do not make unrelated documents look alike.
    ngram: int = 5
    # 14 bands x 8 rows (FineWeb): candidates above Jaccard ~0.72, 0.92 of pairs at 0.8.
    bands: int = 14
    # More rows per band make a collision demand more agreement: fewer false candidates.
    rows: int = 8
    # Fixes the hash functions; every worker and every re-run must use the same one.
    seed: int = 1
    # 0 keeps every dedup key in memory and sorts them there: fastest, but it grows with the
    # corpus (16 + 8 * bands bytes of keys per document; about 1 GB peak for 3 M documents).
    # Above 0, keys are spilled to sorted files beside the output and merged, so a corpus
    # larger than memory still deduplicates, in about this many MB of working arrays; the
    # output is byte-identical either way, so it is left out of curation.json like workers.
    memory_mb: int = 0

    def __post_init__(self) -> None:
        check(self.ngram >= 1, f"ngram must be >= 1, got {self.ngram}")
        check(self.bands >= 1, f"bands must be >= 1, got {self.bands}")
        check(self.rows >= 1, f"rows must be >= 1, got {self.rows}")
        check(0 <= self.seed < 1 << 64, f"seed must be between 0 and 2**64 - 1, got {self.seed}")
        check(
            0 <= self.memory_mb <= MAX_MEMORY_MB,
            f"memory_mb must be 0 to {MAX_MEMORY_MB} (1 TB), got {self.memory_mb}",
            fix="set dedup.memory_mb = 0 to keep dedup in memory, or to the MB it may use (e.g. 1024)",
        )
