"""The one job runner: every stage runs as a child process of the service, started here.

A job is ``python -m MODULE SPEC.json`` (a data stage, evaluation, packaging, generation) or
the same under torchrun (training on several processes or nodes). The runner:

- writes the spec whole (atomically: workers on other nodes wait for that file);
- gives the job a minimal environment: never the passphrase, never the caller's variables;
- arms the kernel's parent-death signal in the child before exec (`pipeline.lifeline`), and
  starts it in its own session so the whole process group can be stopped;
- hands the job the run's lock file descriptor, so the lock stays held for as long as any
  process of the job lives, even if the service is killed (the next service start checks it);
- follows the job's events file (`pipeline.events`) and calls back on each event;
- cancels on request: SIGTERM to the working processes (a trainer saves a checkpoint), and
  SIGKILL to the group on a second request.

The service starts jobs from a thread that waits for them: the parent-death signal fires
when the *thread* that forked the child exits.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airgap.attest import OFFLINE_ENV
from airgap.guard import ENV_ALLOW, ENV_LOG
from appliance.jobs.launch import LaunchOptions, check_port, command
from keys.files import atomic_write
from pipeline.errors import ConfigError, TrainingError
from pipeline.events import EventTail
from pipeline.lifeline import ENV_PARENT, preexec_die_with_parent

POLL_S = 0.2
SPEC = "job.json"
EVENTS = "events.jsonl"
LOG = "job.log"

# What a job inherits from the service's environment: the machine's settings, nothing of a
# person's (the passphrase above all). Prefixes cover GPU, thread-pool and collective tuning.
# RAY_AUTH_TOKEN_PATH names the Ray cluster's token file (`pipeline.ray_auth`), never the token.
_ENV_NAMES = {
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "HOME",
    "USER",
    "LOGNAME",
    "VIRTUAL_ENV",
    "PYTHONHASHSEED",
    "SOURCE_DATE_EPOCH",
    "RAY_AUTH_TOKEN_PATH",
}
_ENV_PREFIXES = ("CUDA_", "NVIDIA_", "NCCL_", "GLOO_", "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "DS_", "ROCR_", "HIP_")


def job_env(opts: LaunchOptions, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a job runs with: an allowlist of the service's, plus what the job needs."""
    env = {k: v for k, v in os.environ.items() if k in _ENV_NAMES or k.startswith(_ENV_PREFIXES)}
    # One compute thread pool per process, sized so ranks on one node do not oversubscribe it.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // opts.nproc_per_node)))
    # The job must import the same code as the service, wherever it is started from.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root
    env.update(OFFLINE_ENV)
    # The guard's allowances: the service's own configuration, plus the rendezvous host of a
    # multi-node job (the cluster's own address).
    allow = [a for a in os.environ.get(ENV_ALLOW, "").split(",") if a.strip()]
    if opts.nnodes > 1:
        allow.append(opts.rdzv_endpoint.rpartition(":")[0].strip("[]"))
    if allow:
        env[ENV_ALLOW] = ",".join(dict.fromkeys(allow))
    if not opts.distributed:
        # The job's parent is this process; under torchrun it is torchrun (whose own death
        # signal is armed before exec), and each rank follows torchrun.
        env[ENV_PARENT] = str(os.getpid())
    env.update(extra or {})
    return env


class RunLock:
    """At most one job per run: an exclusive ``flock`` on ``<run work dir>/run.lock``.

    The service holds it while it drives the run and hands the descriptor to the run's jobs,
    so a job that outlives a killed service keeps the run locked until it is gone too.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "run.lock"
        self.fd: int | None = None

    def acquire(self, *, wait_s: float = 0.0) -> None:
        """Take the lock, waiting up to ``wait_s`` (a job of a killed service takes a moment to die)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self.path.with_name("run.pid")
                    pid = holder.read_text().strip() if holder.exists() else "unknown"
                    os.close(fd)
                    raise TrainingError(
                        f"run {self.path.parent.name} already has a job running (process {pid})",
                        "wait for it to finish, or cancel it with `appliance cancel RUN`; a job never runs twice on one run",
                    ) from None
                time.sleep(0.2)
        self.fd = fd
        self.path.with_name("run.pid").write_text(f"{os.getpid()}\n")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Outcome:
    returncode: int
    events: list[dict[str, Any]] = field(default_factory=list)
    # True when the job was asked to stop (cancel), not when it failed on its own.
    cancelled: bool = False

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e.get("event") == kind), None)


class Job:
    """One child process (or torchrun process tree) of the service, followed to its end."""

    def __init__(
        self,
        module: str,
        spec: dict[str, Any],
        work: Path,
        *,
        launch: LaunchOptions | None = None,
        spec_file: Path | None = None,
        lock: RunLock | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.module, self.work = module, Path(work)
        # Added to the job's environment (its run's data keys): never written to the spec file.
        self.env = dict(env or {})
        # Where the job's egress guard writes what it refused; read back as `refusals`.
        self.egress_log = self.work / "egress.jsonl"
        self.env[ENV_LOG] = str(self.egress_log)
        self.launch = launch or LaunchOptions()
        self.spec_file = spec_file or self.work / SPEC
        self.events_file = self.work / EVENTS
        self.log_file = self.work / LOG
        self.spec = {**spec, "events": str(self.events_file)}
        self.lock = lock
        self.proc: subprocess.Popen[bytes] | None = None
        self._cancels = 0
        self._guard = threading.Lock()

    def run(self, on_event: Callable[[dict[str, Any]], None]) -> Outcome:
        """Start the job and follow it to its end, calling ``on_event`` for each event."""
        check_port(self.launch)
        self.work.mkdir(parents=True, exist_ok=True)
        self.events_file.unlink(missing_ok=True)
        self.egress_log.unlink(missing_ok=True)
        self.spec_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.spec_file, (json.dumps(self.spec, indent=2, sort_keys=True, default=str) + "\n").encode(), mode=0o644)
        tail = EventTail(self.events_file)
        outcome = Outcome(returncode=-1)
        pass_fds = (self.lock.fd,) if self.lock is not None and self.lock.fd is not None else ()
        with open(self.log_file, "ab") as log:
            with self._guard:
                self.proc = subprocess.Popen(
                    command(self.spec_file, self.launch, module=self.module),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=job_env(self.launch, self.env),
                    start_new_session=True,
                    preexec_fn=preexec_die_with_parent,
                    pass_fds=pass_fds,
                    cwd=self.work,
                )
                if self._cancels:  # cancelled while starting
                    self._signal_group(signal.SIGTERM)
            proc = self.proc
            try:
                while True:
                    for event in tail.read():
                        outcome.events.append(event)
                        on_event(event)
                    code = proc.poll()
                    if code is not None:
                        break
                    time.sleep(POLL_S)
                for event in tail.read():
                    outcome.events.append(event)
                    on_event(event)
                outcome.returncode = code
            finally:
                if proc.poll() is None:
                    self._signal_group(signal.SIGKILL)
                    proc.wait()
        outcome.cancelled = self._cancels > 0
        return outcome

    def refusals(self) -> list[dict[str, Any]]:
        """What the job's egress guard refused (address, asking module), for the ledger."""
        try:
            lines = self.egress_log.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by the job's death: the rest still count
        return out

    def cancel(self) -> None:
        """First call: ask the working processes to stop (they checkpoint); second: kill the group."""
        with self._guard:
            self._cancels += 1
            if self.proc is None or self.proc.poll() is not None:
                return
            if self._cancels == 1:
                self._signal_workers(signal.SIGTERM)
            else:
                self._signal_group(signal.SIGKILL)

    def _signal_workers(self, sig: int) -> None:
        """Signal the working processes themselves. Under torchrun, signalling torchrun would
        make it tear its workers down after a grace period that a large checkpoint can
        outlast; the workers instead save, exit 0, and torchrun then exits cleanly."""
        proc = self.proc
        if proc is None:
            return
        workers = child_pids(proc.pid) if self.launch.distributed else []
        if not workers:
            self._signal_group(sig)
            return
        for pid in workers:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (from /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


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
    opts = LaunchOptions(**{**opts.__dict__, "force_torchrun": True})
    proc = subprocess.run(command(job_file, opts), env=job_env(opts), preexec_fn=preexec_die_with_parent, check=False)
    if proc.returncode != 0:
        raise TrainingError(
            f"this node's training processes exited with code {proc.returncode}",
            "node 0's `appliance` output and the run's job.log say which rank failed first",
        )
    return 0
