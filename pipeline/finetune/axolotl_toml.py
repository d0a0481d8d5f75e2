"""The recipe an Axolotl conversion writes: the recipe's own checks on its values, and its TOML text.

``pipeline.finetune.axolotl`` gathers each table as ``{name: (value, comment)}`` in the order the
values are written, the comment naming the Axolotl key (or default) the value came from, and each
``[[finetune.datasets]]`` entry as ``[(name, value), ...]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import collect, toml_value
from pipeline.errors import Problem
from pipeline.settings.finetune import FinetuneConfig
from pipeline.training.config import TrainConfig

Table = dict[str, tuple[Any, str]]


def recipe_problems(ft: Table, train: Table, gate: Table, datasets: list[list[tuple[str, Any]]], *, source: str, origin: dict[str, str]) -> list[Problem]:
    """The recipe's own checks on the mapped values, reported by the Axolotl key to change (``origin``: recipe key -> Axolotl key)."""
    problems: list[Problem] = []
    finetune: dict[str, Any] = {k: v for k, (v, _) in ft.items()}
    finetune["datasets"] = [dict(d) for d in datasets]
    if gate:
        finetune["gate"] = {k: v for k, (v, _) in gate.items()}
    for table, data, cls in (("finetune", finetune, FinetuneConfig), ("train", {k: v for k, (v, _) in train.items()}, TrainConfig)):
        for p in collect(cls, data, source=source, prefix=table)[1]:
            key = origin.get(p.key, p.key)
            problems.append(Problem(key, f"{key} gives {p.text()}", f"change {key} in {source}"))
    return problems


def recipe_text(ft: Table, train: Table, gate: Table, datasets: list[list[tuple[str, Any]]], *, source: str) -> str:
    """The recipe TOML: ``[recipe]`` named after ``source``, ``[finetune]`` with its datasets and gate, ``[train]``."""
    name = Path(source).name
    lines = [
        f"# Converted from the Axolotl config {name} by `appliance finetune --from-axolotl`.",
        "# Each comment names the Axolotl key (or default) a value came from. Paths are relative to this file, or absolute.",
        "",
        "[recipe]",
        f"name = {toml_text(Path(source).stem or 'axolotl')}",
        f"description = {toml_text(f'Fine-tune converted from the Axolotl config {name}')}",
        "",
        "[finetune]",
        *_rows(ft),
        "# allow_unsigned_base = true  # only for a base you trust without a model.sig; the choice is recorded in the ledger",
    ]
    for entry in datasets:
        lines += ["", "[[finetune.datasets]]", *(f"{k} = {toml_text(v)}" for k, v in entry)]
    if gate:
        lines += ["", "[finetune.gate]", *_rows(gate)]
    return "\n".join([*lines, "", "[train]", *_rows(train)]) + "\n"


def _rows(table: Table) -> list[str]:
    out = []
    for k, (v, why) in table.items():
        text = toml_text(v)
        out.append(f"# {why}\n{k} = {text}" if "\n" in text or len(why) > 100 else f"{k} = {text}  # {why}")
    return out


def toml_text(value: Any) -> str:
    """``value`` as TOML: a multi-line string as a literal block (templates stay readable)."""
    if isinstance(value, list):
        return "[" + ", ".join(toml_text(v) for v in value) + "]"
    if not isinstance(value, str):
        return toml_value(value)
    if "\n" in value and "'''" not in value and all(c in "\t\n" or (" " <= c and c != "\x7f") for c in value):
        return "'''\n" + value + "'''"
    # JSON's escapes are TOML's, but TOML also wants DEL escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
