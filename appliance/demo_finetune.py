"""The fine-tuning demo's instruction set, built offline from the standard library.

Each public module-level function with a docstring gives one pair: the instruction names the
function with its signature ("What does `json.dumps(obj, *, skipkeys=False, ...)` do?") and
the response is the first sentence of its docstring. Read with ``ast`` (nothing is imported),
so the set is real documentation that needs no download; every tenth pair is held out as the
promotion gate's task file, so the tuned model is scored on functions it was not trained on.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance.demo import _stdlib_modules
from keys.files import atomic_write_text

# Enough pairs to move a small model in a few minutes on two cores.
MAX_PAIRS = 600
# One pair in HOLD_OUT becomes a task (scored, never trained on).
HOLD_OUT = 10
# A first sentence this long is a paragraph, not an answer.
MAX_ANSWER_CHARS = 160
_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)", re.S)


@dataclass(frozen=True)
class InstructionSet:
    folder: Path
    train: Path
    tasks: Path
    pairs: int
    held_out: int
    digest: str


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        args = ast.unparse(node.args)
    except (ValueError, AttributeError):
        return "..."
    return args if len(args) <= 60 else args[:57] + "..."


def _first_sentence(doc: str) -> str | None:
    text = " ".join(inspect.cleandoc(doc).split("\n\n", 1)[0].split())
    m = _SENTENCE.match(text)
    # A real sentence only: signatures copied into docstrings and notes without a full stop are not answers.
    if m is None or not m.group(1)[0].isupper():
        return None
    sentence = m.group(1)
    return sentence if 12 <= len(sentence) <= MAX_ANSWER_CHARS else None


def instruction_pairs(limit: int = MAX_PAIRS) -> list[tuple[str, str]]:
    """(instruction, response) pairs from the running Python's standard library, in a fixed order."""
    pairs: list[tuple[str, str]] = []
    for path, module in _stdlib_modules():
        if module.startswith("_") or "._" in module:
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                answer = _first_sentence(doc) if doc else None
                if answer:
                    pairs.append((f"What does `{module}.{node.name}({_signature(node)})` do?", answer))
                    if len(pairs) >= limit:
                        return pairs
    return pairs


def build_instruction_set(dest: Path, limit: int = MAX_PAIRS) -> InstructionSet:
    """Write ``train.jsonl`` (alpaca: instruction, input, output) and ``tasks.jsonl`` (prompt, reference)."""
    pairs = instruction_pairs(limit)
    train = [p for i, p in enumerate(pairs) if i % HOLD_OUT != HOLD_OUT - 1]
    tasks = [p for i, p in enumerate(pairs) if i % HOLD_OUT == HOLD_OUT - 1]
    dest.mkdir(parents=True, exist_ok=True)
    train_text = "".join(json.dumps({"instruction": q, "input": "", "output": a}, ensure_ascii=False) + "\n" for q, a in train)
    tasks_text = "".join(json.dumps({"prompt": q, "reference": a}, ensure_ascii=False) + "\n" for q, a in tasks)
    atomic_write_text(dest / "train.jsonl", train_text, mode=0o644)
    atomic_write_text(dest / "tasks.jsonl", tasks_text, mode=0o644)
    digest = hashlib.sha256((train_text + tasks_text).encode("utf-8")).hexdigest()
    return InstructionSet(dest, dest / "train.jsonl", dest / "tasks.jsonl", len(train), len(tasks), digest)


RECIPE = """# The fine-tuning demo: LoRA on the demo's own pre-trained model, with instructions built
# from Python {python}'s standard library (function signature -> first docstring sentence).
[recipe]
name = "stdlib-demo-finetune"
description = "LoRA on the stdlib demo model: describe a standard-library function from its signature"

[finetune]
base = "model:{digest}"
method = "lora"
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
packing = true
val_fraction = 0.05

[[finetune.datasets]]
path = "train.jsonl"
format = "alpaca"

[finetune.gate]
task_file = "tasks.jsonl"
max_new_tokens = 40

[train]
# The Alpaca prompt is ~60 tokens of the demo's tokenizer: 256 (its context) keeps every answer.
steps = 200
batch_size = 8
seq_len = 256
lr = 2e-3
min_lr = 2e-4
warmup_steps = 20
checkpoint_every = 100
log_every = 20
"""


def write_recipe(dest: Path, base_digest: str) -> Path:
    path = dest / "finetune.toml"
    atomic_write_text(path, RECIPE.format(python=sys.version.split()[0], digest=base_digest), mode=0o644)
    return path
