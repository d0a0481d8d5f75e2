"""Engines: how a model is wrapped, stepped and checkpointed on one process, DDP, FSDP2 or DeepSpeed.

The loop (``pipeline.train``) is written once against the ``Engine`` protocol; each engine
owns its wrapping, its gradient synchronisation and its checkpoint format. Every method
marked *collective* must be called by every rank, in the same order.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from pipeline.model import LlamaModel


class Engine(Protocol):
    name: str
    # The unwrapped model (HF parameter names); on FSDP/ZeRO-3 its parameters are shards.
    model: LlamaModel
    # What to call for a forward pass (wrapped, maybe compiled). Under FSDP/ZeRO-3 a forward is
    # collective, so evaluation runs it on every rank.
    module: nn.Module
    optimizer: torch.optim.Optimizer

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, accum_steps: int, last: bool) -> torch.Tensor:
        """Forward under the engine's precision, backward of loss / accum_steps; grads are
        synchronised across ranks only when ``last`` (the final micro-batch of a step).
        Returns the detached, unscaled loss of this micro-batch."""
        ...

    def optimizer_step(self, lr: float, grad_clip: float) -> float | torch.Tensor:
        """Set lr, clip the global grad norm at grad_clip (0 = off), step, zero the grads.
        Returns the global grad norm before clipping (the same value on every rank), as a float
        or a 0-d tensor the loop reads only when it logs. Collective."""
        ...

    def save(self, directory: Path) -> list[Path]:
        """Write model + optimizer state into ``directory`` (which exists). Collective; returns
        the files this rank wrote, so rank 0 can report every rank's files."""
        ...

    def load(self, directory: Path) -> None:
        """Restore model + optimizer state saved by ``save`` (maybe by another world size). Collective."""
        ...

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """The full HF-named fp32 weights on CPU on rank 0 (tied lm_head left out), None on
        other ranks. Collective (FSDP/ZeRO-3 gather the shards)."""
        ...


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked (``auto`` = on CUDA only); fp32 otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices only: shrinking RMSNorm gains (1-D) toward zero just fights the normalisation.
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
