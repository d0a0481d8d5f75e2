"""Helpers for tests that run a data stage as the service does: a stage job from a spec file."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.test_curate import prose, write_raw

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("dataset.parquet", "curation.json", "dropped.parquet")


def raw_corpus(path: Path, docs: int, seed: int = 1) -> Path:
    """A raw.parquet of ``docs`` prose documents (curation keeps them all): docs / 256 batches."""
    rng = random.Random(seed)
    return write_raw(path, [(f"s{i % 5}/f{i}.txt", prose(rng, 12)) for i in range(docs)])


def write_spec(folder: Path, name: str, raw: Path, recipe: str, work: Path | None = None) -> Path:
    """The spec of a curation stage job, as the service writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "op": "stage",
        "stage": "curate",
        "recipe_text": '[recipe]\nname = "t"\n' + recipe,
        "recipe_source": f"{name}.toml",
        "artifacts": {"raw": str(raw)},
        "source": str(folder),
        "work": str(work or folder / name),
        "events": str(folder / f"{name}.events.jsonl"),
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def job_command(spec: Path, prefix: list[str] | None = None) -> list[str]:
    # Behind the egress guard, as the service starts every job.
    return [*(prefix or []), sys.executable, "-m", "airgap.run", "appliance.jobs.stage_job", str(spec)]


def job_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}


def events(spec: Path) -> list[dict[str, Any]]:
    path = Path(json.loads(spec.read_text())["events"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_job(spec: Path, prefix: list[str] | None = None, timeout: float = 300) -> tuple[dict[str, Any], float]:
    """Run the job to its end; its ``tasks`` event and the wall time. Fails the test on an error."""
    Path(json.loads(spec.read_text())["events"]).unlink(missing_ok=True)
    start = time.perf_counter()
    done = subprocess.run(job_command(spec, prefix), cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    evs = events(spec)
    if done.returncode != 0:
        raise AssertionError(f"stage job failed ({done.returncode}): {evs[-1:]}\n{done.stderr[-3000:]}")
    return next(e for e in evs if e["event"] == "tasks"), wall


def journal_entries(work: Path) -> list[Path]:
    return sorted((work / "task-journal").rglob("*.task"))


def kill_mid_stage(spec: Path, at_least: int, prefix: list[str] | None = None, timeout: float = 300) -> int:
    """Start the job, SIGKILL it once ``at_least`` batches are journaled; how many were."""
    work = Path(json.loads(spec.read_text())["work"])
    proc = subprocess.Popen(job_command(spec, prefix), cwd=ROOT, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while len(journal_entries(work)) < at_least:
            if proc.poll() is not None:
                raise AssertionError(f"the stage job ended ({proc.returncode}) before {at_least} batches were journaled")
            if time.monotonic() > deadline:
                raise AssertionError("the stage job journaled too few batches in time")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return len(journal_entries(work))


def digests(work: Path) -> dict[str, str]:
    return {name: hashlib.sha256((work / name).read_bytes()).hexdigest() for name in OUTPUTS}
