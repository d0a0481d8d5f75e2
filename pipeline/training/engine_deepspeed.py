"""The DeepSpeed ZeRO engine (stages 1, 2 and 3) behind the ``Engine`` protocol.

DeepSpeed is imported only inside ``build_deepspeed_engine``: it takes seconds to import, picks
its accelerator once per process from ``DS_ACCELERATOR``, and most runs never need it.

Two choices keep it quick and steady on a CPU:

* the optimizer is a torch AdamW passed in, never a JSON ``optimizer`` section, which would
  JIT-compile DeepSpeed's fused Adam (~150 s);
* DeepSpeed's shared-memory collectives (the ``deepspeed_shm_comm`` op) are switched off, so
  every collective goes through the gloo process group ``pipeline.training.dist.init`` made (with
  its timeout). That op costs a ~115 s compile on first use and made runs abort at exit.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import ConfigError, TrainingError
from pipeline.training.config import TrainConfig
from pipeline.training.ds_config import resolve_model_autos
from pipeline.training.engine import LossFn, hidden_size, param_groups

# DeepSpeed writes its files under <checkpoint dir>/<tag>/.
TAG = "deepspeed"
# What the checkpoint was saved with, so a resume at another world size fails with a clear message.
META = "deepspeed_engine.json"
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


class DeepSpeedEngine:
    """ZeRO data parallelism: optimizer state (stage 1), gradients (2) and parameters (3) sharded.

    Precision is DeepSpeed's (the resolved JSON's fp16/bf16 sections), so no autocast is added.
    Stages 2 and 3 reduce-scatter gradients after every micro-batch, boundary or not: that is how
    they keep only a shard of the gradient; the update still happens once, after ``last``.
    """

    name = "deepspeed"

    def __init__(self, ds_engine: Any, model: nn.Module, optimizer: torch.optim.Optimizer, *, stage: int, grad_clip: float) -> None:
        self._ds = ds_engine
        self.model = model
        self.module = ds_engine
        # The torch AdamW itself: ZeRO steps it on flat fp32 shards but keeps its param groups,
        # so this is where the lr goes.
        self.optimizer = optimizer
        self.stage = stage
        self._grad_clip = grad_clip
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, accum_steps: int, last: bool) -> torch.Tensor:
        # DeepSpeed's documented manual-boundary mode: reduce and step only after the micro-batch
        # marked as the boundary, with a single engine.step() per optimizer update.
        self._ds.set_gradient_accumulation_boundary(last)
        _, loss = self._ds(x, y)
        # Scale by the caller's accum_steps (not the JSON's) so the gradient is the mean over the
        # step's micro-batches whatever the JSON says; DeepSpeed still applies its fp16 loss scale.
        self._ds.backward(loss / accum_steps, scale_wrt_gas=False)
        return loss.detach()

    def backward_on(self, loss_fn: LossFn, *, last: bool) -> torch.Tensor:
        self._ds.set_gradient_accumulation_boundary(last)
        loss = loss_fn(self._ds)
        self._ds.backward(loss, scale_wrt_gas=False)
        return loss.detach()

    def optimizer_step(self, lr: float, grad_clip: float) -> float:
        if abs(grad_clip - self._grad_clip) > 1e-12:
            raise TrainingError(
                f"grad_clip {grad_clip} differs from the DeepSpeed config's gradient_clipping {self._grad_clip}",
                "DeepSpeed clips inside its step; build the engine from a config resolved against this recipe",
            )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._ds.step()
        norm = self._ds.get_global_grad_norm()
        if norm is None:
            raise TrainingError("DeepSpeed reported no gradient norm after the step", "check zero_optimization (compute_grad_norm must stay on)")
        return float(norm)

    def save(self, directory: Path) -> list[Path]:
        """DeepSpeed's own sharded checkpoint under ``directory/deepspeed/`` plus ``deepspeed_engine.json``.

        A DeepSpeed checkpoint resumes at the same world size and ZeRO stage only: ``load`` in a
        job of another size raises a TrainingError naming both sizes. The weights alone move
        freely: ``full_weights`` (what ``final/`` holds) is independent of the world size.
        """
        directory = Path(directory)
        before = set(directory.iterdir())
        dist.barrier()  # nobody writes before every rank has looked
        self._ds.save_checkpoint(str(directory), tag=TAG, save_latest=False)
        if self.rank == 0:
            meta = {"engine": self.name, "world": self.world, "stage": self.stage, "tag": TAG}
            (directory / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        dist.barrier()
        # DeepSpeed's shards go under TAG; beside them it drops its recovery scripts (zero_to_fp32.py).
        written = [p for p in (directory / TAG).rglob("*") if p.is_file()]
        written += [p for p in directory.iterdir() if p.is_file() and p not in before]
        # Every rank writes into the same folder; a file names its writer's rank (zero_pp_rank_R),
        # and rank 0 writes the ones that name none (model states, scripts, META).
        mine: list[Path] = []
        for path in sorted(written):
            m = _RANK_FILE.search(path.name)
            if (int(m.group(1)) if m else 0) == self.rank:
                mine.append(path)
        return mine

    def load(self, directory: Path) -> None:
        """Restore weights, optimizer state and DeepSpeed's step counters saved by ``save``.

        Only at the world size and stage the checkpoint was written with (see ``save``)."""
        directory = Path(directory)
        meta_path = directory / META
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TrainingError(
                f"{directory} holds no DeepSpeed checkpoint ({META} is missing)",
                "resume from a checkpoint written by the deepspeed engine, or switch engines to match the one that wrote it",
            ) from None
        except (OSError, ValueError) as exc:
            raise TrainingError(f"{meta_path} cannot be read ({exc})", "the checkpoint is damaged: resume from an earlier one") from None
        if meta.get("world") != self.world:
            raise TrainingError(
                f"{directory} was saved by {meta.get('world')} DeepSpeed ranks but this job has {self.world}",
                f"resume with {meta.get('world')} processes (nproc_per_node × nnodes), or start a new run from this checkpoint's weights",
            )
        if meta.get("stage") != self.stage:
            raise TrainingError(
                f"{directory} was saved with ZeRO stage {meta.get('stage')} but this job runs stage {self.stage}",
                f"resume with zero_optimization.stage = {meta.get('stage')}",
            )
        path, _ = self._ds.load_checkpoint(str(directory), tag=meta.get("tag", TAG), load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise TrainingError(f"DeepSpeed found no checkpoint under {directory / TAG}", "the checkpoint is incomplete: resume from an earlier one")

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """The fp32 master weights (not the bf16/fp16 module copy), gathered one parameter at a time."""
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        # named_parameters yields a tied lm_head.weight once, as model.embed_tokens.weight, which
        # is exactly what weights_state_dict keeps. Every rank walks the same order: each gather
        # is a collective.
        for name, param in self.model.named_parameters():
            full = safe_get_full_fp32_param(param)
            if full is None:
                raise TrainingError(f"DeepSpeed holds no fp32 copy of {name}", "the deepspeed engine needs a ZeRO stage of 1, 2 or 3")
            if self.rank == 0:
                shape = getattr(param, "ds_shape", param.shape)
                out[name] = full.detach().float().cpu().reshape(shape).clone()
        return out if self.rank == 0 else None

    def weights_digest(self) -> str:
        """sha256 of this rank's view of the full module weights (gathered under ZeRO-3). Collective.

        Ranks that agree on every parameter agree on the digest, which is how the tests check that
        the replicas stayed identical."""
        import deepspeed

        h = hashlib.sha256()
        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for p in params:
                h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def build_deepspeed_engine(model: nn.Module, train: TrainConfig, ds_config: dict[str, Any], device: torch.device) -> DeepSpeedEngine:
    """Wrap ``model`` with ``deepspeed.initialize`` on the process group already set up.

    ``ds_config`` comes from ``ds_config.load_deepspeed_config``; model-sized ``"auto"`` keys are
    resolved here. Without torchrun a one-process group is made, as DeepSpeed needs one.
    """
    deepspeed = _import_deepspeed(device)
    if not dist.is_initialized():
        _init_single_process_group()
    # A torch process group already exists, so DeepSpeed wraps it instead of creating its own.
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    config = resolve_model_autos(ds_config, hidden_size(model))
    zero = config.get("zero_optimization", {})
    model.to(device)
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    optimizer = torch.optim.AdamW(
        param_groups(model, train.weight_decay),
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        # The fused kernel needs the shards on the GPU; offloaded ones live on the CPU.
        fused=device.type == "cuda" and not offloaded,
    )
    try:
        ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    except ValueError as exc:  # DeepSpeed's config models are pydantic: ValidationError is a ValueError
        raise ConfigError(f"DeepSpeed refused the configuration: {exc}", "fix the key it names in the deepspeed_config JSON") from None
    return DeepSpeedEngine(ds_engine, model, optimizer, stage=int(zero.get("stage", 0)), grad_clip=float(config.get("gradient_clipping", 0.0)))


def _import_deepspeed(device: torch.device) -> Any:
    if device.type == "cpu":
        # DeepSpeed picks its accelerator once, when first imported; without this it would
        # choose CUDA on a GPU machine even for a CPU run.
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        import deepspeed
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
    except ImportError as exc:
        raise TrainingError(
            f'engine = "deepspeed" needs the deepspeed package ({exc})', 'install deepspeed into the appliance\'s environment, or choose engine = "fsdp"'
        ) from None
    accelerator = get_accelerator().device_name()
    if accelerator != device.type:
        raise TrainingError(
            f"DeepSpeed was already set up for {accelerator} in this process, but training runs on {device.type}",
            "run the DeepSpeed job in its own process (appliance train launches one)",
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Whether an op is usable is read from this cached dict (edits persist, by design) when the
    # communication backend is created: marking shm incompatible makes it use torch.distributed.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _init_single_process_group() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainingError("the deepspeed engine was built before the process group", "call pipeline.training.dist.init before build_deepspeed_engine")
    # DeepSpeed insists on LOCAL_RANK, which only launchers set.
    os.environ.setdefault("LOCAL_RANK", "0")
    # An in-memory store: one process has no peer to rendezvous with, so no port is opened.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
