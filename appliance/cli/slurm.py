"""`appliance slurm`: write an sbatch script for a multi-node training run (no service needed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from appliance.cli.common import emit, home_of


def cmd_slurm(args: argparse.Namespace) -> int:
    """Write an sbatch script that trains a recipe across the nodes of a SLURM allocation."""
    from appliance.jobs.slurm import SlurmConfig, write_script

    cfg = SlurmConfig(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        data=args.data,
        port=args.port,
    )
    home = home_of(args)
    out = Path(args.out) if args.out else None
    loaded, text = write_script(Path(args.recipe), cfg, home=home.root, out=out)
    if not home.exists():
        print(f"note: {home.root} is not an initialised appliance home here; node 0 will need it", file=sys.stderr)
    payload = {
        "script": str(out) if out else None,
        "recipe": str(loaded.path),
        "recipe_sha256": loaded.digest,
        "home": str(home.root),
        "nodes": cfg.nodes,
        "gpus_per_node": cfg.gpus_per_node,
        "ranks": cfg.nodes * cfg.gpus_per_node,
    }
    if out is None and not args.json:
        sys.stdout.write(text)  # so `appliance slurm … | sbatch` works
        return 0
    if out is None:
        payload["text"] = text
    emit(args, payload, f"wrote {out} ({cfg.nodes} nodes x {cfg.gpus_per_node} GPUs)\nsubmit with:\n  sbatch {out}")
    return 0


def register(sub: Any, add: Any) -> None:
    p = add("slurm", cmd_slurm)
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (one rank each)")
    p.add_argument("--cpus-per-task", type=int, default=0, help="cores per node for the job (default 8 per GPU)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", default="24:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS (default 24:00:00)")
    p.add_argument("--account", help="SLURM account to charge")
    p.add_argument("--data", help="train on the shards of this earlier run")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node (default 29500)")
    p.add_argument("--out", help="write the script here (default: stdout)")
