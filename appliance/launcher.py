"""Start a training job (one process, or torchrun for several), follow its events, stop it cleanly.

The job is ``python -m pipeline.training.job SPEC`` (see that module for the event stream).
Every launch is guarded:

- a free port for a one-node torchrun (``--standalone`` picks one) and an explicit
  rendezvous endpoint across nodes (static rendezvous, so node 0 holds rank 0, which writes
  the events the service reads);
- ``--max-restarts 0``: a rank that dies ends the job, torchrun stops the others, and the
  process-group timeout in the spec bounds any collective still waiting;
- the child runs in its own session: a SIGTERM/SIGINT to the appliance is forwarded once as
  SIGTERM (the job checkpoints and exits); a second one kills the job's process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, TrainingError

POLL_S = 0.2
# How much of the launcher log a failure message quotes.
LOG_TAIL_LINES = 12
_ENDPOINT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:(\d{1,5})$")


@dataclass(kw_only=True)
class LaunchOptions:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    # Use torchrun even for one process (FSDP and DeepSpeed need a process group).
    force_torchrun: bool = False

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}", "give the number of GPUs (or CPU processes) per node")
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be >= 1, got {self.nnodes}", "give the number of nodes in the job")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1}", "number the nodes 0 to nnodes - 1; node 0 runs the service")
        if self.nnodes > 1:
            m = _ENDPOINT.match(self.rdzv_endpoint)
            if not m or not 0 < int(m.group(1)) < 65536:
                raise ConfigError(
                    f"--rdzv-endpoint '{self.rdzv_endpoint}' is not HOST:PORT", "give node 0's address and a free port, e.g. --rdzv-endpoint head-node:29500"
                )

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def distributed(self) -> bool:
        return self.world > 1 or self.force_torchrun


def command(spec: Path, opts: LaunchOptions) -> list[str]:
    """The job's argv: the job module alone, or under torchrun."""
    job = ["-m", "pipeline.training.job", str(spec)]
    if not opts.distributed:
        return [sys.executable, *job]
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={opts.nproc_per_node}", "--max-restarts=0", "--monitor-interval=1"]
    if opts.nnodes == 1:
        run.append("--standalone")
    else:
        run += [f"--nnodes={opts.nnodes}", f"--node-rank={opts.node_rank}", "--rdzv-backend=static", f"--rdzv-endpoint={opts.rdzv_endpoint}"]
        host, _, port = opts.rdzv_endpoint.rpartition(":")
        run += [f"--master-addr={host}", f"--master-port={port}"]
    return [*run, *job]


def check_port(opts: LaunchOptions) -> None:
    """On node 0 of a multi-node job, fail now if the rendezvous port is taken (by an old job,
    say) rather than leave every node waiting on a rendezvous that cannot happen."""
    if opts.nnodes < 2 or opts.node_rank != 0:
        return
    port = int(opts.rdzv_endpoint.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError as exc:
            raise ConfigError(
                f"rendezvous port {port} on this node is not free ({exc.strerror})", "pick another port in --rdzv-endpoint, or stop the process holding it"
            ) from None


def job_env(opts: LaunchOptions) -> dict[str, str]:
    env = dict(os.environ)
    # One compute thread pool per process, sized so ranks on one node do not oversubscribe it.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // opts.nproc_per_node)))
    # The job must import the same code as the service, wherever it is started from.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass
class Outcome:
    returncode: int
    events: list[dict[str, Any]] = field(default_factory=list)
    # The signal the appliance received and forwarded, if any.
    cancelled_by: str | None = None

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e.get("event") == kind), None)


class EventTail:
    """Reads whole new lines appended to the job's events file."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        data = self.partial + chunk
        lines = data.split(b"\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn line can only come from a job killed mid-write
        return out


def run_job(spec: Path, events_file: Path, log_file: Path, opts: LaunchOptions, on_event: Callable[[dict[str, Any]], None]) -> Outcome:
    """Run the job to its end, calling ``on_event`` for every event rank 0 reports."""
    check_port(opts)
    tail = EventTail(events_file)
    outcome = Outcome(returncode=-1)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(command(spec, opts), stdout=log, stderr=subprocess.STDOUT, env=job_env(opts), start_new_session=True)
        received: list[int] = []
        restore = _forward_signals(received)
        try:
            forwarded = 0
            while True:
                for event in tail.read():
                    outcome.events.append(event)
                    on_event(event)
                code = proc.poll()
                if code is not None:
                    break
                if len(received) > forwarded:
                    forwarded = len(received)
                    outcome.cancelled_by = signal.Signals(received[0]).name
                    # First signal: ask the training processes for a checkpoint; second: stop now.
                    if forwarded == 1:
                        _signal_workers(proc, signal.SIGTERM, opts.distributed)
                    else:
                        _signal_group(proc, signal.SIGKILL)
                time.sleep(POLL_S)
            for event in tail.read():
                outcome.events.append(event)
                on_event(event)
            outcome.returncode = code
        finally:
            restore()
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
    return outcome


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _signal_workers(proc: subprocess.Popen, sig: int, distributed: bool) -> None:
    """Signal the training processes themselves. Under torchrun, signalling torchrun would make
    it tear its workers down after a grace period that a large checkpoint can outlast; the
    workers instead save, exit 0, and torchrun then exits cleanly."""
    workers = _children(proc.pid) if distributed else []
    if not workers:
        _signal_group(proc, sig)
        return
    for pid in workers:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _forward_signals(received: list[int]) -> Callable[[], None]:
    """Collect SIGTERM/SIGINT instead of dying, while the job runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in old:
        signal.signal(s, lambda signum, frame: received.append(signum))

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


def failure_message(out_dir: Path, log_file: Path, outcome: Outcome) -> str:
    """Why the job failed, in words: the ranks' own errors, else torchrun's account, else the log's tail."""
    errors = []
    for f in sorted((out_dir / "errors").glob("rank_*.json")) if (out_dir / "errors").is_dir() else []:
        try:
            body = json.loads(f.read_text(encoding="utf-8"))
            errors.append(f"rank {body['rank']}: {body['message']}")
        except (OSError, ValueError, KeyError):
            continue
    text = log_file.read_text(encoding="utf-8", errors="replace") if log_file.exists() else ""
    # torchrun's summary names the first rank that failed ("Root Cause"), its exit code and the
    # signal that killed it. A killed rank writes no error file, so that comes first; the
    # survivors' "lost contact" errors follow.
    root = text.rfind("Root Cause")
    m = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*", text[root:], flags=re.S) if root >= 0 else None
    if m:
        sig = re.search(r"\((SIG\w+)\)", m.group(0))
        code = int(m.group(2))
        how = f"killed by {sig.group(1)}" if sig else (f"killed by signal {-code}" if code < 0 else f"exit code {code}")
        return "; ".join([f"training process rank {m.group(1)} failed first ({how}); torchrun stopped the other ranks", *dict.fromkeys(errors)])
    if errors:
        return "; ".join(dict.fromkeys(errors))
    if outcome.returncode < 0:
        return f"the training process was killed by {signal.Signals(-outcome.returncode).name}"
    tail = "\n".join(text.strip().splitlines()[-LOG_TAIL_LINES:])
    return f"the training job exited with code {outcome.returncode}" + (f"; last lines of {log_file}:\n{tail}" if tail else "")


def require_success(out_dir: Path, log_file: Path, outcome: Outcome) -> None:
    if outcome.returncode != 0:
        raise TrainingError(
            failure_message(out_dir, log_file, outcome),
            f"see {log_file}; fix the cause, then `appliance resume RUN` continues from the last verified checkpoint",
        )


def join_job(job_file: Path, opts: LaunchOptions, *, timeout_s: float) -> int:
    """On a node other than 0: wait for node 0's job spec, then run this node's ranks.

    This node never touches the appliance home or the ledger: rank 0 (on node 0) reports
    everything, including the digests of the checkpoint files these ranks write.
    """
    if opts.node_rank == 0:
        raise ConfigError("--join is for nodes other than 0", "give this node's --node-rank (1 to nnodes - 1)")
    if opts.nnodes < 2:
        raise ConfigError("--join needs --nnodes of 2 or more", "give the job's node count, the same on every node")
    deadline = time.monotonic() + timeout_s
    while not job_file.is_file():
        if time.monotonic() > deadline:
            raise TrainingError(
                f"job file {job_file} did not appear within {timeout_s:g} s",
                "start node 0 (`appliance train RECIPE --job-file …`) and check that this path is on storage both nodes share",
            )
        time.sleep(1.0)
    proc = subprocess.run(command(job_file, LaunchOptions(**{**opts.__dict__, "force_torchrun": True})), env=job_env(opts), check=False)
    if proc.returncode != 0:
        raise TrainingError(
            f"this node's training processes exited with code {proc.returncode}",
            "node 0's `appliance` output and the run's launcher.log say which rank failed first",
        )
    return 0
