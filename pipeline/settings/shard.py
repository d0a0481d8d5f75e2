"""The ``[shard]`` recipe table: the validation split and the size of token shard files."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import check


@dataclass(kw_only=True)
class ShardConfig:
    # 5 % held out measures generalisation while leaving small corpora 95 % to learn from.
    val_fraction: float = 0.05
    # 16M ids = 32 MiB per file as uint16: cheap to hash, copy and memory-map one at a time.
    shard_tokens: int = 1 << 24
    # Changes which documents are held out, e.g. for a second, independent validation split.
    seed: int = 0
    # Encoding processes; 0 = one per core. The shards are the same for any value.
    workers: int = 0

    def __post_init__(self) -> None:
        check(self.workers >= 0, "workers must be >= 0 (0 = one per core)")
        check(0.0 < self.val_fraction < 1.0, "val_fraction must be between 0 and 1 (exclusive)")
        check(self.shard_tokens >= 1, "shard_tokens must be >= 1")
