"""Jobs never outlive their authority: a job process dies when the process that started it dies.

The service starts every stage as a child process; that child may start workers of its own
(curation's process pool, torchrun's ranks). If the service is killed (kill -9, OOM), nothing
of the job may keep running unrecorded — a trainer that goes on writing and pruning
checkpoints the ledger never sees is worse than one that stops. Linux's
``PR_SET_PDEATHSIG`` makes the kernel send a signal to a process when its parent dies; each
link of the chain (service → job → workers) sets it, so the whole tree follows the service.

``PR_SET_PDEATHSIG`` fires when the parent *thread* that forked the child exits, so the
service starts jobs from a thread that waits for them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
# The job is told which process started it, so it can notice a parent that died before the
# signal was armed (it would then be adopted by init, and no signal would ever come).
ENV_PARENT = "APPLIANCE_JOB_PARENT"

# Loaded at import, in the parent, so a preexec function never loads a library after fork.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _prctl(option: int, arg: int) -> int:
    return int(_libc.prctl(option, arg, 0, 0, 0)) if _libc is not None else 0


def arm(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only)."""
    if sys.platform.startswith("linux"):
        _prctl(PR_SET_PDEATHSIG, int(sig))


def die_with_parent(expected_parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Arm the death signal, then exit at once if the parent is already gone.

    ``expected_parent`` defaults to ``$APPLIANCE_JOB_PARENT`` when set (the service sets it),
    else to the current parent: a worker only needs to follow whoever started it.
    """
    arm(sig)
    if expected_parent is None:
        env = os.environ.get(ENV_PARENT, "")
        expected_parent = int(env) if env.isdigit() else None
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def preexec_die_with_parent() -> None:
    """For ``subprocess.Popen(preexec_fn=…)``: runs in the child between fork and exec.

    The death signal survives exec, so this covers programs we do not write (torchrun).
    Only async-signal-safe work here: one prctl call (libc is loaded before the fork).
    """
    arm(signal.SIGKILL)
