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


def test_the_end_of_run_summary_shows_base_beside_tuned() -> None:
    from appliance.cli.summary import render_summary

    summary = {
        "run_id": "run-x", "recipe_name": "stdlib-demo-finetune", "recipe_digest": "d" * 64, "wall_s": 175.0,
        "model_digest": "a" * 64, "model_path": "/store/a", "public_key_file": "/home/keys/node.pub.pem", "home": "/home",
        "stats": {
            "base": {"model_type": "llama", "parameters": 2_340_000, "files": 8, "verification": "key", "signer": "71fe6aa1c7c82db9ff"},
            "examples": {"train_examples": 522, "val_examples": 18, "skipped": 0},
            "finetune": {"method": "lora", "steps": 200, "final_loss": 2.689, "tokens_per_s": 3811.0},
            "ft_evaluate": {
                "val_loss": 3.653, "perplexity": 38.6, "promoted": False, "reasons": ["chrf 16.4 < finetune.gate.min_chrf 20.0"],
                "base_scores": {"exact_match": 0.0, "bleu": 0.1, "chrf": 9.4}, "tuned_scores": {"exact_match": 0.0, "bleu": 5.3, "chrf": 16.4},
                "samples": [{"prompt": "What does `bdb.set_trace()` do?", "reference": "Start debugging.", "base": ">>> c", "tuned": "Return the list."}],
            },
            "ft_package": {"promoted": False, "packaged": False},
        },
    }  # fmt: skip
    payload, text = render_summary(summary, local=True)
    assert "NOT promoted (not packaged): chrf 16.4 < finetune.gate.min_chrf 20.0" in text
    assert "base  exact 0.00, BLEU 0.1, chrF 9.4" in text and "tuned exact 0.00, BLEU 5.3, chrF 16.4" in text
    assert "tuned     'Return the list.'" in text and "adapter id: sha256:" + "a" * 64 in text
    assert "appliance --home /home ledger verify" in text and payload["packaged"] is False
