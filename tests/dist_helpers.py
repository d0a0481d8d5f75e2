"""Launching the training job as the service does: ``python -m pipeline.training.job SPEC``,
alone or under torchrun, on loopback only.

Every launch runs with ``OMP_NUM_THREADS=1`` (two ranks on two shared cores must not fight over
threads), gloo bound to ``lo``, and a timeout, so a hang fails the test instead of blocking CI.

``python -m tests.dist_helpers SPEC OUT`` runs the same job and afterwards writes what this rank
holds in memory (its parameters and Adam moments; shards under FSDP) to ``OUT/rank_N.pt``: the
only way to see that the ranks, and not just rank 0's files, agree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.model import ModelConfig
from pipeline.training.config import DistConfig, TrainConfig

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
# A launch is a few seconds here; this only has to be long enough not to cut a slow CI host short.
LAUNCH_TIMEOUT_S = 300


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def write_spec(
    path: Path,
    *,
    shards: Path,
    out_dir: Path,
    model: ModelConfig,
    train: TrainConfig,
    distributed: DistConfig | None = None,
    stop_at_step: int | None = None,
    resume_from: Path | None = None,
) -> Path:
    """A job spec as the service writes it; events go to ``out_dir/../<spec stem>.events.jsonl``."""
    path = Path(path)
    body: dict[str, Any] = {
        "shards": str(shards),
        "out_dir": str(out_dir),
        "events": str(events_path(path)),
        "model": dataclasses.asdict(model),
        "train": dataclasses.asdict(train),
        "distributed": dataclasses.asdict(distributed or DistConfig()),
        "stop_at_step": stop_at_step,
        "resume_from": str(resume_from) if resume_from else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2), encoding="utf-8")
    return path


def events_path(spec: Path) -> Path:
    return Path(spec).with_suffix(".events.jsonl")


def read_events(spec: Path) -> list[dict[str, Any]]:
    """The events rank 0 wrote so far (a line still being written is left for the next read)."""
    path = events_path(spec)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH", "")) if p),
        # gloo picks its address from the host name otherwise; keep every byte on loopback.
        GLOO_SOCKET_IFNAME="lo",
    )
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        e.pop(var, None)  # a test run under a launcher must not leak its own rank into the job
    return e


def job_cmd(spec: Path, module: str = "pipeline.training.job", extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", module, str(spec), *(extra or [])]


def torchrun_cmd(
    spec: Path,
    *,
    nproc: int,
    module: str = "pipeline.training.job",
    extra: list[str] | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
    port: int | None = None,
) -> list[str]:
    """torchrun on one node (``--standalone``), or one node of a static-rendezvous job on loopback."""
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--monitor-interval=0.2"]
    if nnodes == 1:
        base += ["--standalone"]
    else:
        if port is None:
            raise ValueError("a multi-node launch needs the rendezvous port")
        base += [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=static",
            f"--master-addr={LOOPBACK}",
            f"--master-port={port}",
            f"--local-addr={LOOPBACK}",
        ]
    return [*base, "-m", module, str(spec), *(extra or [])]


def run(cmd: list[str], *, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run to the end; a timeout kills the whole process group (torchrun and its workers)."""
    proc = start(cmd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s\n--- stdout\n{out}\n--- stderr\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def start(cmd: list[str]) -> subprocess.Popen[str]:
    # Its own session, so kill_group reaches the workers of a torchrun we started and nothing else.
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the process group of a process this test started (its session leader)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def check(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(result.args)} exited {result.returncode}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def wait_for(spec: Path, proc: subprocess.Popen[str], predicate: Callable[[dict[str, Any]], bool], *, timeout: float = LAUNCH_TIMEOUT_S) -> dict[str, Any]:
    """Poll the events file until an event satisfies ``predicate``; fail if the job ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in read_events(spec):
            if predicate(event):
                return event
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the job exited {proc.returncode} before the awaited event\n{err[-4000:]}")
        time.sleep(0.01)
    kill_group(proc)
    raise AssertionError(f"no awaited event within {timeout} s")


def metrics_at_or_after(step: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == "metrics" and any(p["step"] >= step for p in e["points"])


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, from /proc (Linux)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def worker_pid(launcher_pid: int, rank: int, *, timeout: float = 60) -> int:
    """The pid of the worker with RANK=rank under a torchrun we launched."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(launcher_pid):
            if env_of(pid).get("RANK") == str(rank):
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


def loss_curve(events: list[dict[str, Any]]) -> dict[int, float]:
    return {p["step"]: p["value"] for e in events if e.get("event") == "metrics" for p in e["points"] if p["name"] == "loss"}


def load_rank_state(directory: Path, rank: int) -> dict[str, dict[str, Any]]:
    return torch.load(Path(directory) / f"rank_{rank}.pt", weights_only=True)


def _capture_main(argv: list[str]) -> int:
    """Run the job, keeping a reference to the engine it builds, then dump this rank's tensors."""
    from pipeline.training import engine_native, job

    spec, out = argv
    built: list[Any] = []
    build = engine_native.build_native_engine

    def remember(*args: Any, **kwargs: Any) -> Any:
        engine = build(*args, **kwargs)
        built.append(engine)
        return engine

    # The loop imports the builder when it needs it, so replacing the module attribute suffices;
    # the engine itself is the real one.
    engine_native.build_native_engine = remember
    code = job.main([spec])
    if code == 0 and built:
        engine = built[-1]

        def local(t: torch.Tensor) -> torch.Tensor:
            return (t.to_local() if hasattr(t, "to_local") else t).detach().cpu().clone()

        params = {name: local(p) for name, p in engine.model.named_parameters()}
        optim = {
            name: {k: local(v) for k, v in engine.optimizer.state[p].items() if isinstance(v, torch.Tensor)} for name, p in engine.model.named_parameters()
        }
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save({"params": params, "optim": optim}, Path(out) / f"rank_{os.environ.get('RANK', '0')}.pt")
    return code


if __name__ == "__main__":
    from pipeline.training.dist import exit_process

    exit_process(_capture_main(sys.argv[1:]))  # as the job does under torchrun
