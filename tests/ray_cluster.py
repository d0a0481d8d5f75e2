"""A two-node Ray cluster on loopback, in a network namespace holding only ``lo``.

Ray binds to the host's interface address in a normal network namespace, whatever
``--node-ip-address`` says; inside ``unshare -n`` it stays on 127.0.0.1. So the cluster, and
whatever drives it, run in a namespace of their own: a holder process keeps it, every command
enters it with ``nsenter`` (the prefix `loopback_cluster` yields). At the end every process in
that namespace is killed by PID (``ray stop`` would stop every Ray process of the machine).
Used by the Ray tests and by ``bench/bench_scale.py``.

The cluster demands a token (``RAY_AUTH_MODE=token``), as the stages require: a fresh one in
a file of mode 600 in the cluster's temp dir, whose path the yielded prefix carries in the
environment (``RAY_AUTH_TOKEN_PATH``), as the service's own environment would. ``token=False``
starts an open cluster, the kind the stages refuse.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ADDRESS = "127.0.0.1:6379"


class ClusterUnavailable(Exception):
    """This machine cannot run the cluster (no root, no unshare, unshare refused)."""


def ray_env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "RAY_USAGE_STATS_ENABLED": "0"}


def netns_members(ns: str) -> list[int]:
    """Every live process in the network namespace ``ns`` (a readlink of /proc/PID/ns/net)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == ns and Path(f"/proc/{entry}/stat").read_text().split(") ", 1)[1][0] != "Z":
                    pids.append(int(entry))
            except (OSError, IndexError):
                pass
    return pids


def _kill_namespace(ns: str, holder: subprocess.Popen[bytes]) -> list[int]:
    """Kill every process of the cluster's namespace by PID (TERM, then KILL), the holder last; what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        for pid in netns_members(ns):
            if pid != holder.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and set(netns_members(ns)) - {holder.pid}:
            time.sleep(0.1)
    holder.kill()
    holder.wait()
    return netns_members(ns)


@contextlib.contextmanager
def loopback_cluster(root: Path, *, num_cpus: int = 2, token: bool = True) -> Iterator[list[str]]:
    """A head and a worker node (``num_cpus`` each) on 127.0.0.1; yields the prefix that enters their
    namespace (``nsenter --net=… --`` and, with ``token``, ``env RAY_AUTH_TOKEN_PATH=…``).

    Raises ClusterUnavailable where the machine cannot run it; RuntimeError if ``ray start``
    fails or a process of the cluster outlives the end.
    """
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        raise ClusterUnavailable("needs root with unshare and nsenter (a network namespace holding only lo)")
    holder = subprocess.Popen(["unshare", "-n", "--", sys.executable, "-c", "import time; time.sleep(86400)"])
    time.sleep(0.3)
    if holder.poll() is not None:
        raise ClusterUnavailable(f"unshare -n is not permitted here (exit {holder.returncode})")
    ns = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
    netns = os.readlink(f"/proc/{holder.pid}/ns/net")
    # Ray's socket paths must stay under 108 bytes: a short temp dir, not pytest's long one.
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    ray = str(Path(sys.executable).with_name("ray"))
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={temp}"]
    env = {k: v for k, v in ray_env(root).items() if not k.startswith("RAY_AUTH_")}
    token_file = temp / "auth_token"
    try:
        if token:
            token_file.touch(mode=0o600)
            token_file.write_text(secrets.token_hex(32))
            env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        else:
            env["RAY_AUTH_MODE"] = "disabled"  # whatever ~/.ray/auth_token this user has
        subprocess.run([*ns, "ip", "link", "set", "lo", "up"], check=True)
        for args in (["--head", "--port=6379", "--include-dashboard=false"], [f"--address={ADDRESS}"]):
            done = subprocess.run([*ns, ray, "start", *args, *common], env=env, capture_output=True, text=True, timeout=180)
            if done.returncode != 0:
                raise RuntimeError(f"ray start {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
        yield [*ns, "env", f"RAY_AUTH_TOKEN_PATH={token_file}"] if token else ns
    finally:
        left = _kill_namespace(netns, holder)
        shutil.rmtree(temp, ignore_errors=True)
        if left:
            raise RuntimeError(f"processes of the Ray cluster still running: {left}")
