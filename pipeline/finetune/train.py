"""The adapter trainer: LoRA / QLoRA steps over a ``ModelSpec``, with the pre-training loop's checkpoints.

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
        trainable.safetensors    the trainable parameters (the adapters), by module name
        state/optimizer.pt       AdamW state (torch.load(weights_only=True))
        rng/rank_00000.pt        torch / numpy / python RNG states
        trainer.json             step, spec description, train settings that resume must match, recent losses
        COMPLETE                 sha256sum-format manifest of the files above, written last (ckpt_files)
    final/                       the exported adapter (``spec.export``) of a completed run

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
from pipeline.result import write_json
from pipeline.training import checkpoint as ckpt
from pipeline.training.config import TrainConfig
from pipeline.training.dist import DistContext
from pipeline.training.loop import _rng_state, _set_rng_state, _write_atomically  # one RNG capture for every trainer
from pipeline.training.schedule import lr_at

__all__ = ["FINAL", "TRAINABLE", "OPTIMIZER", "BatchFn", "train_adapter", "resolve_device", "base_dtype"]

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
FINAL = "final"
# final_loss is the mean of this many last step losses, as in the pre-training loop.
FINAL_LOSS_WINDOW = 10
# Changing these mid-run changes the adapters' initialisation, the data or the optimizer's meaning.
RESUME_LOCKED = ("seed", "seq_len", "batch_size", "grad_accum")
IGNORE = -100

BatchFn = Callable[[int, int], dict[str, torch.Tensor]]
EventFn = Callable[[dict[str, Any]], None]


def resolve_device(cfg: TrainConfig) -> torch.device:
    """``train.device``: "auto" is CUDA when present, else CPU."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available", 'set train.device = "auto" or "cpu"')
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
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
) -> dict[str, Any]:
    """Train ``spec``'s trainable parameters for ``cfg.steps`` optimizer steps; returns the run's stats.

    ``batches(step, micro)`` gives micro-batch ``micro`` (0 … grad_accum-1) of optimizer step
    ``step`` (0-based): ``input_ids`` and ``labels`` (B, T) with -100 where no loss is taken,
    ``attention_mask`` (B, T) of 0/1 or an additive float (B, 1, T, T) mask, and optionally
    ``position_ids`` (B, T). It must be a pure function of its arguments, or resume is not exact.

    Resumes from ``resume_from`` if given, else from the newest checkpoint under ``out_dir``
    that verifies (newer broken ones are set aside as ``rejected-…``). ``should_stop()`` is
    asked after every step; when it says yes a checkpoint is saved and the run returns with
    ``completed`` False. ``on_event`` receives ``started``, ``resumed``, ``log`` (every
    ``log_every`` steps: step, loss, lr, grad_norm, tokens_per_s), ``checkpoint``,
    ``checkpoint_pruned``, ``checkpoint_rejected`` and ``finished`` events. ``records_dir``: as
    in ``run_train``, retention then deletes only checkpoints the service has recorded.
    """
    t0 = time.perf_counter()
    emit = on_event or (lambda event: None)
    stop_requested = should_stop or (lambda: False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.clear_stale(out_dir)
    device = device if device is not None else resolve_device(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)  # process-wide: a training job owns its process
    torch.manual_seed(cfg.seed)  # the adapters' initialisation
    model = spec.build(device)
    named = spec.trainable_parameters()
    if not named:
        raise ConfigError("the model has no trainable parameters", "check finetune.target_modules names modules of the base")
    params = [p for _, p in named]
    # Decay matrices only (as engine.param_groups does); LoRA's A and B are all matrices.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    described = {"spec": spec.describe(), **{k: getattr(cfg, k) for k in RESUME_LOCKED}}

    start, state = _resume(out_dir, spec, optimizer, described, resume_from, emit)
    recent: list[float] = list(state.get("recent_losses", []))
    tokens_seen = int(state.get("tokens_seen", 0))
    n_trainable = sum(p.numel() for p in params)
    emit({"event": "started", "step": start, "steps": cfg.steps, "device": str(device), "trainable_parameters": n_trainable})

    def save(step: int) -> Path | None:
        from safetensors.torch import save_file

        if records_dir is not None:
            ckpt.forget_record(records_dir, step)  # a marker for this step describes the checkpoint this save replaces

        def files(tmp: Path) -> list[Path]:
            (tmp / ckpt.STATE_DIR).mkdir(exist_ok=True)
            (tmp / ckpt.RNG_DIR).mkdir(exist_ok=True)
            save_file(spec.state_dict_trainable(), str(tmp / TRAINABLE), metadata={"format": "pt"})
            torch.save(optimizer.state_dict(), tmp / ckpt.STATE_DIR / OPTIMIZER)
            torch.save(_rng_state(), tmp / ckpt.RNG_DIR / "rank_00000.pt")
            trainer = {"step": step, "tokens_seen": tokens_seen, "recent_losses": recent, **described, "train": dataclasses.asdict(cfg)}
            return [tmp / TRAINABLE, tmp / ckpt.STATE_DIR / OPTIMIZER, tmp / ckpt.RNG_DIR / "rank_00000.pt", write_json(tmp / ckpt.TRAINER_JSON, trainer)]

        return ckpt.save_and_prune(
            DistContext(),
            out_dir,
            step,
            write_rank_files=lambda tmp: [],
            write_main_files=files,
            keep_last=cfg.keep_last,
            keep_every=cfg.keep_every,
            records_dir=records_dir,
            emit=emit,
        )

    model.train()
    done, last_ckpt, stopped_by = start, None, None
    train_s, window_s, window_tokens = 0.0, 0.0, 0
    for step in range(start, cfg.steps):
        step_t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [_to_device(batches(step, micro), device, step, micro) for micro in range(cfg.grad_accum)]
        n_labels = sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches)
        if n_labels == 0:
            raise TrainingError(
                f"step {step}: no token of its {cfg.grad_accum} micro-batch(es) carries a label", "check the data: every example needs a response to learn"
            )
        loss_sum = torch.zeros((), dtype=torch.float64)
        step_tokens = 0
        for mb in micro_batches:
            # Sum of token losses / the step's label count: backward of each micro-batch adds its
            # exact share of the step's token mean (see the module docstring).
            part = _token_loss_sum(model, mb) / n_labels
            part.backward()
            loss_sum += part.detach().double().cpu()
            step_tokens += mb["input_ids"].numel()
        loss_value = float(loss_sum)
        if step == start:
            _check_grads(named)
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"training diverged: loss is {loss_value} at step {step + 1}",
                f"lower train.lr (now {cfg.lr:g}, try {cfg.lr / 3:g}) or raise train.warmup_steps (now {cfg.warmup_steps}) and start a new run",
            )
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None])))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
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
            window_s, window_tokens = 0.0, 0
        stop = stop_requested()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
            last_ckpt = save(done) or last_ckpt
        if stop:
            stopped_by = "request"
            break

    completed = done >= cfg.steps
    final: Path | None = None
    if completed:
        final = out_dir / FINAL
        _write_atomically(final, spec.export)
    stats = {
        "steps": done,
        "completed": completed,
        "stopped_by": stopped_by,
        "resumed_from_step": start,
        "tokens_seen": tokens_seen,
        "final_loss": sum(recent) / len(recent) if recent else None,
        "tokens_per_s": (tokens_seen - int(state.get("tokens_seen", 0))) / train_s if train_s > 0 else None,
        "train_s": train_s,
        "wall_s": time.perf_counter() - t0,
        "trainable_parameters": n_trainable,
        "device": str(device),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "adapter": str(final) if final else None,
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


def _token_loss_sum(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the cross-entropies of the labelled tokens of one micro-batch (fp32)."""
    mask = mb["attention_mask"]
    if mask.dim() == 4 and mask.is_floating_point():
        # An additive mask goes to attention as is, so it must be in the activations' dtype.
        mask = mask.to(model.get_input_embeddings().weight.dtype)  # type: ignore[operator]
    inputs = {"input_ids": mb["input_ids"], "attention_mask": mask}
    if "position_ids" in mb:
        inputs["position_ids"] = mb["position_ids"]
    logits = model(**inputs, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), mb["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")


def _check_grads(named: list[tuple[str, torch.nn.Parameter]]) -> None:
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


def _resume(
    out_dir: Path,
    spec: ModelSpec,
    optimizer: torch.optim.Optimizer,
    described: dict[str, Any],
    resume_from: Path | None,
    emit: EventFn,
) -> tuple[int, dict[str, Any]]:
    info: ckpt.CheckpointInfo | None
    if resume_from is not None:
        info = ckpt.verify_checkpoint(resume_from)
    else:
        info, rejected = ckpt.find_resumable(out_dir)
        for path, reason in rejected:
            step = ckpt.step_of(Path(path).name.removeprefix(ckpt.REJECTED_PREFIX))
            emit({"event": "checkpoint_rejected", "step": step, "path": str(path), "reason": reason})
    if info is None:
        return 0, {}
    from safetensors.torch import load_file

    path = info.path
    state = json.loads((path / ckpt.TRAINER_JSON).read_text(encoding="utf-8"))
    for key, want in described.items():
        if state.get(key) != want:
            name = "finetune settings" if key == "spec" else f"train.{key}"
            raise ConfigError(
                f"{name} are {want!r} but {path} was trained with {state.get(key)!r}"
                if key == "spec"
                else f"{name} is {want!r} but {path} was trained with {state.get(key)!r}",
                f"restore the settings that wrote {path} to resume it, or use a fresh output directory",
            )
    spec.load_trainable(load_file(str(path / TRAINABLE)))
    optimizer.load_state_dict(torch.load(path / ckpt.STATE_DIR / OPTIMIZER, map_location="cpu", weights_only=True))
    _set_rng_state(torch.load(path / ckpt.RNG_DIR / "rank_00000.pt", map_location="cpu", weights_only=True))
    emit({"event": "resumed", "step": int(state["step"]), "path": str(path)})
    return int(state["step"]), state
