"""The fine-tuning demo's instruction set: real stdlib documentation, held-out tasks, a recipe that checks."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.demo_finetune import HOLD_OUT, build_instruction_set, instruction_pairs, write_recipe
from appliance.recipe import load_recipe


def test_pairs_are_signatures_and_first_sentences() -> None:
    pairs = instruction_pairs(200)
    assert len(pairs) == 200
    assert all(q.startswith("What does `") and q.endswith("` do?") and "(" in q for q, _ in pairs)
    assert all(a[-1] in ".!?" and "\n" not in a and len(a) <= 160 for _, a in pairs)
    assert instruction_pairs(200) == pairs  # a fixed order: the demo is reproducible


def test_tasks_are_held_out_from_training(tmp_path: Path) -> None:
    built = build_instruction_set(tmp_path / "set", limit=100)
    train = [json.loads(line) for line in built.train.read_text().splitlines()]
    tasks = [json.loads(line) for line in built.tasks.read_text().splitlines()]
    assert (len(train), len(tasks)) == (100 - 100 // HOLD_OUT, 100 // HOLD_OUT) == (built.pairs, built.held_out)
    assert set(t["prompt"] for t in tasks).isdisjoint(t["instruction"] for t in train)
    assert all(set(t) == {"instruction", "input", "output"} for t in train)
    again = build_instruction_set(tmp_path / "again", limit=100)
    assert again.digest == built.digest


def test_the_demo_recipe_checks(tmp_path: Path) -> None:
    build_instruction_set(tmp_path, limit=50)
    loaded = load_recipe(write_recipe(tmp_path, "ab" * 32))
    ft = loaded.recipe.finetune
    assert ft is not None and ft.base == "model:" + "ab" * 32 and ft.datasets[0].format == "alpaca" and ft.gate.task_file == "tasks.jsonl"
