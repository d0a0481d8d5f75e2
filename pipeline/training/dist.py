"""Where this process sits in a (maybe) distributed job, and the few collectives the loop needs.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; without them the job is one
process and every collective here is the identity, so the loop has one code path.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # True once init_process_group ran (world > 1, or a 1-process torchrun launch).
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistContext:
    """Read torchrun's environment without initialising anything."""
    return DistContext(
        rank=int(os.environ.get("RANK", "0")),
        world=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init(backend: str, timeout_s: int) -> DistContext:
    """Initialise the process group when launched by torchrun; a no-op for a single process."""
    ctx = from_env()
    if "RANK" not in os.environ or ctx.world < 1:
        return ctx
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank=ctx.rank, world=ctx.world, local_rank=ctx.local_rank, initialised=True)


def shutdown(ctx: DistContext) -> None:
    if ctx.initialised and dist.is_initialized():
        # Line the ranks up first, so none tears its connections down while a peer still talks.
        try:
            dist.barrier()
        except RuntimeError:
            pass  # a peer is already gone: the run failed anyway and is being reported
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a torchrun worker without running interpreter and C++ exit-time destructors.

    Every result is on disk and reported by then. A gloo worker's normal exit sometimes dies
    with SIGABRT ("terminate called without an active exception") while static objects are
    destroyed; torchrun then reports the whole job as failed. Skipping them removes that.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(ctx: DistContext) -> None:
    if ctx.initialised:
        dist.barrier()


def gather_objects(ctx: DistContext, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order); None on the others."""
    if not ctx.initialised or ctx.world == 1:
        return [obj]
    out: list[Any] | None = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.initialised or ctx.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share_data_keys(ctx: DistContext) -> None:
    """Give every rank rank 0's data keys (sealed shards open only with them).

    A node that joined with ``appliance train --join`` never touches the home, so its ranks start
    without the run's keys; node 0's job got them from the service. They travel once over the
    process group, on the cluster's own network (DESIGN: multi-node training is inside the site).
    """
    if not ctx.initialised or ctx.world == 1:
        return
    import json

    from keys import sealed

    mine = os.environ.get(sealed.ENV_KEYS, "") if ctx.is_main else ""
    text = broadcast_object(ctx, mine)
    for key_id, hex_key in (json.loads(text) if text else {}).items():
        if not sealed.has_key(key_id):
            sealed.add_key(key_id, bytes.fromhex(hex_key))
