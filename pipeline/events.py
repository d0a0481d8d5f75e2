"""The events a job reports to the service: one module for both sides.

A job (a stage child process, or rank 0 of a training job) appends one JSON object per line
to its events file; the service tails that file. A file rather than a pipe, because under
torchrun on several nodes only a file on shared storage reaches the head node whole, and
because a file survives the service: a restarted service can read what a job said.

Every event is ``{"event": KIND, ...fields}``. ``KINDS`` names the fields each kind must
carry; `decode` drops lines that are torn (a job killed mid-write) or malformed, so a
broken job can never crash the service that follows it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# kind -> fields it must carry. Extra fields are allowed (and recorded where useful).
KINDS: dict[str, tuple[str, ...]] = {
    # any job
    "progress": ("done", "total"),  # + "fields": {name: value} shown beside the bar
    "result": ("outputs", "stats"),  # a data stage's StageResult (+ metrics, inputs, skipped)
    "error": ("message",),  # the job failed; message is what a person reads
    "stopped": (),  # the job stopped on request (SIGTERM) and left a resumable state
    "tasks": ("computed", "reused"),  # a data stage's batches: computed now, read back from its task journal
    # training (rank 0)
    "started": (),
    "metrics": ("points",),
    "checkpoint": ("step", "path", "files"),
    "checkpoint_pruned": ("step",),
    "checkpoint_rejected": ("reason",),
    "resumed": ("step",),
    "finished": ("stats",),
    # generation
    "generated": ("results",),
}


class EventError(ValueError):
    """An event that does not match ``KINDS`` (a bug in the job that wrote it)."""


def check(event: dict[str, Any]) -> dict[str, Any]:
    """Return ``event`` if it is a known kind with its required fields, else raise EventError."""
    kind = event.get("event")
    if kind not in KINDS:
        raise EventError(f"unknown job event kind {kind!r}")
    missing = [f for f in KINDS[kind] if f not in event]
    if missing:
        raise EventError(f"job event {kind!r} lacks {', '.join(missing)}")
    return event


def encode(event: dict[str, Any]) -> bytes:
    """One checked event as one line of JSON."""
    return (json.dumps(check(event), default=str, separators=(",", ":")) + "\n").encode("utf-8")


def decode(line: bytes) -> dict[str, Any] | None:
    """The event on one line, or None for a torn or malformed line."""
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict):
        return None
    try:
        return check(event)
    except EventError:
        return None


class EventWriter:
    """Appends events to a job's events file (only the reporting process writes)."""

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        data = encode(event)
        # O_APPEND: one write per event, so a reader never sees two events interleaved.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


class EventTail:
    """Reads the whole new lines appended to an events file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = Path(path), 0, b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        return [e for e in (decode(line) for line in lines if line.strip()) if e is not None]
