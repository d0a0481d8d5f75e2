"""How a job is launched: one process, or torchrun for several processes and nodes.

The runner (`appliance.jobs.runner`) starts and follows every job; this module builds the
command line and explains a failed launch. Every torchrun launch is guarded:

- a free port for a one-node torchrun (``--standalone`` picks one) and an explicit
  rendezvous endpoint across nodes (static rendezvous, so node 0 holds rank 0, which writes
  the events the service reads);
- ``--max-restarts 0``: a rank that dies ends the job, torchrun stops the others, and the
  process-group timeout in the spec bounds any collective still waiting;
- a cancel is SIGTERM to the training processes (they checkpoint and exit); a second one
  kills the job's process group.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

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


def command(spec: Path, opts: LaunchOptions, *, module: str = "pipeline.training.job") -> list[str]:
    """The job's argv: the job module alone, or under torchrun."""
    # Behind the egress guard (airgap.run installs it before the job imports anything), and so
    # is torchrun itself and each of its workers.
    job = ["-m", "airgap.run", module, str(spec)]
    if not opts.distributed:
        return [sys.executable, *job]
    run = [sys.executable, "-m", "airgap.run", "torch.distributed.run", f"--nproc-per-node={opts.nproc_per_node}", "--max-restarts=0", "--monitor-interval=1"]
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


def failure_message(out_dir: Path, log_file: Path, returncode: int) -> str:
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
    if returncode < 0:
        return f"the job process was killed by {signal.Signals(-returncode).name}"
    tail = "\n".join(text.strip().splitlines()[-LOG_TAIL_LINES:])
    return f"the job exited with code {returncode}" + (f"; last lines of {log_file}:\n{tail}" if tail else "")
