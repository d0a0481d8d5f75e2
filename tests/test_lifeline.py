"""Jobs die with their parent: a stage job's pool workers, and the training job, leave no orphans.

Each test starts a real process tree, kills one link of it with SIGKILL (which no handler can
catch, so nothing gets to clean up), and polls /proc until the processes below it are gone.
The waits are bounded hang guards, never timing assertions; a process that survives is
killed at the end by its recorded pid (and start time, so a reused pid is never hit).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.lifeline import ENV_PARENT
from tests.dist_helpers import env, events_path, job_cmd, read_events, write_spec
from tests.training_fixtures import shards_dir, tiny_model, tiny_train, tokenizer_path  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

ROOT = Path(__file__).resolve().parents[1]
# Generous: the kernel delivers the death signal at once; this only guards against a hang.
HANG_GUARD_S = 60.0


def _started(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), or None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # fields[0] is the state (the 3rd field); an unreaped zombie is dead, whoever its parent is.
    return None if fields[0] in ("Z", "X") else fields[19]


def wait_until(condition: Callable[[], bool], what: str, limit_s: float = HANG_GUARD_S) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {limit_s:.0f} s for {what}")
        time.sleep(0.05)


class Survivors:
    """Processes a test started, by pid and start time: what is still alive, and a last-resort kill."""

    def __init__(self) -> None:
        self.procs: dict[int, str] = {}

    def add(self, pid: int) -> None:
        started = _started(pid)
        if started is not None:
            self.procs[pid] = started

    def alive(self) -> list[int]:
        return [pid for pid, started in self.procs.items() if _started(pid) == started]

    def kill(self) -> None:
        for pid in self.alive():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def survivors() -> Iterator[Survivors]:
    s = Survivors()
    yield s
    s.kill()


# Stands in for a data stage job: a pool of workers (pipeline.parallel, as curate and shard use
# it) busy with batches that take far longer than the test. A script file, so that the spawned
# workers import its functions from it (and nothing heavier).
POOL_JOB = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from pipeline.parallel import ordered_map

    STATE = []

    def busy_batch(pids):
        # Announce this worker, then work (sleep) for ten minutes.
        (pids / str(os.getpid())).touch()
        time.sleep(600)

    def set_state(value):
        STATE.append(value)

    def initialised(item):
        return STATE[0]

    if __name__ == "__main__":
        if sys.argv[1] == "busy":
            for _ in ordered_map(busy_batch, [Path(sys.argv[2])] * 6, workers=3):
                pass
        else:
            print(sorted(set(ordered_map(initialised, range(8), workers=2, initializer=set_state, initargs=("ready",)))))
    """
)


def pool_job(tmp_path: Path) -> Path:
    script = tmp_path / "pool_job.py"
    script.write_text(POOL_JOB)
    return script


def test_pool_workers_die_with_a_killed_stage_job(tmp_path: Path, survivors: Survivors) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    job = subprocess.Popen([sys.executable, str(pool_job(tmp_path)), "busy", str(pids)], cwd=ROOT, env=env())
    survivors.add(job.pid)
    try:
        wait_until(lambda: len(list(pids.iterdir())) == 3 or job.poll() is not None, "three busy workers")
        assert job.poll() is None, f"the pool job exited with {job.returncode}"
        workers = [int(p.name) for p in pids.iterdir()]
        for pid in workers:
            survivors.add(pid)
            assert Path(f"/proc/{pid}/status").read_text().count(f"PPid:\t{job.pid}\n") == 1  # the job's own workers
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        wait_until(lambda: not [pid for pid in workers if pid in survivors.alive()], f"workers {workers} to die with their job")
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def test_the_pool_still_runs_the_stage_initializer(tmp_path: Path) -> None:
    # The stage's own initializer runs in every worker after the lifeline (curate builds its filters there).
    out = subprocess.run(
        [sys.executable, str(pool_job(tmp_path)), "init"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=HANG_GUARD_S, check=True
    )
    assert out.stdout.strip() == "['ready']"


# Stands in for the service: starts the training job as a child (no preexec: the job must arm
# itself), names itself in APPLIANCE_JOB_PARENT as the service does, and waits.
SERVICE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    spec, pid_file = sys.argv[1], sys.argv[2]
    job = subprocess.Popen([sys.executable, "-m", "pipeline.training.job", spec], env={**os.environ, "APPLIANCE_JOB_PARENT": str(os.getpid())})
    with open(pid_file, "w") as f:
        f.write(str(job.pid))
    time.sleep(600)
    """
)


def test_training_job_dies_with_a_killed_service(shards_dir: Path, tmp_path: Path, survivors: Survivors) -> None:  # noqa: F811
    # Far more steps than the test waits for: only the parent's death can end this job in time.
    spec = write_spec(tmp_path / "job.json", shards=shards_dir, out_dir=tmp_path / "out", model=tiny_model(), train=tiny_train(steps=1_000_000, num_threads=1))
    pid_file = tmp_path / "job.pid"
    service = subprocess.Popen([sys.executable, "-c", SERVICE, str(spec), str(pid_file)], cwd=ROOT, env=env())
    survivors.add(service.pid)
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", "the job to start")
        job = int(pid_file.read_text())
        survivors.add(job)
        # Killed while it trains, past the start-up: the armed signal, not the start-up check, ends it.
        wait_until(lambda: any(e["event"] == "metrics" for e in read_events(spec)) or job not in survivors.alive(), "the job's first step")
        assert job in survivors.alive(), f"the job ended before the kill: {read_events(spec)}"
        os.kill(service.pid, signal.SIGKILL)
        service.wait()
        wait_until(lambda: job not in survivors.alive(), f"the training job {job} to die with its service")
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    assert not (tmp_path / "out" / "final").exists()


def test_a_job_whose_service_is_already_gone_does_not_start(tmp_path: Path) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"shards": "s", "out_dir": str(tmp_path / "out"), "events": str(events_path(spec))}))
    # Its parent is this test, not the (dead or foreign) process the variable names: it exits at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    gone = subprocess.run(job_cmd(spec), cwd=ROOT, env={**env(), ENV_PARENT: dead.stdout.strip()}, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert gone.returncode == 1 and not events_path(spec).exists() and not (tmp_path / "out").exists()


def test_a_torchrun_rank_follows_torchrun_not_the_service(tmp_path: Path) -> None:
    # Under torchrun the service's variable is inherited, but the rank's parent is torchrun:
    # it must go on (here to refuse a missing spec, exit 2) rather than take the service for dead.
    spec = tmp_path / "missing.json"
    rank_env = {**env(), ENV_PARENT: "1", "TORCHELASTIC_RUN_ID": "test"}
    out = subprocess.run(job_cmd(spec), cwd=ROOT, env=rank_env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 2 and "cannot read job spec" in out.stderr
