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

from collections import deque

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.shard_format import SealedTokens, ShardSet, read_shard

# Windows read (or decrypted) per call (see TokenLoader._read_ahead).
AHEAD_WINDOWS = 256


class TokenLoader:
    def __init__(self, shards: ShardSet, split: str, *, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.parts = [read_shard(p) for p in shards.shard_files(split)]
        self.sealed = any(isinstance(p, SealedTokens) for p in self.parts)
        self.bounds = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = np.result_type(*[p.dtype for p in self.parts]) if self.parts else np.dtype(np.uint16)
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
        self._ahead: deque[np.ndarray] = deque()
        self._ahead_at = -1
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
        if not self._ahead or self._ahead_at != self.position:
            self._read_ahead()
        rows = self._ahead.popleft()
        self._ahead_at += self.batch_size * self.world
        self.position += self.batch_size * self.world
        windows = torch.from_numpy(rows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def _read_ahead(self) -> None:
        """This rank's windows of the next batches, read (and on sealed shards decrypted) at once.

        Every window is known from (seed, position), so about AHEAD_WINDOWS of them are taken in
        one vectorised pass per shard — one gather from the memory map, or one AES call on a
        sealed shard — instead of one slice (or one cipher) per window: a few hundred KB, never
        a whole shard. ``position`` stays the loader's only state: a reloaded loader reads afresh.
        """
        step = self.batch_size * self.world
        batches = max(1, AHEAD_WINDOWS // self.batch_size)
        first = self.position + self.rank * self.batch_size
        index = first + (np.arange(batches, dtype=np.int64)[:, None] * step + np.arange(self.batch_size, dtype=np.int64)).reshape(-1)
        rows = self._rows(self._begins(index))
        self._ahead = deque(rows[j * self.batch_size : (j + 1) * self.batch_size] for j in range(batches))
        self._ahead_at = self.position

    def _begins(self, index: np.ndarray) -> np.ndarray:
        """The first token of each window ``index`` (counted over all epochs)."""
        epoch, slot = np.divmod(index, self.windows)
        out = np.empty(len(index), dtype=np.int64)
        for e in np.unique(epoch):
            if e != self._epoch:
                rng = np.random.default_rng([self.seed, int(e)])
                self._order = rng.permutation(self.windows).astype(np.uint32)
                self._offset = int(rng.integers(0, self.seq_len))
                self._epoch = int(e)
            here = epoch == e
            out[here] = self._offset + self._order[slot[here]].astype(np.int64) * self.seq_len
        return out

    def _rows(self, starts: np.ndarray) -> np.ndarray:
        """One row of ``seq_len + 1`` ids per window start: per shard, one gather or one decryption."""
        width = self.seq_len + 1
        shard = np.searchsorted(self.bounds, starts, side="right") - 1
        inside = starts + width <= self.bounds[shard + 1]
        out = np.empty((len(starts), width), dtype=self.dtype)
        for i in np.unique(shard[inside]):
            part = self.parts[i]
            rows = np.flatnonzero(inside & (shard == i))
            local = starts[rows] - self.bounds[i]
            if isinstance(part, SealedTokens):
                out[rows] = part.take(local, width)
            else:
                # Row r of this strided view of the memory map is the window starting at token r.
                view = np.lib.stride_tricks.as_strided(part, shape=(len(part) - width + 1, width), strides=(part.strides[0],) * 2, writeable=False)
                out[rows] = view[local]
        for row in np.flatnonzero(~inside):  # a window across two shards: joined from slices
            out[row] = self._slice(int(starts[row]), int(starts[row]) + width)
        return out

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
