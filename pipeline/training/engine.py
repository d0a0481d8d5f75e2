"""Engines: how a model is wrapped, stepped and checkpointed on one process, DDP, FSDP2 or DeepSpeed.

The loop (``pipeline.train``) is written once against the ``Engine`` protocol; each engine
owns its wrapping, its gradient synchronisation and its checkpoint format. Every method
marked *collective* must be called by every rank, in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

# A loss from the module the engine steps: how a caller with its own batch layout (fine-tuning's
# labels and block masks) drives an engine built for pre-training's (x, y) windows.
LossFn = Callable[[nn.Module], torch.Tensor]


class Engine(Protocol):
    name: str
    # The unwrapped model (HF parameter names); on FSDP/ZeRO-3 its parameters are shards. The
    # appliance's LlamaModel for pre-training, a transformers model for full fine-tuning.
    model: nn.Module
    # What to call for a forward pass (wrapped, maybe compiled). Under FSDP/ZeRO-3 a forward is
    # collective, so evaluation runs it on every rank.
    module: nn.Module
    optimizer: torch.optim.Optimizer

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, accum_steps: int, last: bool) -> torch.Tensor:
        """Forward under the engine's precision, backward of loss / accum_steps; grads are
        synchronised across ranks only when ``last`` (the final micro-batch of a step).
        Returns the detached, unscaled loss of this micro-batch."""
        ...

    def backward_on(self, loss_fn: LossFn, *, last: bool) -> torch.Tensor:
        """As ``forward_backward`` for any batch: ``loss_fn(module)`` under the engine's precision,
        then backward of that loss as given (the caller scales it); grads sync only when ``last``.
        Returns the detached loss."""
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


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the output head shares the input embedding's weight (ours: cfg; transformers: config)."""
    ours = getattr(getattr(model, "cfg", None), "tie_embeddings", None)
    if ours is not None:
        return bool(ours)
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP shards one by one: ``model.model.layers`` in our LlamaModel and
    in transformers' Llama, Qwen2 and Mistral; else the first ModuleList named ``layers``."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "layers" and isinstance(module, nn.ModuleList):
            return list(module)
    raise ValueError(f"{type(model).__name__} has no ModuleList named 'layers' to shard")


def hidden_size(model: nn.Module) -> int:
    """The model's width (ours: cfg.dim; transformers: config.hidden_size): DeepSpeed sizes buckets by it."""
    ours = getattr(getattr(model, "cfg", None), "dim", None)
    if ours:
        return int(ours)
    config: Any = getattr(model, "config", None)
    return int(getattr(config, "hidden_size"))
