"""Checkpoint directories as files: names, COMPLETE manifests, verification, digests, retention.

Everything here reads and writes files only, and imports no torch, so the service (which
never imports torch) verifies, records and prunes checkpoints with the very code the job
uses to write them. ``checkpoint.py`` adds the collective save on top and re-exports these
names. The layout of one checkpoint is described there.

Retention and the service's records
-----------------------------------
The job deletes old checkpoints after each save (``keep_last`` / ``keep_every``). The
service, a separate process, hashes and records each checkpoint in its ledger when it sees
the job's ``checkpoint`` event; a checkpoint must never be deleted before that, or the ledger
would hold records of checkpoints nobody can resume from, and none of those that exist.
So when the job is given a records folder, the service writes an empty marker file
``record_marker(records_dir, step)`` (``<records_dir>/step_000200``, the checkpoint's own
directory name) with ``mark_recorded`` *after* the ledger holds the record, and the job
prunes only checkpoints that have a marker: ``prune(..., recorded=recorded_steps(records_dir))``.
Unrecorded checkpoints are kept and do not count towards ``keep_last``, so the newest
``keep_last`` *recorded* checkpoints always survive, whatever happened to the service. After
the job ends the service calls ``prune`` itself with the steps its ledger holds.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from keys.digest import dir_manifest, manifest_text, sha256_bytes, sha256_file
from keys.files import atomic_write_text, fsync_path, publish_dir
from pipeline.errors import TrainingError

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
    "prune",
    "prunable",
    "record_marker",
    "recorded_steps",
    "retained",
    "seal_checkpoint",
    "step_name",
    "step_of",
    "verify_checkpoint",
]

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
    """The directory name of the checkpoint of ``step`` (``step_000200``), also its record marker's name."""
    return f"step_{step:06d}"


def step_of(path: Path | str) -> int | None:
    """The step a ``step_NNNNNN`` name stands for, or None for any other name."""
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Finished-looking step directories, oldest first (numeric order, so step 1000000 sorts last)."""
    root = Path(out_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]


def hash_files(root: Path, files: list[Path]) -> dict[str, str]:
    """relative path -> sha256 of files a rank wrote below ``root``, each fsynced first."""
    out = {}
    for f in files:
        fsync_path(f)
        out[Path(f).relative_to(root).as_posix()] = sha256_file(f)
    return out


def seal_checkpoint(tmp: Path, final: Path, step: int, files: dict[str, str]) -> CheckpointInfo:
    """Write the COMPLETE manifest of ``files`` into ``tmp``, fsync it all and rename it to ``final``."""
    body = "".join(f"{files[rel]}  {rel}\n" for rel in sorted(files, key=lambda r: r.encode("utf-8")))
    atomic_write_text(tmp / COMPLETE, body, mode=0o644)  # last: without it the directory is never resumed from
    # replace: a re-run that reached the same step again (after a crash past this save).
    publish_dir(tmp, final, replace=True)
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


# -- retention ---------------------------------------------------------------------------------


def retained(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """Which of ``steps`` retention keeps: the newest keep_last, plus multiples of keep_every."""
    keep = set(sorted(steps)[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def prunable(steps: Collection[int], keep_last: int, keep_every: int, recorded: Collection[int] | None = None) -> list[int]:
    """The retention decision: which of ``steps`` may be deleted, oldest first.

    ``recorded`` None: every step retention does not keep. Otherwise only recorded steps are
    candidates, and retention is applied among them: the newest ``keep_last`` recorded steps
    and the recorded multiples of ``keep_every`` stay, and so does every unrecorded step.
    """
    candidates = sorted(steps) if recorded is None else sorted(set(steps) & set(recorded))
    keep = retained(candidates, keep_last, keep_every)
    return [s for s in candidates if s not in keep]


def prune(out_dir: Path, keep_last: int, keep_every: int, recorded: Collection[int] | None = None) -> list[int]:
    """Delete the checkpoints ``prunable`` allows; returns the deleted steps.

    The job passes ``recorded=recorded_steps(records_dir)`` when the service keeps records;
    the service passes the steps its ledger holds once the job has ended.
    """
    paths = {step: p for p in list_checkpoints(out_dir) if (step := step_of(p)) is not None}
    gone = []
    for step in prunable(list(paths), keep_last, keep_every, recorded):
        shutil.rmtree(paths[step])
        gone.append(step)
    return gone


def record_marker(records_dir: Path | str, step: int) -> Path:
    """The marker that says the service has recorded the checkpoint of ``step``: ``<records_dir>/step_000200``."""
    return Path(records_dir) / step_name(step)


def mark_recorded(records_dir: Path | str, step: int) -> Path:
    """Create the (empty) marker for ``step``; the service calls this only after its ledger holds the record.

    Not fsynced: a marker lost in a crash only keeps a checkpoint longer than needed.
    """
    marker = record_marker(records_dir, step)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return marker


def forget_record(records_dir: Path | str, step: int) -> None:
    """Remove the marker for ``step``: the job calls it before saving that step again, since the
    record describes a checkpoint the new save replaces."""
    record_marker(records_dir, step).unlink(missing_ok=True)


def recorded_steps(records_dir: Path | str) -> set[int]:
    """The steps whose markers are in ``records_dir`` (empty when the folder does not exist yet)."""
    try:
        names = os.listdir(records_dir)
    except FileNotFoundError:
        return set()
    return {step for name in names if (step := step_of(name)) is not None}


def clear_stale(out_dir: Path) -> None:
    """Remove ``.tmp-`` directories half-written by a killed run; they are never resumed from."""
    for base in (Path(out_dir), Path(out_dir) / CKPT_DIR):
        if base.is_dir():
            for stale in base.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
