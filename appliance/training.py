"""The train stage as the service runs it: a child job whose checkpoints the service verifies,
records and signs as they appear, and whose metrics it streams into the ledger.

Before a (re)start the service picks the checkpoint to resume from: the newest one whose
files match its COMPLETE manifest *and* whose digest matches the ``checkpoint.saved`` event
the service signed when it was written. A checkpoint that fails either check is renamed
``rejected-…`` and a ``checkpoint.rejected`` event says why; the previous one is used.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.launcher import LaunchOptions, require_success, run_job
from keys.errors import ApplianceError
from pipeline.config import to_mapping
from pipeline.errors import TrainingError
from pipeline.result import ProgressFn, StageResult
from pipeline.training import checkpoint as ckpt

# Metrics reach the ledger in batches: one signed event per interval, not one per point.
METRICS_FLUSH_S = 2.0
JOB_SPEC = "job.json"
EVENTS = "events.jsonl"
LAUNCH_LOG = "launcher.log"


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
    """Fail before a run starts on a DeepSpeed config that training would refuse hours later."""
    if recipe.distributed.engine == "deepspeed":
        _deepspeed_config(recipe, StageContext(run_id="", provenance={}, recipe_dir=recipe_dir, launch=launch))


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _sha256(path: Path) -> str:
    from keys.digest import sha256_file

    return sha256_file(path)


def train_stage(recipe: Any, artifacts: dict[str, Path], work: Path, progress: ProgressFn, ctx: StageContext) -> StageResult:
    """Run (or resume) training as a child job and return what it produced."""
    deepspeed = _deepspeed_config(recipe, ctx)
    launch = ctx.launch
    if recipe.distributed.engine in ("fsdp", "deepspeed"):
        launch = LaunchOptions(**{**to_mapping(launch), "force_torchrun": True})
    resume_from = select_resume(work, ctx)
    events_file, log_file = work / EVENTS, work / LAUNCH_LOG
    events_file.unlink(missing_ok=True)
    shutil.rmtree(work / "errors", ignore_errors=True)
    spec = {
        "shards": str(artifacts["shards"]),
        "out_dir": str(work),
        "events": str(events_file),
        "model": to_mapping(recipe.model),
        "train": to_mapping(recipe.train),
        "distributed": to_mapping(recipe.distributed),
        "deepspeed": deepspeed,
        "resume_from": str(resume_from) if resume_from else None,
    }
    spec_file = ctx.job_file or work / JOB_SPEC
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = spec_file.with_name(spec_file.name + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(spec_file)  # workers on other nodes wait for this file: it must appear whole

    follower = _Follower(work, ctx, progress, recipe.train.steps)
    outcome = run_job(spec_file, events_file, log_file, launch, follower)
    follower.flush()
    finished = outcome.last("finished")
    stopped = outcome.last("stopped")
    if stopped is None:
        require_success(work, log_file, outcome)
    if finished is None or not finished["stats"].get("completed"):
        step = (finished or {}).get("stats", {}).get("steps") or (stopped or {}).get("step")
        raise TrainingStopped(
            f"training of run {ctx.run_id} stopped at step {step} ({outcome.cancelled_by or (stopped or {}).get('signal') or 'on request'}); its checkpoint is saved and recorded",
            f"continue with `appliance resume {ctx.run_id}`",
        )
    outputs: dict[str, Path] = {"checkpoint": work / "final", "logs": work / "logs"}
    # Intermediate checkpoints that retention kept are provenance too.
    for path in ckpt.list_checkpoints(work):
        outputs[f"checkpoint_{path.name}"] = path
    return StageResult(outputs=outputs, stats=finished["stats"])


class _Follower:
    """Turns the job's events into ledger events and progress updates."""

    def __init__(self, work: Path, ctx: StageContext, progress: ProgressFn, steps: int) -> None:
        self.work, self.ctx, self.progress, self.steps = work, ctx, progress, steps
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
        path = Path(event["path"])
        try:
            info = ckpt.verify_checkpoint(path)
            if info.files != event.get("files"):
                raise TrainingError(f"checkpoint {path} holds other files than the job reported", "the checkpoint was changed while it was being recorded")
        except TrainingError as exc:
            self.ctx.note("checkpoint.rejected", {"step": event.get("step"), "path": str(path), "reason": exc.message})
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

    def flush(self) -> None:
        if self.points:
            self.ctx.note("metrics.recorded", {"stage": "train", "points": self.points})
            self.points = []
        self.flushed = time.monotonic()
