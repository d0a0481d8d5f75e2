"""Atomic, verifiable, re-shardable checkpoints with retention.

A checkpoint is a directory ``checkpoints/step_000200/``::

    model.safetensors, model_config.json, train_config.json   full HF-named weights (rank 0):
                                                              evaluate, package and generate read these
    state/            the engine's resumable model + optimizer state (torch.distributed.checkpoint
                      files for the native engines, so N ranks can resume on M; DeepSpeed's own)
    rng/rank_N.pt     each rank's torch / numpy / python (/ CUDA) RNG states
    trainer.json      step, data position, tokens seen, recent losses, world size, engine
    COMPLETE          sha256sum-format manifest of every other file, written last

Saving is collective: every rank writes its files into ``.tmp-step_…``, hashes them and
sends the digests to rank 0, which writes its own files and the COMPLETE marker, fsyncs
everything and renames the directory into place. A crash at any moment leaves either the
previous checkpoints untouched or a ``.tmp-`` directory that is never resumed from. A
checkpoint whose files do not match its COMPLETE manifest is rejected on resume, and the
previous one is used instead.

Only the collective save lives here (it needs torch.distributed); everything that deals with
the files alone (names, manifests, verification, digests, retention, the service's record
markers) is in the torch-free ``ckpt_files`` and re-exported from here.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import TrainingError
from pipeline.training import dist
from pipeline.training.ckpt_files import (
    CKPT_DIR,
    COMPLETE,
    REJECTED_PREFIX,
    RNG_DIR,
    STATE_DIR,
    TRAINER_JSON,
    CheckpointInfo,
    checkpoint_digest,
    clear_stale,
    find_resumable,
    forget_record,
    hash_files,
    list_checkpoints,
    mark_recorded,
    prunable,
    prune,
    record_marker,
    recorded_steps,
    retained,
    seal_checkpoint,
    step_name,
    step_of,
    verify_checkpoint,
)
from pipeline.training.dist import DistContext

__all__ = [
    "CKPT_DIR",
    "COMPLETE",
    "REJECTED_PREFIX",
    "RNG_DIR",
    "STATE_DIR",
    "TRAINER_JSON",
    "CheckpointInfo",
    "checkpoint_digest",
    "clear_stale",
    "find_resumable",
    "forget_record",
    "hash_files",
    "list_checkpoints",
    "mark_recorded",
    "prunable",
    "prune",
    "record_marker",
    "recorded_steps",
    "retained",
    "save_checkpoint",
    "seal_checkpoint",
    "step_name",
    "step_of",
    "verify_checkpoint",
]


def save_and_prune(
    ctx: DistContext,
    out_dir: Path,
    step: int,
    *,
    write_rank_files: Callable[[Path], list[Path]],
    write_main_files: Callable[[Path], list[Path]],
    keep_last: int,
    keep_every: int,
    records_dir: Path | None,
    emit: Callable[[dict[str, Any]], None],
) -> Path | None:
    """Save a checkpoint, report it, and apply retention: what every training loop does at a save.

    With a service watching (``records_dir``), only what it has recorded may go: the others
    wait for a later save. Returns the checkpoint's path on rank 0, None elsewhere.
    """
    info = save_checkpoint(ctx, out_dir, step, write_rank_files=write_rank_files, write_main_files=write_main_files)
    if info is None:
        return None
    emit({"event": "checkpoint", "step": step, "path": str(info.path), "files": info.files, "manifest_sha256": info.manifest_sha256})
    recorded = recorded_steps(records_dir) if records_dir is not None else None
    for gone in prune(out_dir, keep_last, keep_every, recorded):
        emit({"event": "checkpoint_pruned", "step": gone})
    return info.path


def save_checkpoint(
    ctx: DistContext,
    out_dir: Path,
    step: int,
    *,
    write_rank_files: Callable[[Path], list[Path]],
    write_main_files: Callable[[Path], list[Path]],
) -> CheckpointInfo | None:
    """Write one checkpoint atomically (collective). Rank 0 returns its CheckpointInfo, others None.

    ``write_rank_files(tmp)`` runs on every rank and returns the files it wrote;
    ``write_main_files(tmp)`` runs on rank 0 only (full weights, configs, trainer state).
    """
    root = Path(out_dir) / CKPT_DIR
    final = root / step_name(step)
    tmp = root / f".tmp-{final.name}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier(ctx)
    error: str | None = None
    hashes: dict[str, str] = {}
    try:
        hashes = hash_files(tmp, write_rank_files(tmp))
    except (OSError, RuntimeError) as exc:
        # Caught on this rank so it still joins the gather below: a rank that skipped it would
        # leave the others waiting until the process-group timeout.
        error = f"rank {ctx.rank} could not write its part of {final}: {exc}"
    gathered = dist.gather_objects(ctx, (error, hashes))
    info: CheckpointInfo | None = None
    if ctx.is_main:
        gathered = gathered or []  # rank 0 always receives the list
        errors = [e for e, _ in gathered if e]
        try:
            if errors:
                raise TrainingError(errors[0], f"check free space and permissions under {root}")
            files: dict[str, str] = {}
            for _, h in gathered:
                files.update(h)
            files.update(hash_files(tmp, write_main_files(tmp)))
            for rel in files:
                if not (tmp / rel).is_file():
                    raise TrainingError(
                        f"{tmp / rel}, written by another rank, is not visible on rank 0",
                        "put the run's output directory on storage shared by every node",
                    )
            info = seal_checkpoint(tmp, final, step, files)
        except (OSError, TrainingError) as exc:
            error = exc.diagnostics() if isinstance(exc, TrainingError) else f"could not finish checkpoint {final}: {exc}"
    error = dist.broadcast_object(ctx, error if ctx.is_main else None)
    if error:
        raise TrainingError(error, f"the previous checkpoint under {root} is intact; fix the cause and run again to resume")
    return info
