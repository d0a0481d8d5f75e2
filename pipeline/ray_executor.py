"""Run a data stage's batches as tasks on a running Ray cluster (``[cluster] executor = "ray"``).

Imported only when a recipe names Ray: Ray is an optional extra (``pip install
'sovereign-appliance[ray]'``) and the appliance works without it.

The stage job is the Ray *driver*: it connects to the cluster (``ray.init(address=...)``,
which needs a Ray node on this machine: the head, or a worker node) and never starts one.
Each batch becomes one task; results are read in submission order with at most ``window``
tasks in flight, exactly as with local workers, so the output is byte-identical.

Nothing is downloaded: the workers import this checkout's code from the same path (the
task's ``runtime_env`` sets only ``PYTHONPATH`` and the telemetry switch), so every node must
have the appliance installed at the same path. Usage stats stay off (``RAY_USAGE_STATS_ENABLED
=0``), and the dashboard is the cluster's choice (``ray start --include-dashboard=false``).

The cluster must demand a token, and the stage joins it with the service user's own
(`pipeline.ray_auth`): an open cluster, another token or a token file others can read is
refused before a batch is sent, both before the run starts (`require_cluster`) and when the
stage connects.

The stage's initializer (compiled filters, a loaded tokenizer) runs once per Ray worker
process, not once per batch: `_run_task` remembers, per initializer, the digest of the
arguments it last ran with, and runs it again only when they change (a worker that serves
another `ordered_map` call of the same job).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import pickle
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import ClusterError
from pipeline.ray_auth import driver_env, require_token_auth
from pipeline.settings.cluster import START_HINT, ClusterConfig, split_address

# Seconds to wait for the head's port before saying it cannot be reached.
CONNECT_TIMEOUT_S = 5.0
# The checkout (or site-packages) this module was imported from: the workers import the same.
CODE_ROOT = str(Path(__file__).resolve().parents[1])
INSTALL_HINT = "install it with `pip install 'sovereign-appliance[ray]'` (ray==2.60.0) on every node, or set [cluster] executor = \"local\""


# -- worker side ---------------------------------------------------------------------------

# initializer name -> digest of the arguments it last ran with in this worker process.
_INITIALISED: dict[str, str] = {}


def _run_task(fn: Callable[[Any], Any], initializer: Callable[..., None] | None, init_key: str, initargs: bytes, item: Any) -> Any:
    """One batch on a Ray worker: the stage's initializer first, if this process has not run it with
    these arguments (``initargs`` pickled, unpickled only then; ``init_key`` is their sha256)."""
    if initializer is not None:
        name = f"{initializer.__module__}.{initializer.__qualname__}"
        if _INITIALISED.get(name) != init_key:
            initializer(*pickle.loads(initargs))
            _INITIALISED[name] = init_key
    return fn(item)


def initialisations() -> dict[str, str]:
    """What this worker process has initialised (for tests: once per worker, not per batch)."""
    return dict(_INITIALISED)


# -- driver side ---------------------------------------------------------------------------


def _local_address_towards(host: str, port: int) -> str:
    """This node's address on the route to the head: the address its Ray node registered with."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))  # UDP: no packet is sent; the kernel picks the route
        return str(probe.getsockname()[0])


def _probe(address: str) -> tuple[str, int]:
    """Fail fast, with the fix, when nothing listens at the head's address (ray.init would retry for a minute)."""
    parsed = split_address(address)
    if parsed is None:
        raise ClusterError(f"Ray cluster address {address!r} is not HOST:PORT", 'set [cluster] ray_address = "HOST:6379"')
    host, port = parsed
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ClusterError(
            f"the Ray cluster at {address} cannot be reached ({exc.strerror or exc}); the stage connects to a running cluster and never starts one",
            f'start it on the head node with `{START_HINT}` (and `ray start --address={address}` on the other nodes), or set [cluster] executor = "local"',
        ) from None
    return host, port


def require_cluster(cluster: ClusterConfig) -> None:
    """Before a run starts: Ray is installed here and its cluster answers at ``ray_address``
    (a recipe naming a cluster that is not there fails now, not after the stages before curate)."""
    _require_installed()
    _probe(cluster.ray_address.strip())
    require_token_auth(cluster.ray_address.strip())


def _require_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ClusterError('[cluster] executor = "ray", but Ray is not installed here', INSTALL_HINT)


def _import_ray(token: Path) -> Any:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Set before Ray reads its configuration (at import and init): join with exactly the checked token file.
    os.environ.update(driver_env(token))
    os.environ.pop("RAY_AUTH_TOKEN", None)
    try:
        import ray
    except ImportError:
        raise ClusterError('[cluster] executor = "ray", but Ray is not installed here', INSTALL_HINT) from None
    return ray


class RayBackend:
    """`pipeline.parallel`'s backend for a Ray cluster: one task per batch, results by handle."""

    def __init__(self, fn: Callable[[Any], Any], cluster: ClusterConfig, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
        self.fn, self.initializer, self.address = fn, initializer, cluster.ray_address.strip()
        _require_installed()
        host, port = _probe(self.address)
        # Checked again here, not only before the run: the cluster may have been restarted since.
        self.ray = ray = _import_ray(require_token_auth(self.address))
        self.owns_connection = not ray.is_initialized()
        if self.owns_connection:
            env = {
                "PYTHONPATH": os.pathsep.join(dict.fromkeys([CODE_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])),
                "RAY_USAGE_STATS_ENABLED": "0",
            }
            try:
                ray.init(
                    address=self.address,
                    _node_ip_address=_local_address_towards(host, port),
                    runtime_env={"env_vars": env},
                    log_to_driver=False,
                    configure_logging=False,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ClusterError(
                    f"cannot join the Ray cluster at {self.address}: {exc}",
                    f"a Ray node must run on this machine (the head, or `ray start --address={self.address}`); start the head with `{START_HINT}`",
                ) from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # Twice the cluster's CPUs keeps every worker busy while the driver writes results in order.
        self.window = cluster.window or max(2, 2 * cpus)
        # Pickled once: the digest names them, the bytes travel (compiled filters, a tokenizer's model).
        pickled = pickle.dumps(initargs, protocol=pickle.HIGHEST_PROTOCOL)
        self.init_key = hashlib.sha256(pickled).hexdigest()
        self.initargs_ref = ray.put(pickled)
        self.task = ray.remote(num_cpus=1)(_run_task)

    def submit(self, item: Any) -> Any:
        return self.task.remote(self.fn, self.initializer, self.init_key, self.initargs_ref, item)

    def result(self, handle: Any) -> Any:
        ray = self.ray
        try:
            return ray.get(handle)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None  # the stage's own error (a DataError names the bad document)
            raise ClusterError(
                f"a Ray task of {self.fn.__module__} failed: {exc}", "see the Ray worker logs (/tmp/ray/session_latest/logs on its node)"
            ) from None
        except ray.exceptions.RayError as exc:
            raise ClusterError(
                f"a Ray worker running {self.fn.__module__} was lost ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "the batches finished before it are kept in the task journal",
                "check the node's memory and `ray status`, then relaunch the stage: it recomputes only the unfinished batches",
            ) from None

    def cancel(self, handle: Any) -> None:
        try:
            self.ray.cancel(handle)
        except Exception:  # noqa: BLE001 - best effort: a finished or lost task cannot be cancelled
            pass

    def close(self) -> None:
        if self.owns_connection and self.ray.is_initialized():
            self.ray.shutdown()
