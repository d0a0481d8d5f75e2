"""The training loop: one function, read top to bottom, the same on one CPU and on many GPU nodes.

Determinism is by construction: the model is initialised from ``seed``, the data order is a
function of (seed, position) (``loader.TokenLoader``), the learning rate a function of the
step (``schedule.lr_at``), and a checkpoint holds weights, optimizer, data position and RNG
states. So a CPU run stopped at any step and resumed ends with the same bits as a run that
was never stopped (same thread count).

Layout of ``out_dir``::

    checkpoints/step_000200/   see ``checkpoint.py``
    final/                     model.safetensors, model_config.json, train_config.json
    logs/metrics.jsonl         one {"step", "name", "value"} per line
    logs/tensorboard/          TensorBoard event files

Only rank 0 writes files other than its share of a checkpoint, and only rank 0 reports to
the caller (``on_event``): the service never hears from the other ranks directly; their
checkpoint files reach it as digests gathered by rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keys.digest import sha256_file
from keys.files import atomic_write_text, publish_dir
from pipeline.errors import ConfigError, TrainingError
from pipeline.evaluate import windows_loss
from pipeline.model import MODEL_CONFIG, WEIGHTS, LlamaModel, ModelConfig, model_flops_per_token, read_model_config, save_model_config
from pipeline.result import ProgressFn, StageResult, no_progress, write_json
from pipeline.shard_format import MANIFEST, open_shards, require_val_tokens
from pipeline.training import checkpoint as ckpt
from pipeline.training import dist
from pipeline.training.config import DistConfig, TrainConfig
from pipeline.training.engine import Engine, autocast
from pipeline.training.loader import TokenLoader
from pipeline.training.schedule import lr_at

TRAIN_CONFIG = "train_config.json"
LOGS = "logs"
METRICS = "metrics.jsonl"
# final_loss is the mean of this many last step losses: one step's loss is too noisy to report.
FINAL_LOSS_WINDOW = 10
# Changing these mid-run would change the model or which tokens come next.
RESUME_LOCKED = ("seed", "seq_len")

EventFn = Callable[[dict[str, Any]], None]


def _no_event(event: dict[str, Any]) -> None:
    """The default event sink: ignore."""


def run_train(
    shards_dir: Path,
    out_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    progress: ProgressFn = no_progress,
    *,
    dist_cfg: DistConfig | None = None,
    deepspeed_config: dict[str, Any] | None = None,
    resume_from: Path | None = None,
    stop_at_step: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_event: EventFn = _no_event,
    records_dir: Path | None = None,
) -> StageResult:
    """Train (or resume training) a model on a verified shard set.

    Resumes from ``resume_from`` if given, else from the newest checkpoint under ``out_dir``
    that verifies (newer ones that do not are renamed ``rejected-…`` and reported as
    ``checkpoint_rejected`` events). ``stop_at_step`` and ``should_stop`` end the run early
    with a checkpoint; then ``stats["completed"]`` is False and ``outputs["checkpoint"]`` is
    that checkpoint. Under torchrun every rank calls this; rank 0 returns the full result.

    ``records_dir``: the folder where the service marks each checkpoint it has recorded
    (``ckpt.mark_recorded``); retention then deletes only marked checkpoints. None: retention
    deletes whatever it does not keep (no service is watching).
    """
    t0 = time.perf_counter()
    dist_cfg = dist_cfg or DistConfig()
    out_dir = Path(out_dir)
    device = _device(cfg, dist.from_env().local_rank)
    ctx = dist.init(backend_for(dist_cfg, device), dist_cfg.timeout_s)
    try:
        return _train(
            shards_dir,
            out_dir,
            model_cfg,
            cfg,
            dist_cfg,
            deepspeed_config,
            device,
            ctx,
            progress,
            resume_from,
            stop_at_step,
            should_stop,
            on_event,
            Path(records_dir) if records_dir is not None else None,
            t0,
        )
    finally:
        dist.shutdown(ctx)


def _train(
    shards_dir: Path,
    out_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    dist_cfg: DistConfig,
    deepspeed_config: dict[str, Any] | None,
    device: torch.device,
    ctx: dist.DistContext,
    progress: ProgressFn,
    resume_from: Path | None,
    stop_at_step: int | None,
    should_stop: Callable[[], bool],
    on_event: EventFn,
    records_dir: Path | None,
    t0: float,
) -> StageResult:
    from pipeline.training import monitor  # tensorboard and friends load only when training

    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clear_stale(out_dir)
    dist.share_data_keys(ctx)  # ranks of a joined node start without the run's data keys
    if ctx.local_rank == 0:
        # Every shard's sha256 is checked before a single step: once per node, not once per rank
        # (eight ranks re-hashing a 100 GB shard set would cost minutes at start-up).
        open_shards(shards_dir)
    dist.barrier(ctx)
    shards = open_shards(shards_dir, verify_digests=False)
    manifest_sha = sha256_file(Path(shards_dir) / MANIFEST)
    if model_cfg.vocab_size and model_cfg.vocab_size < shards.vocab_size:
        raise ConfigError(
            f"model.vocab_size is {model_cfg.vocab_size} but the shard set's tokenizer has {shards.vocab_size} ids",
            "set model.vocab_size = 0 to take it from the shard set",
        )
    mcfg = model_cfg.resolved(vocab_size=shards.vocab_size)
    if cfg.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"train.seq_len ({cfg.seq_len}) exceeds model.max_seq_len ({mcfg.max_seq_len})", "lower train.seq_len or raise model.max_seq_len")
    # Validation runs at the end of every run (and every eval_every steps): a val split that is
    # empty or shorter than one window would fail only then, after all the compute is spent.
    require_val_tokens(shards.root, shards.manifest, seq_len=cfg.seq_len, source="train.seq_len")
    loader = TokenLoader(shards, "train", seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed, rank=ctx.rank, world=ctx.world)
    val_tokens = shards.tokens("val")

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)  # process-wide: a training job owns its process
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.manual_seed(cfg.seed)
    model = LlamaModel(mcfg).to(device)
    engine = build_engine(engine_name(dist_cfg, ctx), model, cfg, deepspeed_config, device, ctx)
    extra = {"bos_id": shards.bos_id, "eos_id": shards.eos_id, "shards_manifest_sha256": manifest_sha}

    start, state = _resume(out_dir, engine, loader, cfg, mcfg, manifest_sha, ctx, resume_from, on_event)
    recent: list[float] = list(state.get("recent_losses", []))
    tokens_seen = int(state.get("tokens_seen", 0))
    logs = out_dir / LOGS
    metrics = _load_metrics(logs / METRICS, start) if ctx.is_main else []
    tb = None
    if ctx.is_main:
        logs.mkdir(parents=True, exist_ok=True)
        # Cut back to the resumed step in one atomic write: a crash here must not lose the curve so far.
        atomic_write_text(logs / METRICS, "".join(json.dumps(m) + "\n" for m in metrics), mode=0o644)
        tb = monitor.TensorBoardLog(logs / "tensorboard")
    end = min(cfg.steps, stop_at_step) if stop_at_step is not None else cfg.steps
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * ctx.world
    flops_per_token = model_flops_per_token(mcfg, cfg.seq_len)
    peak, peak_name = monitor.device_peak_flops(device, precision_for(cfg, device), cfg.peak_tflops)
    # The peak is per device; the job's tokens/s come from all of them.
    job_peak = peak * ctx.world if peak else None
    if ctx.is_main:
        on_event(
            {
                "event": "started",
                "step": start,
                "steps": cfg.steps,
                "world": ctx.world,
                "engine": engine.name,
                "device": str(device),
                "peak": peak_name,
                "parameters": model.num_parameters(),
            }
        )

    def log(step: int, values: dict[str, float]) -> None:
        points = [{"step": step, "name": k, "value": float(v)} for k, v in values.items()]
        metrics.extend(points)
        with open(logs / METRICS, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(p) + "\n" for p in points))
        if tb is not None:
            tb.scalars(step, {(f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"): v for k, v in values.items()})
        on_event({"event": "metrics", "points": points})

    def save(step: int) -> Path | None:
        if ctx.is_main and records_dir is not None:
            # A marker for this step describes a checkpoint this save replaces (a re-run past a crash).
            ckpt.forget_record(records_dir, step)
        weights = engine.full_weights()  # collective: FSDP/ZeRO-3 gather on rank 0

        def rank_files(tmp: Path) -> list[Path]:
            (tmp / ckpt.STATE_DIR).mkdir(exist_ok=True)
            (tmp / ckpt.RNG_DIR).mkdir(exist_ok=True)
            rng_file = tmp / ckpt.RNG_DIR / f"rank_{ctx.rank:05d}.pt"
            torch.save(rng_state(), rng_file)
            return [*engine.save(tmp / ckpt.STATE_DIR), rng_file]

        def main_files(tmp: Path) -> list[Path]:
            files = _write_model_dir(tmp, weights, mcfg, cfg, extra)
            trainer = {
                "step": step,
                "loader": loader.state_dict(),
                "tokens_seen": tokens_seen,
                "recent_losses": recent,
                "world": ctx.world,
                "engine": engine.name,
                **extra,
            }
            return [*files, write_json(tmp / ckpt.TRAINER_JSON, trainer)]

        return ckpt.save_and_prune(
            ctx,
            out_dir,
            step,
            write_rank_files=rank_files,
            write_main_files=main_files,
            keep_last=cfg.keep_last,
            keep_every=cfg.keep_every,
            records_dir=records_dir,
            emit=on_event,
        )

    engine.model.train()
    loop_t0 = time.perf_counter()
    done, last_ckpt, stopped_by = start, None, None
    meter = monitor.RateMeter(loop_t0)
    last_val: float | None = None
    train_s = 0.0  # time in training steps only: evaluation and checkpoint I/O are not throughput
    for step in range(start, end):
        step_t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        # Summed on the device: the one host sync per step is in _agree.
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for micro in range(cfg.grad_accum):
            x, y = loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss_sum += engine.forward_backward(x, y, accum_steps=cfg.grad_accum, last=micro == cfg.grad_accum - 1).float()
        done = step + 1
        # One small all-reduce per step carries what every rank must agree on: the mean loss,
        # whether any rank saw a non-finite loss, and whether any rank was asked to stop.
        loss_value, bad, stop = _agree(ctx, loss_sum / cfg.grad_accum, should_stop())
        if bad:
            _diverged(loss_value, done, cfg, out_dir)  # before the update, so the saved weights stay finite
        grad_norm = engine.optimizer_step(lr, cfg.grad_clip)
        train_s += time.perf_counter() - step_t0
        tokens_seen += tokens_per_step
        meter.add(tokens_per_step)
        recent = (recent + [loss_value])[-FINAL_LOSS_WINDOW:]
        if done % cfg.log_every == 0 or done == cfg.steps:
            rate = meter.rate(time.perf_counter())
            values = {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": rate, "epoch": loader.epoch}
            util = monitor.mfu(rate, flops_per_token, job_peak)
            if util is not None:
                values["mfu"] = util
            values.update({f"memory_{k}": v for k, v in monitor.memory_stats(device).items()})
            if ctx.is_main:
                log(done, values)
                progress(done, cfg.steps, {"loss": round(loss_value, 4), "tok/s": round(rate)})
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            last_val = _validate(engine, val_tokens, cfg, device)
            if ctx.is_main:
                log(done, {"val_loss": last_val, "val_perplexity": math.exp(min(last_val, 50.0))})
            meter.restart(time.perf_counter())
        stopping = (done == end and end < cfg.steps) or stop
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping:
            last_ckpt = save(done) or last_ckpt
            meter.restart(time.perf_counter())  # checkpoint I/O is not training throughput
        if stopping:
            stopped_by = "request" if stop else "stop_at_step"
            break

    completed = done >= cfg.steps
    final_weights = engine.full_weights() if completed else None
    if tb is not None:
        tb.close()
    if not ctx.is_main:
        return StageResult(outputs={}, stats={"steps": done, "completed": completed, "rank": ctx.rank})
    if completed:
        final = out_dir / "final"
        write_atomically(final, lambda d: _write_model_dir(d, final_weights, mcfg, cfg, extra))
    else:
        final = last_ckpt or (ckpt.list_checkpoints(out_dir) or [out_dir])[-1]
    stats = {
        "steps": done,
        "completed": completed,
        "stopped_by": stopped_by,
        "resumed_from_step": start,
        "tokens_seen": tokens_seen,
        "final_loss": sum(recent) / len(recent) if recent else None,
        "val_loss": last_val,
        "tokens_per_s": (done - start) * tokens_per_step / train_s if done > start and train_s > 0 else None,
        "train_s": train_s,
        "wall_s": time.perf_counter() - t0,
        "parameters": model.num_parameters(),
        "device": str(device),
        "engine": engine.name,
        "world_size": ctx.world,
        "global_batch_tokens": tokens_per_step,
        "peak_flops": peak_name,
    }
    on_event({"event": "finished", "stats": stats})
    return StageResult(outputs={"checkpoint": final, "logs": logs}, stats=stats, metrics=metrics)


# -- pieces ----------------------------------------------------------------------------------


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available", 'set train.device = "auto" or "cpu"')
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def backend_for(dist_cfg: DistConfig, device: torch.device) -> str:
    if dist_cfg.backend != "auto":
        return dist_cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


def precision_for(cfg: TrainConfig, device: torch.device) -> str:
    return "bf16" if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda") else "fp32"


def engine_name(dist_cfg: DistConfig, ctx: dist.DistContext) -> str:
    if dist_cfg.engine == "auto":
        return "ddp" if ctx.world > 1 else "single"
    if dist_cfg.engine == "ddp" and not ctx.initialised:
        return "single"  # DDP over one process is the plain loop
    if dist_cfg.engine == "fsdp" and not ctx.initialised:
        raise ConfigError(
            'distributed.engine = "fsdp" needs a torchrun launch',
            'run it through `appliance train` / `appliance run`, which launch torchrun, or set engine = "single"',
        )
    return dist_cfg.engine


def build_engine(name: str, model: torch.nn.Module, cfg: TrainConfig, ds_config: dict[str, Any] | None, device: torch.device, ctx: dist.DistContext) -> Engine:
    if name == "deepspeed":
        from pipeline.training.engine_deepspeed import build_deepspeed_engine  # lazy: DeepSpeed is optional

        if ds_config is None:
            raise ConfigError(
                'distributed.engine = "deepspeed" but no DeepSpeed config was given', 'set distributed.deepspeed_config = "path/to/ds_config.json"'
            )
        return build_deepspeed_engine(model, cfg, ds_config, device)
    from pipeline.training.engine_native import build_native_engine

    return build_native_engine(name, model, cfg, device, ctx)


def _agree(ctx: dist.DistContext, loss: torch.Tensor, stop: bool) -> tuple[float, bool, bool]:
    if not ctx.initialised or ctx.world == 1:
        value = float(loss)
        return value, not math.isfinite(value), stop
    # On the loss's device: NCCL reduces CUDA tensors only.
    bad = ~torch.isfinite(loss)
    t = torch.stack([torch.where(bad, torch.zeros_like(loss), loss), bad.float(), torch.full_like(loss, float(stop))]).double()
    torch.distributed.all_reduce(t)
    total, n_bad, n_stop = t.tolist()
    return (float("nan") if n_bad else total / ctx.world), n_bad > 0, n_stop > 0


def _diverged(loss: float, step: int, cfg: TrainConfig, out_dir: Path) -> None:
    raise TrainingError(
        f"training diverged: loss is {loss} at step {step}",
        f"lower train.lr (now {cfg.lr:g}, try {cfg.lr / 3:g}) or raise train.warmup_steps (now {cfg.warmup_steps}) in the recipe and"
        f" train again; a run keeps the recipe it recorded, so start a new one (its checkpoints are under {out_dir / ckpt.CKPT_DIR})",
    )


def _validate(engine: Engine, val_tokens: np.ndarray, cfg: TrainConfig, device: torch.device) -> float:
    # Every rank runs the same windows: under FSDP/ZeRO-3 the forward pass is collective.
    loss, _ = windows_loss(
        engine.model,
        val_tokens,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        max_batches=cfg.eval_batches,
        device=device,
        autocast=lambda: autocast(device, cfg.precision),
    )
    engine.model.train()
    return loss


def rng_state() -> dict:
    # Plain lists and tensors only, so rank_N.pt loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [py[0], list(py[1]), py[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_model_dir(d: Path, weights: dict[str, torch.Tensor] | None, mcfg: ModelConfig, cfg: TrainConfig, extra: dict[str, Any]) -> list[Path]:
    from safetensors.torch import save_file

    if weights is None:
        raise TrainingError("rank 0 has no full weights to write", "report this: the engine did not gather its weights")
    # "format": "pt" is what transformers looks for in the safetensors metadata.
    save_file(weights, str(d / WEIGHTS), metadata={"format": "pt"})
    save_model_config(d, mcfg, bos_id=extra["bos_id"], eos_id=extra["eos_id"])
    return [d / WEIGHTS, d / MODEL_CONFIG, write_json(d / TRAIN_CONFIG, dataclasses.asdict(cfg))]


def write_atomically(final: Path, write: Callable[[Path], Any]) -> None:
    """Fill a temp directory beside ``final`` and rename it into place: a crash never leaves half a model."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    publish_dir(tmp, final, replace=True)


def _resume(
    out_dir: Path,
    engine: Engine,
    loader: TokenLoader,
    cfg: TrainConfig,
    mcfg: ModelConfig,
    manifest_sha: str,
    ctx: dist.DistContext,
    resume_from: Path | None,
    on_event: EventFn,
) -> tuple[int, dict]:
    """Pick the checkpoint on rank 0 (verifying, falling back), then every rank loads it."""
    chosen: str | None = None
    if ctx.is_main:
        if resume_from is not None:
            chosen = str(ckpt.verify_checkpoint(resume_from).path)
        else:
            # Integrity first (a bad checkpoint is set aside and the previous one used); a good
            # checkpoint of another model or data order is the user's to sort out, so that raises.
            info, rejected = ckpt.find_resumable(out_dir)
            for path, reason in rejected:
                on_event(
                    {
                        "event": "checkpoint_rejected",
                        "step": ckpt.step_of(Path(path).name.removeprefix(ckpt.REJECTED_PREFIX)),
                        "path": str(path),
                        "reason": reason,
                    }
                )
            chosen = str(info.path) if info else None
        if chosen is not None:
            _check_fits(Path(chosen), cfg, mcfg, manifest_sha)
    chosen = dist.broadcast_object(ctx, chosen)
    if chosen is None:
        return 0, {}
    path = Path(chosen)
    state = json.loads((path / ckpt.TRAINER_JSON).read_text(encoding="utf-8"))
    if (state.get("engine") == "deepspeed") != (engine.name == "deepspeed"):
        raise TrainingError(
            f"{path} was written by the {state.get('engine')} engine, which cannot be loaded by {engine.name}",
            f'set distributed.engine = "{state.get("engine")}" to resume it',
        )
    engine.load(path / ckpt.STATE_DIR)
    loader.load_state_dict(state["loader"])
    rng_file = path / ckpt.RNG_DIR / f"rank_{ctx.rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    else:
        # Resumed on more ranks than saved: a new rank's generators start from (seed, rank, step).
        torch.manual_seed(cfg.seed * 1_000_003 + ctx.rank * 7919 + int(state["step"]))
    if ctx.is_main:
        on_event({"event": "resumed", "step": int(state["step"]), "path": str(path), "saved_world": state.get("world"), "world": ctx.world})
    return int(state["step"]), state


def _check_fits(path: Path, cfg: TrainConfig, mcfg: ModelConfig, manifest_sha: str) -> None:
    """Refuse to resume a checkpoint of another model, shard set or data order (TrainingError/ConfigError)."""
    saved_cfg, _ = read_model_config(path)
    if saved_cfg != mcfg:
        raise TrainingError(
            f"{path} holds a different model ({saved_cfg}) than the one configured ({mcfg})",
            f"use a fresh output directory, or restore the model settings that produced {path}",
        )
    state = json.loads((path / ckpt.TRAINER_JSON).read_text(encoding="utf-8"))
    if state.get("shards_manifest_sha256") != manifest_sha:
        raise TrainingError(
            f"{path} was trained on a different shard set than the one given", "resume with the same shards, or start in a fresh output directory"
        )
    saved_train = json.loads((path / TRAIN_CONFIG).read_text(encoding="utf-8"))
    for key in RESUME_LOCKED:
        if saved_train.get(key) != getattr(cfg, key):
            raise ConfigError(
                f"train.{key} is {getattr(cfg, key)!r} but {path} was trained with {saved_train.get(key)!r}",
                f"set train.{key} back to {saved_train.get(key)!r} to resume, or use a fresh output directory",
            )


def _load_metrics(path: Path, upto: int) -> list[dict]:
    """Metrics already logged up to step ``upto`` (a resumed run re-logs the steps after it)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]
