"""What an Axolotl conversion gives: its notes, the recipe's own checks on its values and on the
files it names (example counts, the base's chat template, a DeepSpeed JSON), and the recipe's TOML text.

``pipeline.finetune.axolotl`` gathers each table as ``{name: (value, comment)}`` in the order the
values are written, the comment naming the Axolotl key (or default) the value came from, and each
``[[finetune.datasets]]`` entry as ``[(name, value), ...]``. ``[distributed]`` is written only when
the config names an engine (``deepspeed``, ``fsdp``).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.config import collect, toml_value
from pipeline.errors import ConfigError, Problem
from pipeline.finetune.axolotl_keys import NPROC_COMMENT
from pipeline.settings.finetune import FinetuneConfig
from pipeline.training.config import DistConfig, TrainConfig

Table = dict[str, tuple[Any, str]]


class Note(NamedTuple):
    """What became of one Axolotl key: ``what`` starts with mapped / accepted / ignored / refused."""

    key: str
    what: str

    def line(self) -> str:
        return f"{self.key}: {self.what}"


@dataclass(frozen=True)
class Conversion:
    """The recipe TOML text, and one note per Axolotl key (then per dataset entry and its keys, fsdp option, fsdp_config key)."""

    recipe_text: str
    notes: list[Note]


def recipe_problems(
    ft: Table, train: Table, gate: Table, datasets: list[list[tuple[str, Any]]], *, source: str, origin: dict[str, str], dist: Table | None = None
) -> list[Problem]:
    """The recipe's own checks on the mapped values, reported by the Axolotl key to change (``origin``: recipe key -> Axolotl key)."""
    problems: list[Problem] = []
    finetune: dict[str, Any] = {k: v for k, (v, _) in ft.items()}
    finetune["datasets"] = [dict(d) for d in datasets]
    if gate:
        finetune["gate"] = {k: v for k, (v, _) in gate.items()}
    tables: list[tuple[str, dict[str, Any], type]] = [
        ("finetune", finetune, FinetuneConfig),
        ("train", _values(train), TrainConfig),
        ("distributed", _values(dist), DistConfig),  # empty: the defaults, which are valid
    ]
    for table, data, cls in tables:
        for p in collect(cls, data, source=source, prefix=table)[1]:
            key = origin.get(p.key, p.key)
            problems.append(Problem(key, f"{key} gives {p.text()}", f"change {key} in {source}"))
    return problems


def recipe_text(ft: Table, train: Table, gate: Table, datasets: list[list[tuple[str, Any]]], *, source: str, dist: Table | None = None) -> str:
    """The recipe TOML: ``[recipe]`` named after ``source``, ``[finetune]`` with its datasets and gate, ``[train]``, ``[distributed]``."""
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
    lines += ["", "[train]", *_rows(train)]
    if dist:
        lines += ["", "[distributed]", *_rows(dist), NPROC_COMMENT]
    return "\n".join(lines) + "\n"


def deepspeed_refusal(path: Path, train: Table) -> str:
    """Why the run would refuse the DeepSpeed JSON ``path`` under these ``[train]`` values ("" if it would not).

    The run checks the file again at its start (``pipeline.training.ds_config``), on its device and
    process count; this check uses one process on the CPU, as the converted recipe has until
    ``nproc_per_node`` is set. It is skipped while ``[train]`` has problems of its own.
    """
    from pipeline.training.ds_config import read_json, resolve_deepspeed_config

    cfg, problems = collect(TrainConfig, _values(train), source=str(path), prefix="train")
    if cfg is None or problems:
        return ""
    try:
        resolve_deepspeed_config(read_json(path), cfg, 1, "cpu", source=str(path))
    except ConfigError as exc:
        return f"{exc.message} ({exc.hint})"
    return ""


def count_examples(path: Path) -> int | None:
    """Non-blank lines of a JSONL file (one example each); None for formats not counted here."""
    name = path.name.lower()
    if not name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return None
    opener: Any = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except (OSError, EOFError):
        return None


def has_template(base: Path) -> bool:
    """Whether the base model directory ``base`` carries a chat template of its own."""
    try:
        config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    template = config.get("chat_template") if isinstance(config, dict) else None
    return bool(template) or (base / "chat_template.jinja").is_file() or (base / "chat_template.json").is_file()


def quoted(value: Any) -> str:
    """``value`` as a message quotes it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _values(table: Table | None) -> dict[str, Any]:
    return {k: v for k, (v, _) in (table or {}).items()}


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
