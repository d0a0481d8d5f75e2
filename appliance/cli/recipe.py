"""`appliance recipe check`: every problem of a recipe at once, before a run is started."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from appliance.cli.common import emit


def cmd_recipe_check(args: argparse.Namespace) -> int:
    """Check a recipe as `appliance run` would — every table, across tables, against this machine — and say what it asks for."""
    from appliance.recipe import load_recipe
    from appliance.recipe_checks import Machine, recipe_summary, summary_text

    machine = Machine.here()
    # The caller's own files: a fine-tuning recipe's local base is read (its config.json) and checked too.
    loaded = load_recipe(Path(args.recipe), machine=machine, read_base=True)
    source = loaded.source_dir(Path(args.source) if args.source else None) if (args.source or loaded.recipe.recipe.source) else None
    summary = recipe_summary(loaded.recipe, machine, loaded.path.parent)
    payload = {"recipe": str(loaded.path), "digest": loaded.digest, "ok": True, "source": str(source) if source else None, **summary}
    if loaded.recipe.finetune is not None:
        where = f"data sets from {loaded.path.parent}"  # a fine-tuning recipe names its files relative to itself
    else:
        where = f"corpus {source}" if source else "no corpus named yet (give --source to `appliance run`)"
    emit(args, payload, f"{loaded.path}: ok — {summary_text(summary)}; {where}")
    return 0


def register(sub: Any, add: Any) -> None:
    recipe = sub.add_parser("recipe", help="check recipes before running them").add_subparsers(dest="recipe_command", required=True, metavar="COMMAND")
    p = add("check", cmd_recipe_check, recipe)
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--source", help="corpus folder (overrides [recipe] source)")
