"""PyTorch-native engines: one process, DDP, and FSDP2 (``fully_shard``).

All three checkpoint through ``torch.distributed.checkpoint`` with the
``get_state_dict``/``set_state_dict`` helpers, whose keys are the unwrapped model's HF names.
So a checkpoint written by 2 FSDP ranks loads into 1 process (or 4 DDP ranks) unchanged:
DCP re-shards on load.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict

from pipeline.errors import TrainingError
from pipeline.training.config import TrainConfig
from pipeline.training.dist import DistContext
from pipeline.training.engine import LossFn, autocast, decoder_layers, param_groups, tied_embeddings


class NativeEngine:
    """One process; the base of DDP and FSDP, which change wrapping and gradient sync only."""

    name = "single"

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, ctx: DistContext) -> None:
        self.model, self.cfg, self.device, self.ctx = model, cfg, device, ctx
        if hasattr(model, "activation_checkpointing"):  # ours; a transformers model sets its own up
            model.activation_checkpointing = cfg.activation_checkpointing
        self.wrapped = self._wrap(model)
        # fused AdamW is one kernel on CUDA. On CPU it would save ~7 ms of a ~720 ms step (1 %),
        # not worth an optimizer path the CPU tests have not covered under FSDP's DTensors.
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
        self.module: nn.Module = torch.compile(self.wrapped) if cfg.compile else self.wrapped

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, accum_steps: int, last: bool) -> torch.Tensor:
        with self._sync(last):
            with autocast(self.device, self.cfg.precision):
                _, loss = self.module(x, y)
            (loss / accum_steps).backward()
        return loss.detach()

    def backward_on(self, loss_fn: LossFn, *, last: bool) -> torch.Tensor:
        with self._sync(last):
            with autocast(self.device, self.cfg.precision):
                loss = loss_fn(self.module)
            loss.backward()
        return loss.detach()

    def optimizer_step(self, lr: float, grad_clip: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # max_norm=inf measures the norm without changing the gradients (the scale factor is 1).
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor whose local part is this rank's share
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # A tensor, read only when logged: float() here would stall a GPU once more per step.
        return norm.detach()

    def save(self, directory: Path) -> list[Path]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        target = Path(directory)
        with _quiet_single_process():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=target)
        # Every rank reports what it wrote; rank 0 also owns .metadata.
        return sorted(p for p in target.iterdir() if p.is_file() and (p.name.startswith(f"__{self.ctx.rank}_") or (self.ctx.is_main and p.name == ".metadata")))

    def load(self, directory: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            with _quiet_single_process():
                dcp.load(state, checkpoint_id=Path(directory))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TrainingError(
                f"cannot load the training state in {directory}: {exc}",
                "resume with the model and optimizer settings that wrote it, or start in a fresh output directory",
            ) from None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ctx.is_main:
            return None
        if tied_embeddings(self.model):
            sd.pop("lm_head.weight", None)
        return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


class DDPEngine(NativeEngine):
    name = "ddp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        # Accumulating micro-batches skip DDP's all-reduce; the last one syncs the sum.
        return contextlib.nullcontext() if last else self.wrapped.no_sync()  # type: ignore[operator]


class FSDPEngine(NativeEngine):
    """FSDP2: each decoder layer is one shard group, the embeddings/norm/lm_head the root group
    (so tied embeddings stay one parameter)."""

    name = "fsdp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy()
        if self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and self.device.type == "cuda"):
            # Compute in bf16, reduce gradients in fp32: the usual FSDP2 recipe (torchtitan).
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(last)  # type: ignore[attr-defined]
        return contextlib.nullcontext()


def build_native_engine(name: str, model: nn.Module, cfg: TrainConfig, device: torch.device, ctx: DistContext) -> NativeEngine:
    engines = {"single": NativeEngine, "ddp": DDPEngine, "fsdp": FSDPEngine}
    return engines[name](model, cfg, device, ctx)


@contextlib.contextmanager
def _quiet_single_process():  # type: ignore[no-untyped-def]
    # DCP warns that it "assumes the intent is to load in a single process" whenever no process
    # group exists: that is exactly the one-process engine's case, not a problem to report.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
