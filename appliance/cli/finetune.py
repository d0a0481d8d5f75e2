"""`appliance finetune`: fine-tune a local base model; `--from-axolotl` converts an Axolotl config to a recipe.

The conversion needs no service (like `appliance recipe check`): it reads a YAML file and
writes a recipe. The recipe goes to stdout (or --out) and the notes, one line per Axolotl key,
to stderr, so `appliance finetune --from-axolotl qlora.yml > qlora.toml` keeps both readable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from appliance.cli.common import emit
from keys.errors import ApplianceError


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a local base model. With --from-axolotl FILE.yml: convert that Axolotl config into a recipe (printed, or written to --out), with a note per key on stderr."""
    if args.from_axolotl:
        return _from_axolotl(args)
    if not args.recipe:
        raise ApplianceError(
            "give a recipe with a [finetune] table, or --from-axolotl FILE.yml",
            "convert one with `appliance finetune --from-axolotl FILE.yml --out RECIPE.toml`, then `appliance finetune RECIPE.toml`",
        )
    from appliance.cli.runs import start_and_follow
    from appliance.recipe import load_recipe

    recipe = Path(args.recipe).resolve()
    if load_recipe(recipe).recipe.finetune is None:
        raise ApplianceError(
            f"recipe {recipe} has no [finetune] table, so it would pre-train", f"add [finetune] with base = ..., or run it with `appliance run {recipe}`"
        )
    return start_and_follow(args, recipe=str(recipe))


def _from_axolotl(args: argparse.Namespace) -> int:
    from appliance.recipe import parse_recipe
    from keys.files import atomic_write_text
    from pipeline.errors import ConfigError
    from pipeline.finetune.axolotl import convert_axolotl

    path = Path(args.from_axolotl)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the Axolotl config {path}: {exc.strerror}", "check the path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the Axolotl config {path} is not UTF-8 text", "save it as UTF-8") from None
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.is_dir():
            raise ConfigError(f"--out {out} is a directory", "pass a file name, e.g. --out recipe.toml")
        if out.exists() and not args.force:
            raise ConfigError(f"--out {out} already exists", "pass --force to replace it, or choose another --out")
        if not out.parent.is_dir():
            raise ConfigError(f"--out {out}: the folder {out.parent} does not exist", "create it, or choose another --out")
    # Paths in the recipe are relative to the recipe's folder; printed, its folder is unknown: absolute.
    conversion = convert_axolotl(text, source=str(path), recipe_dir=out.resolve().parent if out else None)
    # The same check `appliance run` makes: a converted recipe that would not run is a bug here.
    parse_recipe(conversion.recipe_text, source=str(out) if out else f"recipe converted from {path}")
    for n in conversion.notes:
        print(f"  {n.line()}", file=sys.stderr)
    payload: dict[str, Any] = {"axolotl": str(path), "recipe": str(out) if out else None, "notes": [n._asdict() for n in conversion.notes]}
    if out is None:
        if args.json:
            emit(args, {**payload, "text": conversion.recipe_text}, "")
        else:
            sys.stdout.write(conversion.recipe_text)
        return 0
    try:
        atomic_write_text(out, conversion.recipe_text, mode=0o644, exclusive=not args.force)
    except FileExistsError:
        raise ConfigError(f"--out {out} already exists", "pass --force to replace it, or choose another --out") from None
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write the recipe ({exc.strerror})", "pass a path in a writable folder") from None
    emit(args, payload, f"wrote {out} ({len(conversion.notes)} notes above)\ncheck it with: appliance recipe check {out}")
    return 0


def register(sub: Any, add: Any) -> None:
    p = add("finetune", cmd_finetune)
    which = p.add_mutually_exclusive_group()
    which.add_argument("recipe", nargs="?", help="recipe TOML file with a [finetune] table: run it through the service")
    which.add_argument("--from-axolotl", metavar="FILE.yml", help="convert this Axolotl config into a recipe instead of running one")
    p.add_argument("--out", help="with --from-axolotl: write the recipe here (default: stdout); paths in it are then relative to its folder")
    p.add_argument("--force", action="store_true", help="with --out: replace an existing file")
