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
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keys.digest import dir_manifest, manifest_text, sha256_bytes, sha256_file
from pipeline.errors import TrainingError
from pipeline.training import dist
from pipeline.training.dist import DistContext

CKPT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
STATE_DIR = "state"
RNG_DIR = "rng"
TRAINER_JSON = "trainer.json"
REJECTED_PREFIX = "rejected-"
_STEP = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    # relative path -> sha256 of every file except COMPLETE
    files: dict[str, str]
    # sha256 of the COMPLETE file's bytes
    manifest_sha256: str


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int | None:
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Finished-looking step directories, oldest first (numeric order, so step 1000000 sorts last)."""
    root = Path(out_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]


def fsync_path(path: Path) -> None:
    """fsync a file or directory, so a rename that follows cannot expose unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_files(root: Path, files: list[Path]) -> dict[str, str]:
    """relative path -> sha256 of files a rank wrote below ``root``, each fsynced first."""
    out = {}
    for f in files:
        fsync_path(f)
        out[Path(f).relative_to(root).as_posix()] = sha256_file(f)
    return out


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
            info = _finish(tmp, final, step, files)
        except (OSError, TrainingError) as exc:
            error = exc.diagnostics() if isinstance(exc, TrainingError) else f"could not finish checkpoint {final}: {exc}"
    error = dist.broadcast_object(ctx, error if ctx.is_main else None)
    if error:
        raise TrainingError(error, f"the previous checkpoint under {root} is intact; fix the cause and run again to resume")
    return info


def _finish(tmp: Path, final: Path, step: int, files: dict[str, str]) -> CheckpointInfo:
    body = "".join(f"{files[rel]}  {rel}\n" for rel in sorted(files, key=lambda r: r.encode("utf-8")))
    marker = tmp / COMPLETE
    with open(marker, "w", encoding="utf-8") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted({(tmp / rel).parent for rel in files} | {tmp}):
        fsync_path(d)
    if final.exists():
        # A re-run that reached the same step again (after a crash past this save): replace it.
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_path(final.parent)
    return CheckpointInfo(path=final, step=step, files=files, manifest_sha256=sha256_bytes(body.encode("utf-8")))


def verify_checkpoint(path: Path) -> CheckpointInfo:
    """Check a checkpoint against its COMPLETE manifest; raise TrainingError naming what differs."""
    path = Path(path)
    marker = path / COMPLETE
    step = step_of(path)
    if step is None:
        raise TrainingError(f"{path} is not a checkpoint directory (step_NNNNNN)", f"point at a directory under {CKPT_DIR}/")
    try:
        body = marker.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingError(f"checkpoint {path} is incomplete: it has no {COMPLETE} marker", "resume from an earlier checkpoint") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"checkpoint {path}: cannot read {COMPLETE} ({exc})", "resume from an earlier checkpoint") from None
    expected: dict[str, str] = {}
    for n, line in enumerate(body.splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise TrainingError(f"checkpoint {path}: line {n} of {COMPLETE} is malformed", "resume from an earlier checkpoint")
        expected[rel] = digest
    actual = {rel: digest for rel, digest, _ in dir_manifest(path) if rel != COMPLETE}
    for rel, digest in expected.items():
        if rel not in actual:
            raise TrainingError(f"checkpoint {path}: {rel} is missing", "resume from an earlier checkpoint")
        if actual[rel] != digest:
            raise TrainingError(f"checkpoint {path}: {rel} does not match its recorded sha256 (corrupted or altered)", "resume from an earlier checkpoint")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise TrainingError(f"checkpoint {path}: {extra[0]} is not in its {COMPLETE} manifest (added after the save)", "resume from an earlier checkpoint")
    return CheckpointInfo(path=path, step=step, files=expected, manifest_sha256=sha256_bytes(body.encode("utf-8")))


def checkpoint_digest(info: CheckpointInfo) -> str:
    """The digest the store gives the directory: sha256 of its sha256sum-format manifest, COMPLETE included."""
    entries = [(rel, d, 0) for rel, d in info.files.items()] + [(COMPLETE, info.manifest_sha256, 0)]
    entries.sort(key=lambda e: e[0].encode("utf-8"))
    return sha256_bytes(manifest_text(entries).encode("utf-8"))


def find_resumable(out_dir: Path, extra_check: Callable[[CheckpointInfo], None] | None = None) -> tuple[CheckpointInfo | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies (and passes ``extra_check``), and every newer one rejected with why.

    Rejected directories are renamed ``rejected-step_…`` so they are kept for inspection but
    never chosen again (nor pruned as if they were good).
    """
    rejected: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(out_dir)):
        try:
            info = verify_checkpoint(path)
            if extra_check is not None:
                extra_check(info)
            return info, rejected
        except TrainingError as exc:
            target = path.with_name(REJECTED_PREFIX + path.name)
            shutil.rmtree(target, ignore_errors=True)
            path.rename(target)
            rejected.append((target, exc.message))
    return None, rejected


def retained(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """Which of ``steps`` retention keeps: the newest keep_last, plus multiples of keep_every."""
    keep = set(sorted(steps)[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def prune(out_dir: Path, keep_last: int, keep_every: int) -> list[int]:
    """Delete checkpoints retention does not keep; returns the deleted steps."""
    paths = {step_of(p): p for p in list_checkpoints(out_dir)}
    keep = retained([s for s in paths if s is not None], keep_last, keep_every)
    gone = []
    for step, path in sorted(paths.items()):
        if step is not None and step not in keep:
            shutil.rmtree(path)
            gone.append(step)
    return gone


def clear_stale(out_dir: Path) -> None:
    """Remove ``.tmp-`` directories half-written by a killed run; they are never resumed from."""
    for base in (Path(out_dir), Path(out_dir) / CKPT_DIR):
        if base.is_dir():
            for stale in base.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
