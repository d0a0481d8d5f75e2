"""The fine-tuning trainer: LoRA / QLoRA / full steps over a ``ModelSpec``, with the pre-training loop's checkpoints.

One loop over a ``train_state.TrainState``: adapters and their AdamW on one process (LoRA,
QLoRA), or the whole model inside a pre-training engine (full: one process, DDP, FSDP2 or
DeepSpeed ZeRO under torchrun, rank ``r`` of ``world`` taking its own micro-batches).

Determinism is by construction, as in ``pipeline.training.loop``: the adapters are
initialised from ``seed``, each step's batches are a function of the step (``batches(step,
micro)``), the learning rate a function of the step (``schedule.lr_at``), and a checkpoint
holds the trainable weights, the optimizer state and the RNG states (LoRA dropout draws from
torch's generator). So a CPU run stopped at any step and resumed ends with the same bits as
one never stopped (same thread count).

Loss weighting: each optimizer step minimises the *mean over label tokens* of all its
micro-batches together: sum of token cross-entropies / number of labels != -100 across the
``grad_accum`` micro-batches. Every trained token weighs the same, however the examples were
packed into rows or split into micro-batches (a mean of per-micro-batch means would weigh a
token of a short micro-batch more). Labels are aligned with ``input_ids`` (Hugging Face's
convention): position t's logits predict ``labels[t + 1]``. A packer must put -100 on the
first token of each packed example, so no example is trained to follow its neighbour.

Layout of ``out_dir``::

    checkpoints/step_000200/
        trainable.safetensors    adapters: the trainable parameters, by module name
        state/optimizer.pt       adapters: AdamW state (torch.load(weights_only=True))
        state/…                  full: the engine's own files (DCP shards, or DeepSpeed's)
        rng/rank_NNNNN.pt        each rank's torch / numpy / python RNG states
        trainer.json             step, spec description, train settings that resume must match, recent losses
        COMPLETE                 sha256sum-format manifest of the files above, written last (ckpt_files)
    final/                       the exported adapter (``spec.export``), or the full model, of a completed run

Checkpoint naming, the COMPLETE manifest, atomic publication, verification with fallback
and retention (``keep_last`` / ``keep_every``, the service's record markers) are the
pre-training loop's own (``pipeline.training.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError, TrainingError
from pipeline.finetune.spec import ModelSpec
from pipeline.finetune.train_state import OPTIMIZER, TRAINABLE, TrainState, build_state, check_grads
from pipeline.result import write_json
from pipeline.training import checkpoint as ckpt
from pipeline.training.config import DistConfig, TrainConfig
from pipeline.training.dist import DistContext, broadcast_object
from pipeline.training.schedule import lr_at

__all__ = ["FINAL", "TRAINABLE", "OPTIMIZER", "BatchFn", "train_adapter", "resolve_device", "base_dtype"]

FINAL = "final"
# final_loss is the mean of this many last step losses, as in the pre-training loop.
FINAL_LOSS_WINDOW = 10
# Changing these mid-run changes the adapters' initialisation, the data or the optimizer's meaning.
RESUME_LOCKED = ("seed", "seq_len", "batch_size", "grad_accum")
IGNORE = -100

BatchFn = Callable[[int, int], dict[str, torch.Tensor]]
EventFn = Callable[[dict[str, Any]], None]


def resolve_device(cfg: TrainConfig, local_rank: int | None = None) -> torch.device:
    """``train.device``: "auto" is CUDA when present, else CPU; under torchrun, this rank's GPU."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available", 'set train.device = "auto" or "cpu"')
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank is not None:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cuda", torch.cuda.current_device())


def base_dtype(cfg: TrainConfig, device: torch.device) -> str:
    """The frozen base's dtype: bf16 where ``train.precision`` resolves to bf16 (auto on CUDA), else fp32."""
    return "bfloat16" if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda") else "float32"


def train_adapter(
    spec: ModelSpec,
    batches: BatchFn,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    resume_from: Path | None = None,
    on_event: EventFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    records_dir: Path | None = None,
    device: torch.device | None = None,
    method: str | None = None,
    dist_cfg: DistConfig | None = None,
    ctx: DistContext | None = None,
    deepspeed_config: dict[str, Any] | None = None,
    extra_stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``spec``'s trainable parameters for ``cfg.steps`` optimizer steps; returns the run's stats.

    ``batches(step, micro)`` gives micro-batch ``micro`` (0 … grad_accum-1) of optimizer step
    ``step`` (0-based) for this rank: ``input_ids`` and ``labels`` (B, T) with -100 where no loss
    is taken, ``attention_mask`` (B, T) of 0/1 or an additive float (B, 1, T, T) mask, and
    optionally ``position_ids`` (B, T). It must be a pure function of its arguments, or resume
    is not exact.

    ``method``: "lora" / "qlora" train the spec's adapters on one process; "full" trains every
    weight inside a pre-training engine picked by ``dist_cfg`` on the process group ``ctx``
    (DDP, FSDP2 or DeepSpeed under torchrun; see ``train_state``). Default: the spec's own.

    Resumes from ``resume_from`` if given, else from the newest checkpoint under ``out_dir``
    that verifies (newer broken ones are set aside as ``rejected-…``). ``should_stop()`` is
    asked after every step (any rank asking stops all); then a checkpoint is saved and the run
    returns with ``completed`` False. ``on_event`` (rank 0 only) receives ``started``,
    ``resumed``, ``log`` and ``metrics`` (every ``log_every`` steps: step, loss, lr, grad_norm,
    tokens_per_s), ``checkpoint``, ``checkpoint_pruned``, ``checkpoint_rejected`` and
    ``finished`` events. ``records_dir``: as in ``run_train``, retention then deletes only
    checkpoints the service has recorded. ``extra_stats`` join the returned (and reported) stats.
    """
    t0 = time.perf_counter()
    ctx = ctx or DistContext()
    emit = (on_event or (lambda event: None)) if ctx.is_main else (lambda event: None)
    stop_requested = should_stop or (lambda: False)
    out_dir = Path(out_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clear_stale(out_dir)
    device = device if device is not None else resolve_device(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)  # process-wide: a training job owns its process
    torch.manual_seed(cfg.seed)  # the adapters' initialisation (the same on every rank)
    method = method or str(spec.describe().get("method", "lora"))
    state = build_state(spec, method, cfg, device, dist_cfg=dist_cfg, ctx=ctx, deepspeed_config=deepspeed_config)
    if ctx.world > 1:
        # Each rank its own dropout stream; rank 0's is the single-process one.
        torch.manual_seed(cfg.seed * 1_000_003 + ctx.rank * 7919)
    described = {"spec": spec.describe(), **{k: getattr(cfg, k) for k in RESUME_LOCKED}}

    start, resumed = _resume(out_dir, state, described, resume_from, emit, ctx)
    recent: list[float] = list(resumed.get("recent_losses", []))
    tokens_seen = int(resumed.get("tokens_seen", 0))
    emit(
        {
            "event": "started",
            "step": start,
            "steps": cfg.steps,
            "device": str(device),
            "trainable_parameters": state.n_trainable,
            "engine": state.name,
            "world": ctx.world,
        }
    )

    def save(step: int) -> Path | None:
        if ctx.is_main and records_dir is not None:
            ckpt.forget_record(records_dir, step)  # a marker for this step describes the checkpoint this save replaces

        def main_files(tmp: Path) -> list[Path]:
            trainer = {
                "step": step,
                "tokens_seen": tokens_seen,
                "recent_losses": recent,
                "engine": state.name,
                "world": ctx.world,
                **described,
                "train": dataclasses.asdict(cfg),
            }
            return [*state.main_files(tmp), write_json(tmp / ckpt.TRAINER_JSON, trainer)]

        return ckpt.save_and_prune(
            ctx,
            out_dir,
            step,
            write_rank_files=state.rank_files,
            write_main_files=main_files,
            keep_last=cfg.keep_last,
            keep_every=cfg.keep_every,
            records_dir=records_dir,
            emit=emit,
        )

    done, last_ckpt, stopped_by = start, None, None
    train_s, window_s, window_tokens = 0.0, 0.0, 0
    for step in range(start, cfg.steps):
        step_t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        micro_batches = [_to_device(batches(step, micro), device, step, micro) for micro in range(cfg.grad_accum)]
        n_labels = _sum_ranks(ctx, sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches))
        if n_labels == 0:
            raise TrainingError(
                f"step {step}: no token of its {cfg.grad_accum} micro-batch(es) carries a label", "check the data: every example needs a response to learn"
            )
        # Sum of token losses / the step's label count (all ranks): backward of each micro-batch
        # adds its exact share of the step's token mean (see the module docstring). × world,
        # because DDP, FSDP and ZeRO average the ranks' gradients.
        scale = ctx.world / n_labels
        loss_sum = torch.zeros((), dtype=torch.float64)
        step_tokens = 0
        for i, mb in enumerate(micro_batches):
            part = state.micro(lambda m, mb=mb: _token_loss_sum(m, mb, state.compute_dtype) * scale, last=i == len(micro_batches) - 1)
            loss_sum += part.double().cpu()
            step_tokens += mb["input_ids"].numel()
        loss_value, bad, stop = _agree(ctx, loss_sum, stop_requested())
        step_tokens = _sum_ranks(ctx, step_tokens)
        if step == start:
            state.check_grads()
        if bad:
            raise TrainingError(
                f"training diverged: loss is {loss_value} at step {step + 1}",
                f"lower train.lr (now {cfg.lr:g}, try {cfg.lr / 3:g}) or raise train.warmup_steps (now {cfg.warmup_steps}) and start a new run",
            )
        grad_norm = state.step(lr, cfg.grad_clip)
        done = step + 1
        elapsed = time.perf_counter() - step_t0
        train_s += elapsed
        window_s += elapsed
        window_tokens += step_tokens
        tokens_seen += step_tokens
        recent = (recent + [loss_value])[-FINAL_LOSS_WINDOW:]
        if done % cfg.log_every == 0 or done == cfg.steps:
            rate = window_tokens / window_s if window_s > 0 else 0.0
            emit({"event": "log", "step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": rate, "label_tokens": n_labels})
            values = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": rate}
            emit({"event": "metrics", "points": [{"step": done, "name": k, "value": float(v)} for k, v in values.items()]})
            window_s, window_tokens = 0.0, 0
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
            last_ckpt = save(done) or last_ckpt
        if stop:
            stopped_by = "request"
            break

    completed = done >= cfg.steps
    final: Path | None = None
    if completed:
        final = out_dir / FINAL
        state.export(final)  # collective: a sharded model is gathered first
    stats = {
        "steps": done,
        "completed": completed,
        "stopped_by": stopped_by,
        "resumed_from_step": start,
        "tokens_seen": tokens_seen,
        "final_loss": sum(recent) / len(recent) if recent else None,
        "tokens_per_s": (tokens_seen - int(resumed.get("tokens_seen", 0))) / train_s if train_s > 0 else None,
        "train_s": train_s,
        "wall_s": time.perf_counter() - t0,
        "trainable_parameters": state.n_trainable,
        "device": str(device),
        "engine": state.name,
        "world_size": ctx.world,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "adapter": str(final) if final else None,
        **(extra_stats or {}),
    }
    emit({"event": "finished", "stats": stats})
    return stats


# -- pieces ----------------------------------------------------------------------------------


def _to_device(mb: dict[str, torch.Tensor], device: torch.device, step: int, micro: int) -> dict[str, torch.Tensor]:
    for key in ("input_ids", "labels", "attention_mask"):
        if key not in mb:
            raise TrainingError(f"batch {micro} of step {step} has no {key!r}", "the batch function must give input_ids, labels and attention_mask")
    if mb["labels"].shape != mb["input_ids"].shape:
        raise TrainingError(
            f"batch {micro} of step {step}: labels {tuple(mb['labels'].shape)} and input_ids {tuple(mb['input_ids'].shape)} differ in shape",
            "give one label per input token (-100 where no loss is taken)",
        )
    return {k: v.to(device, non_blocking=True) for k, v in mb.items()}


def _token_loss_sum(model: torch.nn.Module, mb: dict[str, torch.Tensor], mask_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum of the cross-entropies of the labelled tokens of one micro-batch (fp32).

    ``mask_dtype``: the activations' dtype, which an additive float mask must share; default the
    input embedding's (``model`` unwrapped), as for evaluation.
    """
    mask = mb["attention_mask"]
    if mask.dim() == 4 and mask.is_floating_point():
        # An additive mask goes to attention as is, so it must be in the activations' dtype.
        mask = mask.to(mask_dtype or model.get_input_embeddings().weight.dtype)  # type: ignore[operator]
    inputs = {"input_ids": mb["input_ids"], "attention_mask": mask}
    if "position_ids" in mb:
        inputs["position_ids"] = mb["position_ids"]
    logits = model(**inputs, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), mb["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")


_check_grads = check_grads  # the name the trainer's tests know


def _sum_ranks(ctx: DistContext, value: int) -> int:
    """``value`` summed over every rank (the identity on one process)."""
    if not ctx.initialised or ctx.world == 1:
        return int(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return int(t.item())


def _agree(ctx: DistContext, loss_sum: torch.Tensor, stop: bool) -> tuple[float, bool, bool]:
    """The step's loss (every rank's share summed / world), whether it is not finite, and whether any rank asked to stop."""
    if not ctx.initialised or ctx.world == 1:
        value = float(loss_sum)
        return value, not math.isfinite(value), stop
    t = torch.tensor([float(loss_sum), float(stop)], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    total, n_stop = t.tolist()
    value = total / ctx.world
    return value, not math.isfinite(value), n_stop > 0


def _resume(
    out_dir: Path,
    state: TrainState,
    described: dict[str, Any],
    resume_from: Path | None,
    emit: EventFn,
    ctx: DistContext,
) -> tuple[int, dict[str, Any]]:
    """Pick the checkpoint on rank 0 (verifying, falling back), check it fits, then every rank loads it."""
    chosen: str | None = None
    if ctx.is_main:
        info: ckpt.CheckpointInfo | None
        if resume_from is not None:
            info = ckpt.verify_checkpoint(resume_from)
        else:
            info, rejected = ckpt.find_resumable(out_dir)
            for path, reason in rejected:
                step = ckpt.step_of(Path(path).name.removeprefix(ckpt.REJECTED_PREFIX))
                emit({"event": "checkpoint_rejected", "step": step, "path": str(path), "reason": reason})
        if info is not None:
            _check_fits(info.path, described, state)
            chosen = str(info.path)
    chosen = broadcast_object(ctx, chosen)
    if chosen is None:
        return 0, {}
    path = Path(chosen)
    saved = json.loads((path / ckpt.TRAINER_JSON).read_text(encoding="utf-8"))
    state.load(path)
    emit({"event": "resumed", "step": int(saved["step"]), "path": str(path), "saved_world": saved.get("world", 1), "world": ctx.world})
    return int(saved["step"]), saved


def _check_fits(path: Path, described: dict[str, Any], state: TrainState) -> None:
    saved = json.loads((path / ckpt.TRAINER_JSON).read_text(encoding="utf-8"))
    for key, want in described.items():
        if saved.get(key) != want:
            name = "finetune settings" if key == "spec" else f"train.{key}"
            raise ConfigError(
                f"{name} are {want!r} but {path} was trained with {saved.get(key)!r}"
                if key == "spec"
                else f"{name} is {want!r} but {path} was trained with {saved.get(key)!r}",
                f"restore the settings that wrote {path} to resume it, or use a fresh output directory",
            )
    engine = saved.get("engine", "adapter")
    if (engine == "deepspeed") != (state.name == "deepspeed") or (engine == "adapter") != (state.name == "adapter"):
        raise TrainingError(
            f"{path} was written by the {engine} trainer, which {state.name} cannot load",
            f'set [distributed] engine = "{engine}" to resume it' if engine != "adapter" else "resume with the finetune.method that wrote it",
        )
