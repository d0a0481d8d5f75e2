"""The ``[finetune]`` datasets -> rendered training and validation examples, and the skips to record.

The training job calls ``load_examples(config, tokenizer, root)`` and then, per split,
``pipeline.finetune.packing.build_windows`` and ``collate``. Reading is
``pipeline.finetune.records``, the per-format checks ``pipeline.finetune.formats``, the token
rendering ``pipeline.finetune.render``.

A malformed example (bad JSON, a missing or mistyped field, a message without role or
content, an unknown role, an empty response, a tool call that is not an object with name and
arguments, JSON nested absurdly deep) stops the run with a ``DataError`` naming the file, the
line (Parquet: row) and the field when ``[finetune] on_error = "fail"``; with ``"skip"`` it is
left out and returned as a ``Skip`` for the ledger. A dataset of which nothing is usable is an
error in both modes.

Validation: the examples of ``split = "val"`` datasets, else the share ``val_fraction`` of the
training examples whose sha256 of rendered token ids falls lowest (stable across runs and
machines, and identical examples land on the same side, so a duplicate cannot leak the answer
into validation). A validation loss is always measured: if the share would hold no example,
the one with the lowest hash is held out (two examples or more), else the run stops.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.finetune.formats import check
from pipeline.finetune.records import Malformed, Record, Skip, read_records
from pipeline.finetune.render import Example, Renderer
from pipeline.settings.finetune import DatasetConfig, FinetuneConfig

# What the user can do about each kind of malformed example.
HINTS = {
    "malformed_json": "fix or delete that line; each line of a .jsonl file is one JSON object",
    "not_object": "each line of a .jsonl file must be one JSON object (one example)",
    "missing_field": "set the [[finetune.datasets]] field names (field, field_messages, field_instruction, ...) to the file's, or fix the example",
    "wrong_type": "fix the example: the field's shape is given in the message",
    "empty": "drop examples without a response, or fill them in",
    "unknown_role": 'use the roles system, user, assistant (and tool, with format = "tools"), or map the file\'s roles to them',
    "bad_message": 'each message is {"role": ..., "content": "..."}; fix the example',
    "bad_tool_call": 'a tool call is {"type": "function", "function": {"name": "...", "arguments": {...}}}; fix the example',
    "too_deep": "an example nests a few levels of JSON; fix or delete that line",
    "not_utf8": "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)",
    "malformed_csv": "fix the record (quotes doubled inside quoted fields), or re-export the CSV",
    "no_loss": "give the example a response (a turn of a role in [finetune] roles_to_train, a segment labelled true), or drop it",
    "template_mismatch": "set [finetune] chat_template to a template that renders each turn on its own (or give the base one), e.g. ChatML",
}
SKIP_HINT = 'or set [finetune] on_error = "skip" to leave malformed examples out (each is counted and recorded)'


@dataclass(slots=True)
class ExampleSet:
    train: list[Example]
    val: list[Example]
    # Every example left out (on_error = "skip"), to record in the ledger and the run summary.
    skips: list[Skip] = field(default_factory=list)
    # Records read, skipped ones included.
    read: int = 0


def load_examples(config: FinetuneConfig, tokenizer: Any, root: Path) -> ExampleSet:
    """Read, check and render every dataset of ``config`` (paths relative to ``root``), then split off validation."""
    renderer = Renderer(tokenizer, config)
    train: list[Example] = []
    val: list[Example] = []
    skips: list[Skip] = []
    read = 0
    for dataset in config.datasets:
        examples, skipped, count = read_dataset(root / dataset.path, dataset, renderer, config, label=dataset.path)
        (val if dataset.split == "val" else train).extend(examples)
        skips += skipped
        read += count
    if not train:
        raise DataError(
            '[finetune] datasets: no training examples (every dataset is split = "val")',
            'add a [[finetune.datasets]] table with split = "train" (the default)',
        )
    if not val:
        train, val = split_validation(train, config.val_fraction)
    return ExampleSet(train, val, skips, read)


def read_dataset(path: Path, dataset: DatasetConfig, renderer: Renderer, config: FinetuneConfig, *, label: str = "") -> tuple[list[Example], list[Skip], int]:
    """(examples, skips, records read) of one dataset file; raises ``DataError`` on the first bad example in fail mode."""
    name = label or str(path)
    examples: list[Example] = []
    skips: list[Skip] = []
    count = 0
    for item in _rendered(path, name, dataset, renderer, config):
        count += 1
        if isinstance(item, Example):
            examples.append(item)
            continue
        if config.on_error == "fail":
            raise DataError(item.text(), f"{HINTS.get(item.reason, 'fix the example')}; {SKIP_HINT}")
        skips.append(item)
    if not examples:
        first = f" (the first: {skips[0].text()})" if skips else ""
        raise DataError(
            f"{name}: no usable example in the file: {len(skips)} of {count} records were malformed{first}",
            f"check [[finetune.datasets]] format = {dataset.format!r} and the field names against the file",
        )
    return examples, skips, count


def _rendered(path: Path, name: str, dataset: DatasetConfig, renderer: Renderer, config: FinetuneConfig) -> Iterator[Example | Skip]:
    for item in read_records(path, name):
        if isinstance(item, Skip):
            yield item
            continue
        try:
            yield _render(item, dataset, renderer, config)
        except Malformed as bad:
            yield Skip(item.file, item.line, bad.field, bad.reason, bad.detail, item.unit)


def _render(record: Record, dataset: DatasetConfig, renderer: Renderer, config: FinetuneConfig) -> Example:
    checked = check(record.fields, dataset, config.roles_to_train)
    ids, labels = renderer.render(checked)
    example = Example(ids, labels, record.file, record.line)
    if not example.trained:
        field_name = {"completion": dataset.field, "alpaca": dataset.field_output, "input_output": "segments"}.get(dataset.format, dataset.field_messages)
        raise Malformed(field_name, "no_loss", "renders to no token that carries loss")
    return example


def example_hash(example: Example) -> int:
    """A stable 64-bit hash of the rendered token ids (same ids, same hash, on every machine)."""
    digest = hashlib.sha256(",".join(map(str, example.input_ids)).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big")


def split_validation(examples: list[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    """(train, val): the ``val_fraction`` of ``examples`` with the lowest hashes held out, at least one, never all."""
    if len(examples) < 2:
        raise DataError(
            f'[finetune] datasets hold {len(examples)} training example and no split = "val" dataset: nothing to hold out for validation',
            '[finetune] val_fraction needs two examples or more; add examples, or a [[finetune.datasets]] table with split = "val"',
        )
    hashed = sorted(((example_hash(e), i) for i, e in enumerate(examples)))
    cut = 2**64 * val_fraction
    held = {i for h, i in hashed if h < cut}
    if not held:
        held = {hashed[0][1]}
    if len(held) == len(examples):
        held.discard(hashed[-1][1])  # training needs an example too
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val
