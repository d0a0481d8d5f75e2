"""A seeded tiny run's loss curve against a committed file.

Catches silent changes to the model, initialisation, schedule, data order or optimizer: any
of them moves the curve. Regenerate with ``UPDATE_GOLDEN=1 pytest tests/test_loss_golden.py``
and say in the commit why the curve moved. The tolerance absorbs CPU-to-CPU float noise, not
behaviour changes (those shift losses by far more).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.train import run_train
from tests.training_fixtures import shards_dir, tiny_model, tiny_train, tokenizer_path  # noqa: F401

GOLDEN = Path(__file__).with_name("assets") / "losses" / "tiny_cpu.json"


def test_seeded_tiny_run_matches_the_committed_loss_curve(shards_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    result = run_train(shards_dir, tmp_path / "run", tiny_model(), tiny_train(steps=20, seed=1234))
    losses = [round(m["value"], 6) for m in result.metrics if m["name"] == "loss"]
    assert len(losses) == 20
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"steps": 20, "seed": 1234, "loss": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["loss"]
    assert losses == pytest.approx(golden, rel=1e-3, abs=1e-4)
