"""Token loader throughput on sealed shards against today's plain memory-mapped loader, same run.

Three sides, over the same seeded windows (the batches are checked equal):

- ``today``: the loader as every run before sealing read shards — one slice of the memory map
  per window, stacked per batch (``TodayLoader`` below is that code, kept here as the peer);
- ``plain``: the loader now, on the same plain shards (windows of the next batches gathered
  in one vectorised pass);
- ``sealed``: the loader now, on the same ids sealed with `keys.sealed` (AES-256-CTR; the
  windows of the next batches decrypted in one call per shard).

sealed / today is the issue's goal (0.95 or better); sealed / plain is the cost of decryption
alone. One thread; the sides alternate in short rounds so load drift on the machine hits
each, and the medians of the rounds are compared. Figures are printed, never asserted.

    .venv/bin/python bench/bench_loader_sealed.py [--tokens 50_000_000] [--seq-len 256 512] [--batch 8 32]

The ids are random (uniform over a 32,000-piece vocabulary, so uint16): the loader never
looks at them. The shards live in a temporary directory (or ``--work DIR``), in the page cache
once written, so both sides measure CPU work, not the disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from keys import sealed  # noqa: E402
from pipeline.shard_format import ShardSet, open_shards, write_manifest, write_shard  # noqa: E402
from pipeline.training.loader import TokenLoader  # noqa: E402

VOCAB = 32_000
# Shard size the shard stage writes by default order of magnitude: several shards, so windows
# that span two shards are exercised too.
SHARD_TOKENS = 16_000_000


def build(root: Path, tokens: int, seal_key: str | None) -> ShardSet:
    """A shard set of ``tokens`` train ids (and a small val split), sealed under ``seal_key`` if given."""
    root.mkdir(parents=True, exist_ok=True)
    if seal_key is not None:
        sealed.seal_path(root, seal_key)
    rng = np.random.default_rng(0)
    entries = []
    done = 0
    while done < tokens:
        n = min(SHARD_TOKENS, tokens - done)
        name = f"train_{len(entries):06d}.bin"
        write_shard(root / name, rng.integers(0, VOCAB, n, dtype=np.uint16), VOCAB)
        entries.append({"file": name, "split": "train", "tokens": n})
        done += n
    write_shard(root / "val_000000.bin", rng.integers(0, VOCAB, 10_000, dtype=np.uint16), VOCAB)
    entries.append({"file": "val_000000.bin", "split": "val", "tokens": 10_000})
    write_manifest(root, vocab_size=VOCAB, bos_id=1, eos_id=2, shards=entries, extra={})
    return open_shards(root, verify_digests=False)


class TodayLoader(TokenLoader):
    """The loader before sealing (the peer): one memory-map slice per window, stacked per batch."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.position + self.rank * self.batch_size
        width = self.seq_len + 1
        begins = self._begins(np.arange(start, start + self.batch_size, dtype=np.int64))
        rows = np.stack([self._slice(int(b), int(b) + width) for b in begins])
        self.position += self.batch_size * self.world
        windows = torch.from_numpy(rows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]


def rate(loader: TokenLoader, batches: int) -> float:
    """Tokens per second over ``batches`` calls of next_batch (inputs only: seq_len per row)."""
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return batches * loader.batch_size * loader.seq_len / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=50_000_000, help="train tokens per shard set (default 50M)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--batches", type=int, default=500, help="batches per round and side")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work", type=Path, help="keep the shard sets here (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        key_id, key = sealed.new_key()
        sealed.add_key(key_id, key)
        t0 = time.perf_counter()
        sets = {"plain": build(work / "plain", args.tokens, None), "sealed": build(work / "sealed", args.tokens, key_id)}
        print(f"data: {args.tokens:,} uint16 train tokens per set, shards of {SHARD_TOKENS:,} ({time.perf_counter() - t0:.1f} s to build both)")
        print(f"one thread; {args.rounds} alternating rounds of {args.batches} batches per side; load average {os.getloadavg()[0]:.2f}")
        for seq_len in args.seq_len:
            for batch in args.batch:
                loaders = {
                    "today": TodayLoader(sets["plain"], "train", seq_len=seq_len, batch_size=batch, seed=0),
                    "plain": TokenLoader(sets["plain"], "train", seq_len=seq_len, batch_size=batch, seed=0),
                    "sealed": TokenLoader(sets["sealed"], "train", seq_len=seq_len, batch_size=batch, seed=0),
                }
                first = {side: loader.next_batch()[0] for side, loader in loaders.items()}
                if not (torch.equal(first["today"], first["plain"]) and torch.equal(first["plain"], first["sealed"])):
                    print("the three sides' batches differ: the bench measures nothing", file=sys.stderr)
                    return 1
                rates: dict[str, list[float]] = {side: [] for side in loaders}
                for _ in range(args.rounds):
                    for side, loader in loaders.items():
                        rates[side].append(rate(loader, args.batches))
                med = {side: statistics.median(r) for side, r in rates.items()}
                print(
                    f"seq_len {seq_len:4d} batch {batch:3d}: today {med['today'] / 1e6:6.1f}  plain {med['plain'] / 1e6:6.1f}  "
                    f"sealed {med['sealed'] / 1e6:6.1f} M tok/s/core   sealed / today {med['sealed'] / med['today']:.2f}"
                    f"   sealed / plain {med['sealed'] / med['plain']:.2f}"
                )
        print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
