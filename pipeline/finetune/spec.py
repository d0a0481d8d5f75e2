"""The model seam of fine-tuning: what the adapter trainer needs from a model, and which model a recipe asks for.

``train.train_adapter`` is written once against ``ModelSpec``: build the module on a device,
name its trainable parameters, save and load just those (a checkpoint of a LoRA run holds the
adapters, not the frozen base), and export the result. ``lora.LoraSpec`` implements it for
``method = "lora"`` and ``"qlora"``, ``full.FullSpec`` for ``"full"`` (every weight, stepped
by a pre-training engine). This module imports neither torch nor peft, so a recipe
can be checked (``build_spec``, ``qlora_available``) before anything heavy is loaded.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError
from pipeline.settings.finetune import FinetuneConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["ModelSpec", "build_spec", "qlora_available", "require_one_process"]

_INSTALL_HINT = 'install the fine-tuning extra (pip install -e ".[finetune]"), or set finetune.method = "lora" to adapt an unquantised base'


class ModelSpec(ABC):
    """A model to fine-tune: built once per run, then stepped by ``train_adapter``."""

    @abstractmethod
    def build(self, device: torch.device) -> nn.Module:
        """Load the model onto ``device``, ready to train (``module(input_ids=..., ...).logits``)."""

    @abstractmethod
    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of every parameter the optimizer updates, in a fixed order."""

    @abstractmethod
    def state_dict_trainable(self) -> dict[str, torch.Tensor]:
        """The trainable parameters, by the names of ``trainable_parameters``, as CPU copies."""

    @abstractmethod
    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (from ``state_dict_trainable``) into the built model; every name must match."""

    @abstractmethod
    def export(self, out_dir: Path) -> list[Path]:
        """Write the trained result to ``out_dir`` (created); returns the files written."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able settings that fix the trainable tensors' shapes and meaning: a checkpoint
        is resumed only into a spec that describes itself the same way."""


def build_spec(fcfg: FinetuneConfig, base_dir: Path, *, dtype: str = "float32") -> ModelSpec:
    """The spec for ``fcfg.method`` over the verified local base at ``base_dir``.

    ``dtype``: the dtype the frozen base's unquantised weights are held in; adapters are
    always float32. QLoRA is probed (``qlora_available``) on the run's device by ``build``.
    """
    if fcfg.method == "full":
        # Every weight trains, in float32 master weights, inside a pre-training engine (train_state).
        from pipeline.finetune.full import FullSpec

        return FullSpec(base_dir, fcfg)
    from pipeline.finetune.lora import LoraSpec  # torch, transformers and peft load only here

    return LoraSpec(base_dir, fcfg, dtype=dtype)


def require_one_process(method: str, dist_cfg: Any, world: int) -> None:
    """Refuse an adapter run (LoRA, QLoRA) on several processes or a sharding engine: adapters
    train on one process; only ``method = "full"`` goes through DDP, FSDP or DeepSpeed."""
    if method == "full":
        return
    if world > 1 or dist_cfg.engine not in ("auto", "single", "ddp"):
        raise ConfigError(
            f'finetune.method = "{method}" trains on one process, but the recipe asks for {world} processes / engine "{dist_cfg.engine}"',
            'set [distributed] nproc_per_node = 1 and nnodes = 1 (adapters are small), or finetune.method = "full" to train every weight on DDP, FSDP or DeepSpeed',
        )


# -- can QLoRA run here? ---------------------------------------------------------------------


def _import_bitsandbytes() -> ModuleType:
    """Import bitsandbytes (its own function, so a test can make it "missing")."""
    return importlib.import_module("bitsandbytes")


def qlora_available(device: str = "cpu") -> None:
    """Raise ConfigError, before any model is loaded, unless bitsandbytes can quantise to 4 bits on ``device``.

    Probes what QLoRA needs: the import, and a tiny NF4 ``Linear4bit`` quantised on the device
    and run forward and backward. A failure names the cause and the fix.
    """
    try:
        bnb = _import_bitsandbytes()
    except ImportError as exc:
        raise ConfigError(f'finetune.method = "qlora" needs bitsandbytes, which cannot be imported here ({exc})', _INSTALL_HINT) from None
    try:
        import torch

        layer = bnb.nn.Linear4bit(16, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        weight = torch.linspace(-1.0, 1.0, 256).reshape(16, 16)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        layer = layer.to(device)  # quantises on the way to the device
        x = torch.ones(2, 16, device=device, requires_grad=True)
        # With grad enabled: an inference-only forward through bitsandbytes is what leaves
        # adapter grads None (LIBRARY-NOTES), and this probe must not resemble it.
        layer(x).sum().backward()
        ok = x.grad is not None and bool(torch.isfinite(x.grad).all())
    except (ImportError, OSError, RuntimeError, NotImplementedError, AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} is installed but cannot run 4-bit layers on {device}: {type(exc).__name__}: {exc}",
            f"{_INSTALL_HINT}; on a GPU, check that bitsandbytes was built for this CUDA version",
        ) from None
    if not ok:
        raise ConfigError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} ran a 4-bit layer on {device} but gave no finite gradient",
            _INSTALL_HINT,
        )
