"""A memory-mapped token loader with a resumable position and a seed-determined order.

The train split is cut into non-overlapping windows of ``seq_len + 1`` tokens. Each epoch
visits every window once, in an order drawn from ``(seed, epoch)``, starting at an offset
drawn from the same seed so window boundaries move between epochs. The loader's whole
state is one integer, ``position`` (windows consumed in total), so:

- resuming restores the exact next batch;
- the order does not depend on the number of ranks: a global batch of ``world × batch``
  windows is taken at ``position`` and each rank takes its slice, so a run resumed on a
  different number of ranks continues with the very next unseen windows.

Shards stay memory-mapped; a window that spans two shards is joined from two slices. Only the
epoch's permutation lives in memory (4 bytes per window: 16 MB for 1B tokens at T = 256).
Sealed shards (`SealedTokens`) are never decrypted whole: a batch's windows in one shard are
read and decrypted together, in one AES call.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.shard_format import SealedTokens, ShardSet, read_shard, sealed_windows


class TokenLoader:
    def __init__(self, shards: ShardSet, split: str, *, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.parts = [read_shard(p) for p in shards.shard_files(split)]
        self.sealed = any(isinstance(p, SealedTokens) for p in self.parts)
        self.bounds = np.cumsum([0] + [len(p) for p in self.parts])
        self.total = int(self.bounds[-1])
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world = rank, world
        # One window fewer than fits, so any epoch offset in [0, seq_len) still fits them all.
        self.windows = (self.total - 1) // seq_len - 1
        if self.windows < 1:
            raise ConfigError(
                f"the {split} split of {shards.root} has {self.total} tokens, too few for train.seq_len = {seq_len}",
                "lower train.seq_len or shard more text",
            )
        self.position = 0
        self._epoch = -1
        self._order = np.empty(0, dtype=np.uint32)
        self._offset = 0

    # -- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "seq_len"):
            if int(state[key]) != getattr(self, key):
                raise ConfigError(
                    f"train.{key} is {getattr(self, key)} but the checkpoint's data position was counted with {state[key]}",
                    f"set train.{key} back to {state[key]} to resume, or start in a fresh output directory",
                )
        self.position = int(state["position"])

    @property
    def epoch(self) -> float:
        return self.position / self.windows

    # -- batches ------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets) of shape (batch_size, seq_len); advances the global position."""
        start = self.position + self.rank * self.batch_size
        rows = self._rows([self._begin(start + i) for i in range(self.batch_size)])
        self.position += self.batch_size * self.world
        windows = torch.from_numpy(rows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def _begin(self, index: int) -> int:
        """The first token of window ``index`` (counted over all epochs)."""
        epoch, slot = divmod(index, self.windows)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(self.windows).astype(np.uint32)
            self._offset = int(rng.integers(0, self.seq_len))
            self._epoch = epoch
        return self._offset + int(self._order[slot]) * self.seq_len

    def _rows(self, begins: list[int]) -> np.ndarray:
        """One row of ``seq_len + 1`` ids per window start."""
        width = self.seq_len + 1
        if not self.sealed:
            return np.stack([self._slice(b, b + width) for b in begins])
        rows: list[np.ndarray | None] = []
        where: list[int] = []
        sealed: list[tuple[SealedTokens, int]] = []
        for row, begin in enumerate(begins):
            i = int(np.searchsorted(self.bounds, begin, side="right")) - 1
            part = self.parts[i]
            if isinstance(part, SealedTokens) and begin + width <= self.bounds[i + 1]:
                # Deferred: the batch's sealed windows are decrypted together, in one call below.
                where.append(row)
                sealed.append((part, begin - int(self.bounds[i])))
                rows.append(None)
            else:
                rows.append(self._slice(begin, begin + width))
        if len(sealed) == len(begins):
            return sealed_windows(sealed, width)  # the common case: every window in one call
        if sealed:
            for row, window in zip(where, sealed_windows(sealed, width), strict=True):
                rows[row] = window
        return np.stack(rows)  # type: ignore[arg-type]

    def _slice(self, begin: int, end: int) -> np.ndarray:
        i = int(np.searchsorted(self.bounds, begin, side="right")) - 1
        lo = begin - int(self.bounds[i])
        part = self.parts[i]
        if end <= self.bounds[i + 1]:
            return np.asarray(part[lo : lo + end - begin])
        pieces = [np.asarray(part[lo:])]
        need = end - int(self.bounds[i + 1])
        while need > 0:
            i += 1
            take = np.asarray(self.parts[i][:need])
            pieces.append(take)
            need -= len(take)
        return np.concatenate(pieces)
