"""What the fine-tuning loop steps: the trainable weights, their optimizer, and how both are saved.

``train.train_adapter`` is one loop over a ``TrainState``; the two kinds differ in what they
own, not in the loop:

* ``AdapterState`` (LoRA, QLoRA): the spec's adapters and a torch AdamW over them, on one
  process. A checkpoint holds only the adapters (``trainable.safetensors``), never the frozen
  base, and ``state/optimizer.pt``.
* ``EngineState`` (full fine-tuning): the whole model inside a pre-training engine (one
  process, DDP, FSDP2 or DeepSpeed ZeRO, ``pipeline.training.loop.build_engine``). The engine
  owns gradient sync and its checkpoint format (``state/`` as the engine writes it: DCP shards
  or DeepSpeed's), and gathers the full weights for the export.

Both write one RNG file per rank (``rng/rank_N.pt``), so dropout resumes exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.errors import ConfigError, TrainingError
from pipeline.finetune.spec import ModelSpec, require_one_process
from pipeline.training import checkpoint as ckpt
from pipeline.training.config import DistConfig, TrainConfig
from pipeline.training.dist import DistContext
from pipeline.training.engine import LossFn
from pipeline.training.loop import rng_state, set_rng_state, write_atomically

__all__ = ["TrainState", "AdapterState", "EngineState", "build_state", "TRAINABLE", "OPTIMIZER"]

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"


class TrainState(Protocol):
    name: str
    n_trainable: int
    # The dtype a float attention mask must have to meet the activations.
    compute_dtype: torch.dtype

    def micro(self, loss_fn: LossFn, *, last: bool) -> torch.Tensor:
        """Forward ``loss_fn`` and backward it; grads sync across ranks when ``last``. Returns the detached loss."""
        ...

    def check_grads(self) -> None:
        """After the first backward: refuse a run in which some trainable weight got no gradient."""
        ...

    def step(self, lr: float, grad_clip: float) -> float:
        """Set lr, clip (0 = off), step, zero the grads; the global grad norm before clipping. Collective."""
        ...

    def rank_files(self, tmp: Path) -> list[Path]:
        """This rank's part of a checkpoint in ``tmp``. Collective."""
        ...

    def main_files(self, tmp: Path) -> list[Path]:
        """Rank 0's extra part of a checkpoint."""
        ...

    def load(self, path: Path) -> None:
        """Restore weights, optimizer and this rank's RNG from checkpoint ``path``. Collective."""
        ...

    def export(self, final: Path) -> None:
        """Write the trained result to ``final`` (rank 0, atomically). Collective."""
        ...


def check_grads(named: list[tuple[str, torch.nn.Parameter]]) -> None:
    """Every trainable parameter must have a gradient after the first backward.

    A parameter outside the autograd graph (the bitsandbytes no_grad trap of LIBRARY-NOTES, a
    reentrant checkpoint over frozen inputs) would otherwise just never change, silently.
    """
    dead = [n for n, p in named if p.grad is None]
    if dead:
        raise TrainingError(
            f"{len(dead)} of {len(named)} trainable parameters got no gradient (first: {dead[0]}): they would never train",
            "report this with the base model and finetune settings; turning finetune.gradient_checkpointing off may avoid it",
        )


def _rng_file(tmp: Path, rank: int) -> Path:
    return tmp / ckpt.RNG_DIR / f"rank_{rank:05d}.pt"


def _save_rng(tmp: Path, rank: int) -> Path:
    (tmp / ckpt.RNG_DIR).mkdir(exist_ok=True)
    path = _rng_file(tmp, rank)
    torch.save(rng_state(), path)
    return path


class AdapterState:
    """LoRA / QLoRA adapters and their AdamW, on one process."""

    name = "adapter"

    def __init__(self, spec: ModelSpec, cfg: TrainConfig, device: torch.device) -> None:
        self.spec = spec
        self.model = spec.build(device)
        self.named = spec.trainable_parameters()
        if not self.named:
            raise ConfigError("the model has no trainable parameters", "check finetune.target_modules names modules of the base")
        self.params = [p for _, p in self.named]
        self.n_trainable = sum(p.numel() for p in self.params)
        self.compute_dtype = self.model.get_input_embeddings().weight.dtype  # type: ignore[operator, union-attr]
        # Decay matrices only (as engine.param_groups does); LoRA's A and B are all matrices.
        groups = [
            {"params": [p for p in self.params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    def micro(self, loss_fn: LossFn, *, last: bool) -> torch.Tensor:
        loss = loss_fn(self.model)
        loss.backward()
        return loss.detach()

    def check_grads(self) -> None:
        check_grads(self.named)

    def step(self, lr: float, grad_clip: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, grad_clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params if p.grad is not None])))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def rank_files(self, tmp: Path) -> list[Path]:
        return [_save_rng(tmp, 0)]

    def main_files(self, tmp: Path) -> list[Path]:
        from safetensors.torch import save_file

        (tmp / ckpt.STATE_DIR).mkdir(exist_ok=True)
        save_file(self.spec.state_dict_trainable(), str(tmp / TRAINABLE), metadata={"format": "pt"})
        torch.save(self.optimizer.state_dict(), tmp / ckpt.STATE_DIR / OPTIMIZER)
        return [tmp / TRAINABLE, tmp / ckpt.STATE_DIR / OPTIMIZER]

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.spec.load_trainable(load_file(str(path / TRAINABLE)))
        self.optimizer.load_state_dict(torch.load(path / ckpt.STATE_DIR / OPTIMIZER, map_location="cpu", weights_only=True))
        set_rng_state(torch.load(_rng_file(path, 0), map_location="cpu", weights_only=True))

    def export(self, final: Path) -> None:
        write_atomically(final, self.spec.export)


class EngineState:
    """The whole model in a pre-training engine: full fine-tuning on one process, DDP, FSDP2 or DeepSpeed."""

    def __init__(
        self,
        spec: ModelSpec,
        engine_name: str,
        cfg: TrainConfig,
        deepspeed_config: dict[str, Any] | None,
        device: torch.device,
        ctx: DistContext,
    ) -> None:
        from pipeline.training.loop import build_engine, precision_for

        self.spec, self.ctx, self.cfg = spec, ctx, cfg
        model = spec.build(device)
        self.model = model
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before sharding
        self.engine = build_engine(engine_name, model, cfg, deepspeed_config, device, ctx)
        self.name = self.engine.name
        if precision_for(cfg, device) == "bf16":
            self.compute_dtype = torch.bfloat16
        else:
            self.compute_dtype = next(self.engine.module.parameters()).dtype

    def micro(self, loss_fn: LossFn, *, last: bool) -> torch.Tensor:
        return self.engine.backward_on(loss_fn, last=last)

    def check_grads(self) -> None:
        # Every weight is in the graph of a full fine-tune (no frozen inputs); under FSDP and ZeRO
        # a rank holds only shards of the gradients, so there is nothing local to check.
        return None

    def step(self, lr: float, grad_clip: float) -> float:
        norm = float(self.engine.optimizer_step(lr, grad_clip))
        if not math.isfinite(norm):
            raise TrainingError(f"the gradient norm is {norm}", f"lower train.lr (now {self.cfg.lr:g}) and start a new run")
        return norm

    def rank_files(self, tmp: Path) -> list[Path]:
        (tmp / ckpt.STATE_DIR).mkdir(exist_ok=True)
        return [*self.engine.save(tmp / ckpt.STATE_DIR), _save_rng(tmp, self.ctx.rank)]

    def main_files(self, tmp: Path) -> list[Path]:
        return []

    def load(self, path: Path) -> None:
        self.engine.load(path / ckpt.STATE_DIR)
        rng = _rng_file(path, self.ctx.rank)
        if rng.is_file():
            set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
        else:
            # Resumed on more ranks than saved: a new rank's generators start from (seed, rank).
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.ctx.rank * 7919)

    def export(self, final: Path) -> None:
        from pipeline.finetune.full import write_model_dir

        weights = self.engine.full_weights()  # collective: FSDP / ZeRO-3 gather on rank 0
        if self.ctx.is_main:
            base_dir = getattr(self.spec, "base_dir")
            write_atomically(final, lambda d: write_model_dir(d, weights, self.model, base_dir))


def engine_for(method: str, dist_cfg: DistConfig, ctx: DistContext) -> str:
    """The engine a fine-tuning method runs on: adapters on one process; full on any engine."""
    from pipeline.training.loop import engine_name

    require_one_process(method, dist_cfg, ctx.world)
    return engine_name(dist_cfg, ctx) if method == "full" else "adapter"


def build_state(
    spec: ModelSpec,
    method: str,
    cfg: TrainConfig,
    device: torch.device,
    *,
    dist_cfg: DistConfig | None = None,
    ctx: DistContext | None = None,
    deepspeed_config: dict[str, Any] | None = None,
) -> TrainState:
    """The train state for ``method`` ("lora", "qlora" or "full") on this process."""
    ctx = ctx or DistContext()
    engine = engine_for(method, dist_cfg or DistConfig(), ctx)
    if engine == "adapter":
        return AdapterState(spec, cfg, device)
    return EngineState(spec, engine, cfg, deepspeed_config, device, ctx)
