"""What every stage returns: the files it produced and its statistics.

Stages are pure: paths and a typed config in, files out. They do not compute the digests
that the provenance record relies on — the service hashes what it imports into the store,
so a stage cannot misreport its own output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keys.files import atomic_write_json

# progress(done, total, fields): a stage calls it as work advances; total may be 0 if unknown.
ProgressFn = Callable[[int, int, dict[str, Any]], None]


def no_progress(done: int, total: int, fields: dict[str, Any]) -> None:
    """The default progress sink: ignore."""


@dataclass(kw_only=True)
class StageResult:
    # name -> file or directory the stage wrote (inside its work directory).
    outputs: dict[str, Path]
    # JSON-able figures for the ledger and the run summary (counts, losses, timings).
    stats: dict[str, Any] = field(default_factory=dict)
    # Time series (e.g. the loss curve): dicts with at least "step", "name", "value".
    metrics: list[dict[str, Any]] = field(default_factory=list)
    # Source files read from outside the work tree, for the ledger: path, sha256, bytes.
    inputs: list[dict[str, Any]] = field(default_factory=list)
    # What the stage could not use and why, one dict per affected source file (see
    # ``pipeline.ingest``): the service records each one in the ledger, so nothing is lost silently.
    skipped: list[dict[str, Any]] = field(default_factory=list)


def write_json(path: Path, obj: Any, *, ensure_ascii: bool = False) -> Path:
    """A stage's JSON file, stable (sorted keys, fixed indent): equal content, equal bytes, equal digest.

    Written atomically (``keys.files``), mode 0644: the service and other tools read stage outputs.
    """
    atomic_write_json(path, obj, mode=0o644, indent=2, ensure_ascii=ensure_ascii)
    return path
