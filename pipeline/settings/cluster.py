"""The ``[cluster]`` recipe table: what runs the data stages' batches (curation, shard encoding).

``executor = "local"`` (the default) runs them on worker processes of the stage job;
``"ray"`` runs each batch as a task on a Ray cluster that is already running (``ray start
--head`` on this node, ``ray start --address=...`` on the others): the stage connects to it and
never starts one. The output is byte-identical either way: batches have a fixed size and
their results are consumed in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import check

MAX_WINDOW = 65536
START_HINT = "RAY_AUTH_MODE=token ray start --head --node-ip-address=IP --port=6379 --disable-usage-stats --include-dashboard=false"


def split_address(address: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port`` too) as (host, port), or None when it is not one."""
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() or c in "/@" for c in host):
        return None
    return host, int(port)


@dataclass(kw_only=True)
class ClusterConfig:
    # "local": worker processes of the stage job (no Ray needed); "ray": tasks on a running Ray cluster.
    executor: Literal["local", "ray"] = "local"
    # The Ray cluster's GCS address (host:port of `ray start --head`). The job connects from this
    # node, so the head (or a worker node) of that cluster runs here; never started by the stage.
    ray_address: str = ""
    # Batches in flight at once; 0 = twice the cluster's CPUs. Bounds the driver's memory.
    window: int = 0

    def __post_init__(self) -> None:
        # In-flight batches are held by the driver: a window past any cluster's size only grows its memory.
        check(0 <= self.window <= MAX_WINDOW, f"window must be 0 to {MAX_WINDOW} (0 = twice the cluster's CPUs), got {self.window}")
        if self.executor == "ray":
            check(
                bool(self.ray_address.strip()),
                'ray_address must be set when executor = "ray"',
                fix=f'set ray_address = "HOST:6379" (the head started with `{START_HINT}`), or executor = "local"',
            )
        if self.ray_address.strip():
            check(
                split_address(self.ray_address) is not None,
                f"ray_address is {self.ray_address!r}, not HOST:PORT",
                fix='write it as ray_address = "127.0.0.1:6379" (the address `ray start --head` printed)',
            )
