"""The train stage as the service runs it: a child job whose checkpoints the service verifies,
records and signs as they appear, and whose metrics it streams into the ledger.

Before a (re)start the service picks the checkpoint to resume from: the newest one whose
files match its COMPLETE manifest *and* whose digest matches the ``checkpoint.saved`` event
the service signed when it was written. A checkpoint that fails either check is renamed
``rejected-…`` and a ``checkpoint.rejected`` event says why; the previous one is used.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.jobs.launch import LaunchOptions, failure_message
from appliance.jobs.runner import Job, RunLock
from keys.errors import ApplianceError
from pipeline.config import to_mapping
from pipeline.errors import TrainingError
from pipeline.result import ProgressFn, StageResult
from pipeline.training import ckpt_files as ckpt

# Metrics reach the ledger in batches: one signed event per interval, not one per point.
METRICS_FLUSH_S = 2.0
TRAIN_MODULE = "pipeline.training.job"
FINETUNE_MODULE = "pipeline.finetune.job"
# Where the service marks each checkpoint it has recorded; the job prunes only marked ones.
RECORDS_DIR = "recorded"


class TrainingStopped(ApplianceError):
    """Training was asked to stop (SIGTERM/SIGINT) and saved a checkpoint: the run can be resumed."""

    exit_code = 130


@dataclass(kw_only=True)
class StageContext:
    """What a stage may ask of the service while it runs."""

    run_id: str
    provenance: dict[str, Any]
    # The recipe file's folder: relative paths in a recipe (a DeepSpeed config) start there.
    recipe_dir: Path
    # Append one signed ledger event now (kind, data); the service adds run_id.
    note: Callable[[str, dict[str, Any]], None] = lambda kind, data: None
    # The data of this run's ``checkpoint.saved`` event for a step, if the ledger has one.
    checkpoint_record: Callable[[int], dict[str, Any] | None] = lambda step: None
    launch: LaunchOptions = field(default_factory=LaunchOptions)
    # Where to write the job spec (shared storage, for other nodes); default: the work dir.
    job_file: Path | None = None
    # The run's lock, handed to the job so it stays held while any job process lives.
    lock: RunLock | None = None
    # Tell the run which job is current (so a cancel reaches it), and whether one was asked for.
    set_job: Callable[[Job | None], None] = lambda job: None
    # Who asked the run to stop, once someone has.
    cancelled_by: Callable[[], str | None] = lambda: None
    # Add seconds spent proving the run (hashing a checkpoint) to its provenance cost.
    charge: Callable[[float], None] = lambda seconds: None
    # Environment the job gets on top of the usual (the data keys of the run's sealed inputs).
    env: dict[str, str] = field(default_factory=dict)


def select_resume(work: Path, ctx: StageContext) -> Path | None:
    """The newest checkpoint that verifies against its manifest and the ledger; reject the rest."""

    def signed_by_the_service(info: ckpt.CheckpointInfo) -> None:
        record = ctx.checkpoint_record(info.step)
        if record is None:
            raise TrainingError(
                f"checkpoint {info.path} has no checkpoint.saved record in the ledger", "it was not written by a recorded run; it cannot be trusted"
            )
        if record.get("digest") != ckpt.checkpoint_digest(info):
            raise TrainingError(f"checkpoint {info.path} differs from the digest the ledger recorded for step {info.step}", "it was altered after it was saved")

    info, rejected = ckpt.find_resumable(work, signed_by_the_service)
    for path, reason in rejected:
        ctx.note("checkpoint.rejected", {"step": ckpt.step_of(Path(path.name.removeprefix(ckpt.REJECTED_PREFIX))), "path": str(path), "reason": reason})
    return info.path if info else None


def _deepspeed_config(recipe: Any, ctx: StageContext) -> dict[str, Any] | None:
    dcfg = recipe.distributed
    if dcfg.engine != "deepspeed":
        return None
    from pipeline.training.ds_config import read_json, resolve_deepspeed_config  # lazy: only DeepSpeed runs need it

    path = (ctx.recipe_dir / dcfg.deepspeed_config).resolve()
    device = "cuda" if recipe.train.device != "cpu" and _cuda() else "cpu"
    resolved, notes = resolve_deepspeed_config(read_json(path), recipe.train, ctx.launch.world, device, source=str(path))
    # The exact file and what was made of it (autos filled, substitutions on this device) are
    # part of the run's record: a ZeRO stage changes how the model was trained.
    ctx.note("train.deepspeed_config", {"path": str(path), "sha256": _sha256(path), "resolved": resolved, "notes": notes})
    return resolved


def precheck(recipe: Any, recipe_dir: Path, launch: LaunchOptions) -> None:
    """Fail before a run starts on a DeepSpeed config that training would refuse hours later, on
    an adapter fine-tune asked to run on several processes, or on a Ray cluster that is not there."""
    if getattr(recipe, "finetune", None) is not None:
        from pipeline.finetune.spec import require_one_process

        require_one_process(recipe.finetune.method, recipe.distributed, launch.world)
    if recipe.distributed.engine == "deepspeed":
        _deepspeed_config(recipe, StageContext(run_id="", provenance={}, recipe_dir=recipe_dir, launch=launch))
    if getattr(recipe, "cluster", None) is not None and recipe.cluster.executor == "ray":
        from pipeline.ray_executor import require_cluster

        require_cluster(recipe.cluster)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _sha256(path: Path) -> str:
    from keys.digest import sha256_file

    return sha256_file(path)


def require_validation(recipe: Any, shards: Path) -> None:
    """Refuse a shard set whose val split the run could not measure a loss on, before the job starts.

    In-training validation (at the last step at least) needs one window of ``train.seq_len + 1``
    tokens; the evaluate stage after it one of ``evaluate.seq_len + 1`` (0: ``model.max_seq_len``).
    Without this, an empty or short val split surfaced only after every step was paid for.
    Only the manifest is read: the job verifies every shard before its first step.
    """
    from pipeline.shard_format import read_manifest, require_val_tokens  # lazy: numpy, which a client command never loads

    manifest = read_manifest(shards)
    require_val_tokens(shards, manifest, seq_len=recipe.train.seq_len, source="train.seq_len")
    ecfg = recipe.evaluate
    source = "evaluate.seq_len" if ecfg.seq_len else "model.max_seq_len"
    knob = "evaluate.seq_len (0 uses model.max_seq_len)"
    require_val_tokens(shards, manifest, seq_len=ecfg.seq_len or recipe.model.shape()["max_seq_len"], source=source, knob=knob)


def train_stage(recipe: Any, artifacts: dict[str, Path], work: Path, progress: ProgressFn, ctx: StageContext) -> StageResult:
    """Run (or resume) training as a child job and return what it produced."""
    require_validation(recipe, artifacts["shards"])
    spec = {
        "shards": str(artifacts["shards"]),
        "model": to_mapping(recipe.model),
        "train": to_mapping(recipe.train),
    }
    stats = _run_training_job(TRAIN_MODULE, spec, recipe, work, progress, ctx, stage="train")
    outputs: dict[str, Path] = {"checkpoint": work / "final", "logs": work / "logs"}
    # Intermediate checkpoints that retention kept are provenance too.
    for path in ckpt.list_checkpoints(work):
        outputs[f"checkpoint_{path.name}"] = path
    return StageResult(outputs=outputs, stats=stats)


def finetune_stage(recipe: Any, artifacts: dict[str, Path], work: Path, progress: ProgressFn, ctx: StageContext) -> StageResult:
    """Run (or resume) fine-tuning as a child job, as training runs: its checkpoints recorded as they
    appear, a resume only from one the ledger holds. Full fine-tuning may span processes and nodes."""
    from pipeline.finetune.spec import require_one_process  # torch-free: the service never imports torch

    # An adapter run on several processes is refused before any is started.
    require_one_process(recipe.finetune.method, recipe.distributed, ctx.launch.world)
    spec = {
        "base_json": str(artifacts["base"]),
        "examples": str(artifacts["examples"]),
        "finetune": to_mapping(recipe.finetune),
        "train": to_mapping(recipe.train),
    }
    stats = _run_training_job(FINETUNE_MODULE, spec, recipe, work, progress, ctx, stage="finetune")
    final = work / "final"
    full = recipe.finetune.method == "full"
    marker = final / ("config.json" if full else "adapter_model.safetensors")
    if not marker.is_file():
        raise TrainingError(f"fine-tuning finished without {marker.name} in {final}", "report this: it is a bug in the appliance")
    stats = {k: v for k, v in stats.items() if k not in ("adapter", "checkpoint")}
    return StageResult(outputs={"tuned" if full else "adapter": final}, stats=stats)


def _run_training_job(module: str, body: dict[str, Any], recipe: Any, work: Path, progress: ProgressFn, ctx: StageContext, *, stage: str) -> dict[str, Any]:
    """Launch a training job (``module``: pre-training's or fine-tuning's), follow it to its end, and
    return the stats of its ``finished`` event. A stop raises TrainingStopped, a failure TrainingError."""
    deepspeed = _deepspeed_config(recipe, ctx)
    launch = ctx.launch
    if recipe.distributed.engine in ("fsdp", "deepspeed"):
        launch = LaunchOptions(**{**to_mapping(launch), "force_torchrun": True})
    resume_from = select_resume(work, ctx)
    shutil.rmtree(work / "errors", ignore_errors=True)
    records = work / RECORDS_DIR
    records.mkdir(parents=True, exist_ok=True)
    spec = {
        **body,
        "out_dir": str(work),
        "distributed": to_mapping(recipe.distributed),
        "deepspeed": deepspeed,
        "resume_from": str(resume_from) if resume_from else None,
        "records_dir": str(records),
    }
    job = Job(module, spec, work, launch=launch, spec_file=ctx.job_file, lock=ctx.lock, env=ctx.env)
    follower = _Follower(work, ctx, progress, recipe.train.steps, stage=stage)
    ctx.set_job(job)
    try:
        outcome = job.run(follower)
    finally:
        ctx.set_job(None)
        for refused in job.refusals():  # what the job's egress guard stopped, signed into the ledger
            ctx.note("egress.refused", refused)
    follower.flush()
    finished = outcome.last("finished")
    stopped = outcome.last("stopped")
    if stopped is None and outcome.returncode != 0 and outcome.cancelled:
        # Cancelled before the job could stop on its own (still starting: its signal handler not
        # yet in place): a stop on request all the same, from the last recorded checkpoint.
        raise TrainingStopped(
            f"{'training' if stage == 'train' else 'fine-tuning'} of run {ctx.run_id} was cancelled by {ctx.cancelled_by()} while its job started; "
            "its last recorded checkpoint stays",
            f"continue with `appliance resume {ctx.run_id}`",
        )
    if stopped is None and outcome.returncode != 0:
        raise TrainingError(
            failure_message(work, job.log_file, outcome.returncode),
            f"see {job.log_file}. If the message names a recipe setting, fix it in the recipe and start a new run (`appliance run RECIPE`): "
            f"run {ctx.run_id} keeps the recipe it recorded. Otherwise (a machine fault, a killed process) "
            f"`appliance resume {ctx.run_id}` continues from the last verified checkpoint",
        )
    if finished is None or not finished["stats"].get("completed"):
        step = (finished or {}).get("stats", {}).get("steps") or (stopped or {}).get("step")
        how = f"cancelled by {ctx.cancelled_by()}" if outcome.cancelled else (stopped or {}).get("signal") or "on request"
        raise TrainingStopped(
            f"{'training' if stage == 'train' else 'fine-tuning'} of run {ctx.run_id} stopped at step {step} ({how}); its checkpoint is saved and recorded",
            f"continue with `appliance resume {ctx.run_id}`",
        )
    # Every checkpoint is recorded now: retention may drop what the job had to keep waiting.
    for gone in ckpt.prune(work, recipe.train.keep_last, recipe.train.keep_every, recorded=ckpt.recorded_steps(records)):
        ctx.note("checkpoint.pruned", {"step": gone})
    return dict(finished["stats"])


class _Follower:
    """Turns the job's events into ledger events and progress updates."""

    def __init__(self, work: Path, ctx: StageContext, progress: ProgressFn, steps: int, *, stage: str = "train") -> None:
        self.work, self.ctx, self.progress, self.steps, self.stage = work, ctx, progress, steps, stage
        self.points: list[dict[str, Any]] = []
        self.flushed = time.monotonic()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "started":
            self.steps = int(event.get("steps") or self.steps)
            self.ctx.note("train.started", {k: v for k, v in event.items() if k != "event"})
        elif kind == "metrics":
            points = event.get("points", [])
            self.points.extend(points)
            by_name = {p["name"]: p["value"] for p in points}
            if "loss" in by_name and points:
                fields = {"loss": round(by_name["loss"], 4), "tok/s": round(by_name.get("tokens_per_s", 0))}
                self.progress(int(points[0]["step"]), self.steps, fields)
            if time.monotonic() - self.flushed >= METRICS_FLUSH_S:
                self.flush()
        elif kind == "checkpoint":
            self._checkpoint(event)
        elif kind == "checkpoint_pruned":
            self.ctx.note("checkpoint.pruned", {"step": event["step"]})
        elif kind == "checkpoint_rejected":
            self.ctx.note("checkpoint.rejected", {k: v for k, v in event.items() if k != "event"})
        elif kind == "resumed":
            self.ctx.note("train.resumed", {k: v for k, v in event.items() if k != "event"})

    def _checkpoint(self, event: dict[str, Any]) -> None:
        # The service hashes the files itself: a job cannot misreport its own output.
        clock = time.perf_counter()
        try:
            self._record_checkpoint(event)
        finally:
            self.ctx.charge(time.perf_counter() - clock)

    def _record_checkpoint(self, event: dict[str, Any]) -> None:
        path = Path(event["path"])
        try:
            info = ckpt.verify_checkpoint(path)
            if info.files != event.get("files"):
                raise TrainingError(f"checkpoint {path} holds other files than the job reported", "the checkpoint was changed while it was being recorded")
        except TrainingError as exc:
            self.ctx.note("checkpoint.rejected", {"step": event.get("step"), "path": str(path), "reason": exc.message})
            return
        except OSError as exc:
            self.ctx.note("checkpoint.rejected", {"step": event.get("step"), "path": str(path), "reason": f"unreadable: {exc}"})
            return
        size = sum((path / rel).stat().st_size for rel in info.files)
        self.ctx.note(
            "checkpoint.saved",
            {
                "step": info.step,
                "digest": ckpt.checkpoint_digest(info),
                "manifest_sha256": info.manifest_sha256,
                "path": str(path),
                "files": len(info.files) + 1,
                "size_bytes": size,
            },
        )
        # Only now may the job's retention delete it: the ledger holds its digest.
        ckpt.mark_recorded(self.work / RECORDS_DIR, info.step)

    def flush(self) -> None:
        if self.points:
            self.ctx.note("metrics.recorded", {"stage": self.stage, "points": self.points})
            self.points = []
        self.flushed = time.monotonic()
