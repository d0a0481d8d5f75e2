"""Rendered examples -> training windows of at most ``seq_len`` tokens, and batches of them.

With ``packing`` several examples share one window (best-fit decreasing, so windows fill and
no example is split across two). Each example's ``position_ids`` restart at 0 and
``collate`` gives a 4-D block-diagonal causal mask ([batch, 1, seq, seq], 0 where a token may
attend, the dtype's minimum where not): a token sees only earlier tokens of its own example.

Why a 4-D mask and not position ids alone: transformers 5 does detect packing from
position ids (``masking_utils.find_packed_sequence_indices``), but only when no 2-D mask and
no cache is passed, and Llama/Qwen2 create a ``DynamicCache`` whenever ``use_cache`` is on (the
config default), even in training. Measured on the tiny Llama (sdpa and eager, CPU): with
position ids alone example B's logits change when example A's tokens do; with the 4-D float
mask they do not, and equal B's logits run alone. A 4-D mask is passed through untouched by
both sdpa and eager attention (a boolean one is not: eager adds it to the scores). sdpa needs
the mask in the model's dtype, hence ``collate(dtype=...)``. The mask costs batch * seq^2
elements (seq 2048, batch 8, bf16: 64 MiB).

An example longer than ``seq_len`` keeps its first ``seq_len`` tokens and is counted in
``truncated``; one with no trained token in what is kept (a prompt longer than the window)
is dropped, counted in ``dropped``. Without ``packing`` each window is one example; ``collate`` right-pads the batch to
its longest window with the pad id, labels ``IGNORE`` and a 2-D attention mask of 0 there.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.finetune.render import IGNORE, Example

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class Window:
    """One row of a batch: tokens, labels, positions, and which example each token belongs to."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    # 0, 1, ... per example in the window: the blocks of the attention mask.
    segments: list[int] = field(default_factory=list)
    packed: bool = False

    def add(self, example: Example, length: int) -> None:
        segment = self.segments[-1] + 1 if self.segments else 0
        self.input_ids += example.input_ids[:length]
        self.labels += example.labels[:length]
        self.position_ids += range(length)
        self.segments += [segment] * length


@dataclass(slots=True)
class Packed:
    windows: list[Window]
    # Examples cut to seq_len; examples left out because no trained token was kept.
    truncated: int = 0
    dropped: int = 0


def build_windows(examples: Sequence[Example], seq_len: int, packing: bool) -> Packed:
    """Windows of at most ``seq_len`` tokens: packed (several examples each) or one example each."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    kept: list[tuple[Example, int]] = []
    truncated = dropped = 0
    for example in examples:
        length = len(example.input_ids)
        if length > seq_len:
            truncated += 1
            length = seq_len
        if all(label == IGNORE for label in example.labels[:length]):
            dropped += 1  # a window row that teaches nothing would still cost a forward pass
            continue
        kept.append((example, length))
    windows: list[Window] = []
    if not packing:
        for example, length in kept:
            window = Window()
            window.add(example, length)
            windows.append(window)
        return Packed(windows, truncated, dropped)
    # Best-fit decreasing: each example (longest first) goes to the fullest window it fits in.
    order = sorted(range(len(kept)), key=lambda i: -kept[i][1])
    free: list[tuple[int, int]] = []  # (room left, window index), sorted
    for i in order:
        example, length = kept[i]
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            room, w = free.pop(at)
        else:
            room, w = seq_len, len(windows)
            windows.append(Window(packed=True))
        windows[w].add(example, length)
        if room - length > 0:
            bisect.insort(free, (room - length, w))
    return Packed(windows, truncated, dropped)


def collate(windows: Sequence[Window], pad_id: int, *, dtype: Any = None) -> dict[str, torch.Tensor]:
    """A batch: input_ids, labels, position_ids ([batch, seq]) and attention_mask.

    attention_mask is 2-D (1 = token, 0 = padding) for unpacked windows, 4-D block-diagonal
    causal in ``dtype`` (default float32; pass the model's) for packed ones.
    """
    import torch

    if not windows:
        raise ValueError("collate needs at least one window")
    width = max(len(w.input_ids) for w in windows)

    def pad(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    batch = {
        "input_ids": torch.tensor([pad(w.input_ids, pad_id) for w in windows], dtype=torch.long),
        "labels": torch.tensor([pad(w.labels, IGNORE) for w in windows], dtype=torch.long),
        # Padding continues an unpacked row's positions; in a packed row it is one more "example" from 0.
        "position_ids": torch.tensor([w.position_ids + _pad_positions(w, width) for w in windows], dtype=torch.long),
    }
    if any(w.packed for w in windows):
        segments = torch.tensor([pad(w.segments, -1) for w in windows], dtype=torch.long)
        batch["attention_mask"] = block_causal_mask(segments, dtype or torch.float32)
    else:
        batch["attention_mask"] = torch.tensor([pad([1] * len(w.input_ids), 0) for w in windows], dtype=torch.long)
    return batch


def _pad_positions(window: Window, width: int) -> list[int]:
    n = len(window.position_ids)
    return list(range(width - n)) if window.packed else list(range(n, width))


def block_causal_mask(segments: torch.Tensor, dtype: Any) -> torch.Tensor:
    """[batch, 1, seq, seq]: 0 where query q may see key k (same example, k <= q), the dtype's minimum elsewhere.

    Padding (segment -1) sees only itself: a row with nothing visible would give NaN in softmax.
    """
    import torch

    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]
    real = (segments >= 0)[:, :, None]
    allowed = (same & real & causal) | torch.eye(length, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id (many bases ship no pad token); padding carries no loss either way."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
