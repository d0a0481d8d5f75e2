"""`appliance generate` and `appliance slurm`: one function per subcommand, its docstring is the help.

``register`` adds them to the parser ``appliance.cli.build_parser`` makes. Heavy imports
(torch, the pipeline) happen inside the commands, so the CLI starts fast.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError


def _model_dir(args: argparse.Namespace) -> tuple[Path, str | None]:
    """(directory to load, store digest or None): MODEL is a directory, else a model digest in the home."""
    from appliance.audit import resolve_digest, verify_artifact
    from appliance.cli import _home
    from registry.store import Store

    given = Path(args.model).expanduser()
    if given.is_dir():
        return given, None
    if not re.fullmatch(r"(sha256:)?[0-9a-fA-F]{8,64}", args.model):
        raise ConfigError(
            f"MODEL {args.model} is neither a directory nor a model digest",
            "pass a packaged model or checkpoint directory, or a digest prefix from `appliance model list`",
        )
    home = _home(args)
    digest = resolve_digest(home, args.model, kind="model")
    # The stored copy is checked against its digest and signature before a byte of it is loaded.
    verify_artifact(home, digest)
    return Store(home.store_dir).path_of(digest), digest


def _sample_config(args: argparse.Namespace) -> Any:
    from pipeline.generate import SampleConfig

    fields = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    try:
        return SampleConfig(**fields)
    except ValueError as exc:
        # The checks name the field; the user typed the flag.
        message = str(exc)
        name = next((f for f in fields if message.startswith(f)), None)
        flag = f"--{name.replace('_', '-')}" if name else "an option"
        raise ConfigError(f"{flag}{message[len(name) :] if name else ': ' + message}", f"fix {flag} as the message says") from None


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue prompts with a packaged model, a checkpoint directory or a model in the store."""
    from pipeline.generate import generate_text, load_for_generation, resolve_device

    cfg = _sample_config(args)
    path, digest = _model_dir(args)
    bundle = load_for_generation(path, tokenizer=Path(args.tokenizer) if args.tokenizer else None, device=resolve_device(args.device))
    start = time.perf_counter()
    results = generate_text(bundle, list(args.prompt), cfg)
    seconds = time.perf_counter() - start
    total = sum(r.new_tokens for r in results)
    where = f"{digest[:16]}… ({path})" if digest else str(path)
    print(f"{bundle.kind} {where}: {total} new tokens in {seconds:.2f} s on {bundle.model.lm_head.weight.device}", file=sys.stderr)
    if args.json:
        payload = [
            {"prompt": r.prompt, "text": r.text, "new_tokens": r.new_tokens, "prompt_tokens": r.prompt_tokens, "stopped_at_eos": r.stopped_at_eos}
            for r in results
        ]
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(r.prompt + r.text for r in results))
    return 0


def cmd_slurm(args: argparse.Namespace) -> int:
    """Write an sbatch script that trains a recipe across the nodes of a SLURM allocation."""
    from appliance.cli import _emit, _home
    from appliance.slurm import SlurmConfig, write_script

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
    home = _home(args)
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
    _emit(args, payload, f"wrote {out} ({cfg.nodes} nodes x {cfg.gpus_per_node} GPUs)\nsubmit with:\n  sbatch {out}")
    return 0


def _add(parent: Any, name: str, fn: Any) -> argparse.ArgumentParser:
    # As build_parser's add(): --json on every command, and --home accepted after it too.
    p = parent.add_parser(name, help=fn.__doc__, description=fn.__doc__)
    p.set_defaults(fn=fn)
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def register(subparsers: Any) -> None:
    """Add ``generate`` and ``slurm`` to the top-level subparsers of ``appliance``."""
    p = _add(subparsers, "generate", cmd_generate)
    p.add_argument("model", help="packaged model directory, checkpoint directory, or a model digest (or unique prefix) in the home")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0 = off (default 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this much probability; 1 = off (default)")
    p.add_argument("--seed", type=int, default=1337, help="prompt i is sampled with seed + i (default 1337)")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model (needed for a checkpoint directory)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: CUDA when present, else CPU")

    p = _add(subparsers, "slurm", cmd_slurm)
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
