"""Pre-training loop: one readable function, nanoGPT-style, that resumes bit-identically.

Determinism is by construction: the batch at step ``s`` is drawn from
``np.random.default_rng([seed, s])``, the learning rate is a function of ``s``, and a
checkpoint holds the weights, the optimizer, the step and the RNG states. So "where are we in
the data" is just the step number, and a run stopped at step 5 and resumed to step 10 ends
with the same bits as a straight 10-step run on the same device and thread count.

Layout of ``out_dir``::

    checkpoints/step_000200/  model.safetensors, model_config.json, train_config.json,
                              trainer_state.pt (optimizer, step, RNG), state.json
    final/                    model.safetensors, model_config.json, train_config.json
    metrics.jsonl             one {"step", "name", "value"} per line

Seams for later work, deliberately not built here: ``should_stop`` is polled after every
step (a SIGTERM handler sets it; the loop then checkpoints and returns), and ``Ranks`` plus
``batch_at``'s ``rank``/``world`` arguments are where DDP/FSDP slot in (each rank takes its
slice of the same global batch, and only rank 0 writes files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from keys.digest import sha256_file
from keys.errors import ConfigError, TrainingError
from pipeline.config import check
from pipeline.evaluate import windows_loss
from pipeline.model import WEIGHTS, LlamaModel, ModelConfig, load_weights, read_model_config, save_model_config, save_weights
from pipeline.result import ProgressFn, StageResult, no_progress
from pipeline.shard_format import MANIFEST, open_shards

CKPT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
STATE_JSON = "state.json"
TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
# final_loss is the mean of this many last step losses: one step's loss is too noisy to report.
FINAL_LOSS_WINDOW = 10
# Changing these mid-run would change which tokens a step sees, breaking "data position = step".
RESUME_LOCKED = ("seed", "batch_size", "seq_len")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    # Optimizer updates; the cosine schedule decays to min_lr exactly at the last one.
    steps: int = 2000
    # Sequences per step; 16 × 256 = 4k tokens keeps a CPU step around a second for the default model.
    batch_size: int = 16
    # Tokens per sequence; must not exceed the model's max_seq_len.
    seq_len: int = 256
    # 1e-3 suits models of a few million parameters (nanoGPT's small-model choice); lower it for bigger ones.
    lr: float = 1e-3
    # Decay to a tenth of lr (Chinchilla's practice), not to zero, so late steps still learn.
    min_lr: float = 1e-4
    # A short linear warmup keeps Adam's first, badly-estimated updates from blowing up the weights.
    warmup_steps: int = 100
    # 0.1 as in GPT-3/Llama; applied to matrices only (see _param_groups).
    weight_decay: float = 0.1
    beta1: float = 0.9
    # 0.95 rather than Adam's 0.999: adapts faster to the shifting gradient scale of LM training.
    beta2: float = 0.95
    # Clip the global gradient norm at 1.0 (GPT-3/Llama); 0 disables clipping.
    grad_clip: float = 1.0
    # Save a resumable checkpoint every this many steps (and always at the end / on stop).
    checkpoint_every: int = 200
    # Older checkpoints are deleted: each holds weights + 2 Adam moments (3× the model size).
    keep_checkpoints: int = 2
    # Seeds model init and the batch sequence.
    seed: int = 1337
    # "auto" = CUDA when present, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16 autocast, applied on CUDA only: CPU bf16 speed-ups are small and numerics differ by CPU.
    autocast: bool = True
    # torch.compile gives ~10-20 % on CPU after a 12-19 s compile: off until runs are long.
    compile: bool = False
    # 0 = torch's default (one per core); set it when sharing the machine with other jobs.
    num_threads: int = 0
    # Record loss and lr every this many steps (progress is reported at the same pace).
    log_every: int = 10
    # Measure validation loss every this many steps; None = only the evaluate stage does it.
    eval_every: int | None = None
    # Validation batches per in-training evaluation; a few suffice to see over-fitting.
    eval_batches: int = 10

    def __post_init__(self) -> None:
        check(self.steps > 0, f"steps must be positive, got {self.steps}")
        check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        check(self.seq_len > 0, f"seq_len must be positive, got {self.seq_len}")
        check(self.lr > 0, f"lr must be positive, got {self.lr}")
        check(0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        check(self.checkpoint_every > 0, f"checkpoint_every must be positive, got {self.checkpoint_every}")
        check(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        check(self.num_threads >= 0, f"num_threads must be >= 0 (0 = default), got {self.num_threads}")
        check(self.log_every > 0, f"log_every must be positive, got {self.log_every}")
        check(self.eval_every is None or self.eval_every > 0, f"eval_every must be positive or absent, got {self.eval_every}")
        check(self.eval_batches > 0, f"eval_batches must be positive, got {self.eval_batches}")


@dataclass(frozen=True, slots=True)
class Ranks:
    """Where this process sits in a distributed job. One process today; DDP/FSDP fill it from torchrun."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine down to min_lr at the last step (nanoGPT's schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, cfg.steps - cfg.warmup_steps)
    ratio = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def batch_at(tokens: np.ndarray, step: int, *, batch_size: int, seq_len: int, seed: int, ranks: Ranks = Ranks()) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (batch_size, seq_len) for ``step``: random windows of seq_len+1 tokens.

    The global batch (world × batch_size windows) depends only on (seed, step); each rank takes
    its slice, so the data a step sees does not depend on the number of ranks.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size * ranks.world)
    mine = starts[ranks.rank * batch_size : (ranks.rank + 1) * batch_size]
    windows = torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in mine]))
    return windows[:, :-1], windows[:, 1:]


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices only: shrinking RMSNorm gains (1-D) toward zero just fights the normalisation.
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available", "set train.device = \"auto\" or \"cpu\"")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _autocast(device: torch.device, cfg: TrainConfig) -> contextlib.AbstractContextManager:
    if cfg.autocast and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _rng_state() -> dict:
    # Plain lists and tensors only, so trainer_state.pt loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_dirs(out_dir: Path) -> list[Path]:
    root = out_dir / CKPT_DIR
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def _write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temp directory beside ``final`` and rename it into place: a crash never leaves half a checkpoint."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _write_model_dir(d: Path, model: LlamaModel, cfg: TrainConfig, bos_id: int, eos_id: int) -> None:
    save_weights(model, d / WEIGHTS)
    save_model_config(d, model.cfg, bos_id=bos_id, eos_id=eos_id)
    (d / TRAIN_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_checkpoint(out_dir: Path, step: int, model: LlamaModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig, extra: dict) -> Path:
    """Write ``checkpoints/step_%06d`` atomically and prune to the last ``keep_checkpoints``."""
    path = out_dir / CKPT_DIR / f"step_{step:06d}"

    def write(d: Path) -> None:
        _write_model_dir(d, model, cfg, extra["bos_id"], extra["eos_id"])
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": _rng_state()}, d / TRAINER_STATE)
        (d / STATE_JSON).write_text(json.dumps({"step": step, **extra}, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    _write_atomically(path, write)
    for old in _step_dirs(out_dir)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return path


def _resume(out_dir: Path, model: LlamaModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig, manifest_sha: str) -> tuple[int, dict]:
    """Load the latest checkpoint in ``out_dir`` if any; returns (step, its state.json)."""
    dirs = _step_dirs(out_dir)
    if not dirs:
        return 0, {}
    ckpt = dirs[-1]
    saved_cfg, _ = read_model_config(ckpt)
    if saved_cfg != model.cfg:
        raise TrainingError(f"{ckpt} holds a different model ({saved_cfg}) than the one configured ({model.cfg})", f"use a fresh output directory, or restore the model settings that produced {ckpt}")
    state = json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))
    if state.get("shards_manifest_sha256") != manifest_sha:
        raise TrainingError(f"{ckpt} was trained on a different shard set than the one given", "resume with the same shards, or start in a fresh output directory")
    saved_train = json.loads((ckpt / TRAIN_CONFIG).read_text(encoding="utf-8"))
    for key in RESUME_LOCKED:
        if saved_train.get(key) != getattr(cfg, key):
            raise ConfigError(f"train.{key} is {getattr(cfg, key)!r} but {ckpt} was trained with {saved_train.get(key)!r}", f"set train.{key} back to {saved_train.get(key)!r} to resume, or use a fresh output directory")
    load_weights(model, ckpt / WEIGHTS)
    trainer = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    _set_rng_state(trainer["rng"])
    return int(trainer["step"]), state


def _load_metrics(path: Path, upto: int) -> list[dict]:
    """Metrics already logged up to step ``upto`` (a resumed run re-logs the steps after it)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def _check_finite(loss: float, step: int, cfg: TrainConfig, out_dir: Path) -> None:
    if not math.isfinite(loss):
        raise TrainingError(
            f"training diverged: loss is {loss} at step {step}",
            f"lower train.lr (now {cfg.lr:g}, try {cfg.lr / 3:g}) or raise train.warmup_steps, then run again:"
            f" it resumes from the last checkpoint under {out_dir / CKPT_DIR}, if any",
        )


def run_train(
    shards_dir: Path,
    out_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    progress: ProgressFn = no_progress,
    *,
    stop_at_step: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> StageResult:
    """Train (or resume training) a model on a shard set; returns ``outputs={"checkpoint": out_dir/"final"}``.

    Resumes from the latest ``out_dir/checkpoints/step_*`` if there is one. ``stop_at_step`` and
    ``should_stop`` end the run early with a checkpoint; then ``outputs["checkpoint"]`` is that
    step's directory and ``stats["completed"]`` is False.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(".tmp-*"), *(out_dir / CKPT_DIR).glob(".tmp-*")]:
        shutil.rmtree(stale)  # half-written by a run that was killed mid-save; never resumed from
    shards = open_shards(shards_dir)  # verifies every shard's sha256 before a single step
    manifest_sha = sha256_file(Path(shards_dir) / MANIFEST)
    if model_cfg.vocab_size and model_cfg.vocab_size < shards.vocab_size:
        raise ConfigError(f"model.vocab_size is {model_cfg.vocab_size} but the shard set's tokenizer has {shards.vocab_size} ids", "set model.vocab_size = 0 to take it from the shard set")
    mcfg = model_cfg.resolved(vocab_size=shards.vocab_size)
    if cfg.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"train.seq_len ({cfg.seq_len}) exceeds model.max_seq_len ({mcfg.max_seq_len})", "lower train.seq_len or raise model.max_seq_len")
    train_tokens = shards.tokens("train")
    if len(train_tokens) <= cfg.seq_len + 1:
        raise ConfigError(f"the train split of {shards_dir} has {len(train_tokens)} tokens, fewer than train.seq_len + 1 = {cfg.seq_len + 1}", "lower train.seq_len or shard more text")
    val_tokens = shards.tokens("val") if cfg.eval_every else None

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)  # process-wide: a training job owns its process
    device = _device(cfg)
    ranks = Ranks()
    torch.manual_seed(cfg.seed)
    model = LlamaModel(mcfg).to(device)
    # fused AdamW is a single kernel on CUDA; on CPU the default (foreach) path is the fast one.
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    extra = {"bos_id": shards.bos_id, "eos_id": shards.eos_id, "shards_manifest_sha256": manifest_sha}
    start, state = _resume(out_dir, model, optimizer, cfg, manifest_sha)
    recent: list[float] = list(state.get("recent_losses", []))
    tokens_seen = int(state.get("tokens_seen", 0))
    metrics = _load_metrics(out_dir / METRICS, start)
    (out_dir / METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")
    forward = torch.compile(model) if cfg.compile else model
    end = min(cfg.steps, stop_at_step) if stop_at_step is not None else cfg.steps
    tokens_per_step = cfg.batch_size * cfg.seq_len * ranks.world

    def log(step: int, name: str, value: float) -> None:
        row = {"step": step, "name": name, "value": value}
        metrics.append(row)
        with open(out_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def checkpoint(step: int) -> Path:
        return save_checkpoint(out_dir, step, model, optimizer, cfg, {**extra, "recent_losses": recent, "tokens_seen": tokens_seen})

    model.train()
    loop_t0, done, last_ckpt = time.perf_counter(), start, None
    last_log = (start, loop_t0)
    for step in range(start, end):
        x, y = batch_at(train_tokens, step, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, ranks=ranks)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device, cfg):
            _, loss = forward(x, y)
        loss_value = loss.item()
        done = step + 1
        _check_finite(loss_value, done, cfg, out_dir)  # before the update, so the weights stay finite
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        tokens_seen += tokens_per_step
        recent = (recent + [loss_value])[-FINAL_LOSS_WINDOW:]
        if done % cfg.log_every == 0 or done == cfg.steps:
            log(done, "loss", loss_value)
            log(done, "lr", lr)
            # Rate over the last log interval: what a live display wants (the first steps are slow).
            now = time.perf_counter()
            rate = (done - last_log[0]) * tokens_per_step / max(now - last_log[1], 1e-9)
            last_log = (done, now)
            progress(done, cfg.steps, {"loss": round(loss_value, 4), "tok/s": round(rate)})
        if cfg.eval_every and val_tokens is not None and done % cfg.eval_every == 0:
            val_loss, _ = windows_loss(model, val_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_batches=cfg.eval_batches, device=device, autocast=lambda: _autocast(device, cfg))
            model.train()
            log(done, "val_loss", val_loss)
        stopping = (done == end and end < cfg.steps) or should_stop()
        if ranks.is_main and (done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping):
            last_ckpt = checkpoint(done)
        if stopping:
            break
    loop_s = time.perf_counter() - loop_t0

    completed = done >= cfg.steps
    if completed:
        final = out_dir / "final"
        _write_atomically(final, lambda d: _write_model_dir(d, model, cfg, shards.bos_id, shards.eos_id))
    else:
        final = last_ckpt or (_step_dirs(out_dir)[-1] if _step_dirs(out_dir) else out_dir)
    stats = {
        "steps": done,
        "completed": completed,
        "resumed_from_step": start,
        "tokens_seen": tokens_seen,
        "final_loss": sum(recent) / len(recent) if recent else None,
        "tokens_per_s": (done - start) * tokens_per_step / loop_s if done > start and loop_s > 0 else None,
        "wall_s": time.perf_counter() - t0,
        "parameters": model.num_parameters(),
        "device": str(device),
    }
    return StageResult(outputs={"checkpoint": final}, stats=stats, metrics=metrics)
