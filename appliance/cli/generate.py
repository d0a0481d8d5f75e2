"""`appliance generate`: continue prompts with a verified model, in a job of the service."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from appliance.cli.common import connect
from pipeline.errors import ConfigError

_DIGEST = re.compile(r"(sha256:)?[0-9a-fA-F]{8,64}")


def _model_ref(model: str) -> str:
    """A directory becomes an absolute path (the service checks you may read it); else a digest."""
    given = Path(model).expanduser()
    if given.exists():
        return str(given.resolve())
    if not _DIGEST.fullmatch(model):
        raise ConfigError(
            f"MODEL {model} is neither a directory nor a model digest",
            "pass a packaged model or checkpoint directory, or a digest prefix from `appliance model list`",
        )
    return model


def _sample(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.generate import SampleConfig

    fields = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    try:
        SampleConfig(**fields)  # the same checks the job applies, before a job is started
    except ValueError as exc:
        # The checks name the field; the user typed the flag.
        message = str(exc)
        name = next((f for f in fields if message.startswith(f)), None)
        flag = f"--{name.replace('_', '-')}" if name else "an option"
        raise ConfigError(f"{flag}{message[len(name) :] if name else ': ' + message}", f"fix {flag} as the message says") from None
    return fields


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue prompts with a packaged model, a recorded checkpoint directory or a model in the store (verified first)."""
    sample, model = _sample(args), _model_ref(args.model)
    with connect(args) as client:
        r = client.call(
            "model.generate",
            model=model,
            prompts=list(args.prompt),
            sample=sample,
            tokenizer=str(Path(args.tokenizer).resolve()) if args.tokenizer else None,
            device=args.device,
        )
    results = r["results"]
    total = sum(x["new_tokens"] for x in results)
    where = f"{r['digest'][:16]}… ({r['model']})" if r.get("digest") else r["model"]
    print(f"{r['kind']} {where} ({r['verified']}): {total} new tokens in {r['seconds']:.2f} s on {r['device']}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(x["prompt"] + x["text"] for x in results))
    return 0


def register(sub: Any, add: Any) -> None:
    p = add("generate", cmd_generate)
    p.add_argument("model", help="packaged model directory, recorded checkpoint directory, or a model digest (or unique prefix) in the home")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0 = off (default 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this much probability; 1 = off (default)")
    p.add_argument("--seed", type=int, default=1337, help="prompt i is sampled with seed + i (default 1337)")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model (needed for a checkpoint directory)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: CUDA when present, else CPU")
