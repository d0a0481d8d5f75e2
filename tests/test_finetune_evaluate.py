"""Fine-tuning evaluation: validation loss, base-vs-tuned task scores, the promotion gate and the report (tiny base, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
sacrebleu = pytest.importorskip("sacrebleu")

from pipeline.errors import DataError  # noqa: E402
from pipeline.finetune.evaluate import (  # noqa: E402
    Prompter,
    Scores,
    compare_on_tasks,
    gate_verdict,
    load_tasks,
    score_answers,
    validation_loss,
)
from pipeline.finetune.packing import Window  # noqa: E402
from pipeline.settings.finetune import DatasetConfig, FinetuneConfig, GateConfig  # noqa: E402
from tests.finetune_fixtures import build_tiny_base  # noqa: E402

# Answers in words the fixture tokenizer was trained on, so a few steps can teach them.
TASKS = [
    {"prompt": "What does a list hold?", "reference": "Items in order."},
    {"prompt": "What does open() return?", "reference": "A file object."},
    {"prompt": "How are errors handled?", "reference": "With try and except."},
]
VAL = {"prompt": "What is a string?", "reference": "Strings are immutable."}
MAX_NEW = 12


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(pair: dict[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["reference"]}]}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its final norm's gain raised 20-fold.

    At random init (embeddings std 0.02, tied to the frozen head) after a unit-RMS norm, no
    logit can move more than about 1.3, so adapters cannot make any answer likely: 30 steps
    took the loss only from 5.5 to 5.2 and greedy answers stayed blank. A trained base's head
    is not that flat; with the gain raised the same 30 steps take the loss from ~6.6 to ~2.3.
    """
    from safetensors.torch import load_file, save_file

    base = build_tiny_base(tmp_path_factory.mktemp("eval_llama") / "base")
    weights = load_file(str(base / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 20.0
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


@pytest.fixture(scope="module")
def tokenizer(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir, local_files_only=True)


@pytest.fixture(scope="module")
def trained(base_dir: Path, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A LoRA adapter trained 30 steps on the task pairs themselves (chat format), and what evaluating it needs."""
    from pipeline.finetune.examples import load_examples
    from pipeline.finetune.packing import build_windows, collate, pad_id_of
    from pipeline.finetune.spec import build_spec
    from pipeline.finetune.train import train_adapter
    from pipeline.training.config import TrainConfig

    root = tmp_path_factory.mktemp("eval_run")
    write_jsonl(root / "train.jsonl", [chat(t) for t in TASKS])
    write_jsonl(root / "val.jsonl", [chat(VAL)])
    tasks_file = write_jsonl(root / "tasks.jsonl", TASKS)
    fcfg = FinetuneConfig(
        base=str(base_dir),
        target_modules=["all-linear"],
        lora_dropout=0.0,
        datasets=[DatasetConfig(path="train.jsonl", format="chat"), DatasetConfig(path="val.jsonl", format="chat", split="val")],
        gate=GateConfig(task_file="tasks.jsonl", max_new_tokens=MAX_NEW),
    )
    examples = load_examples(fcfg, tokenizer, root)
    pad = pad_id_of(tokenizer)
    train_windows = build_windows(examples.train, 64, packing=True).windows
    batch = collate(train_windows, pad)
    cfg = TrainConfig(steps=30, batch_size=len(train_windows), seq_len=64, lr=2e-2, min_lr=2e-3, warmup_steps=2, checkpoint_every=30, log_every=10, seed=3)
    spec = build_spec(fcfg, base_dir)
    train_adapter(spec, lambda step, micro: batch, cfg, root / "run", device=torch.device("cpu"))
    return {
        "model": spec.model,
        "fcfg": fcfg,
        "tasks": load_tasks(tasks_file, "tasks.jsonl"),
        "examples": examples,
        "train_windows": train_windows,
        "val_windows": build_windows(examples.val, 64, packing=True).windows,
        "pad": pad,
    }


@pytest.fixture(scope="module")
def comparison(trained: dict[str, Any], tokenizer: Any) -> Any:
    return compare_on_tasks(trained["model"], Prompter(tokenizer, trained["fcfg"]), trained["tasks"], max_new_tokens=MAX_NEW)


# -- validation loss ---------------------------------------------------------------------------


def test_validation_loss_is_the_token_mean_over_both_windows(base_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    # Two unpacked windows of different lengths (so the batch pads) and different label counts.
    a = Window(input_ids=[1, 40, 41, 42, 43, 44, 45], labels=[-100, -100, -100, 42, 43, 44, 45], position_ids=list(range(7)), segments=[0] * 7)
    b = Window(input_ids=[1, 50, 51, 52], labels=[-100, -100, 51, 52], position_ids=list(range(4)), segments=[0] * 4)
    by_hand: list[float] = []
    with torch.no_grad():
        for w in (a, b):
            logits = model(input_ids=torch.tensor([w.input_ids])).logits[0]
            for t in range(len(w.labels) - 1):
                if w.labels[t + 1] != -100:
                    by_hand.append(float(torch.nn.functional.cross_entropy(logits[t], torch.tensor(w.labels[t + 1]))))
    expected = sum(by_hand) / len(by_hand)  # 4 tokens of a, 2 of b: each token weighs the same
    model.train()  # evaluation runs in eval mode and puts the mode back
    together = validation_loss(model, [a, b], 0, batch_size=2)
    apart = validation_loss(model, [a, b], 0, batch_size=1)
    assert together["tokens"] == apart["tokens"] == 6
    assert together["loss"] == pytest.approx(expected, abs=1e-5)
    assert apart["loss"] == pytest.approx(expected, abs=1e-5)
    assert together["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert model.training


def test_validation_loss_of_the_adapter_beats_the_base_on_its_training_pairs(trained: dict[str, Any]) -> None:
    model = trained["model"]
    tuned = validation_loss(model, trained["train_windows"], trained["pad"], batch_size=2)
    with model.disable_adapter():
        base = validation_loss(model, trained["train_windows"], trained["pad"], batch_size=2)
    assert tuned["loss"] < base["loss"]
    assert model.training  # train_adapter left it training; evaluation puts it back


def test_validation_loss_needs_windows(trained: dict[str, Any]) -> None:
    with pytest.raises(DataError, match="no validation windows"):
        validation_loss(trained["model"], [], trained["pad"], batch_size=2)


# -- scores ------------------------------------------------------------------------------------


def test_scores_are_sacrebleus_on_fixed_strings() -> None:
    hyps = ["the cat  sat on the mat ", "a dog barked", "Hello world"]
    refs = ["the cat sat on the mat", "a cat barked", "hello world"]
    scores = score_answers(hyps, refs)
    assert scores.exact_match == pytest.approx(1 / 3)  # whitespace normalised; case is not
    assert scores.bleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert scores.chrf == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert 0 < scores.bleu < 100 and 0 < scores.chrf < 100
    assert score_answers(refs, refs) == Scores(exact_match=1.0, bleu=pytest.approx(100.0), chrf=pytest.approx(100.0), count=3)


# -- base vs tuned -----------------------------------------------------------------------------


def test_prompts_render_as_training_rendered_them(tokenizer: Any, trained: dict[str, Any]) -> None:
    prompter = Prompter(tokenizer, trained["fcfg"])
    ids = prompter.ids(TASKS[0]["prompt"])
    assert tokenizer.decode(ids) == "<|im_start|>user\nWhat does a list hold?<|im_end|>\n<|im_start|>assistant\n"
    # The prompt's tokens are exactly the training example's up to where its loss starts.
    example = next(e for e in trained["examples"].train if e.input_ids[: len(ids)] == ids)
    assert example.labels[len(ids) - 1] == -100 and example.labels[len(ids)] != -100
    assert prompter.stop_ids == sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    assert prompter.answer(tokenizer("Items in order.<|im_end|>\nmore")["input_ids"]) == "Items in order."
    alpaca = Prompter(tokenizer, FinetuneConfig(base="b", datasets=[DatasetConfig(path="x.jsonl", format="alpaca")]))
    assert tokenizer.decode(alpaca.ids("Say hi")).endswith("### Instruction:\nSay hi\n\n### Response:\n")


def test_base_and_tuned_answers_are_both_reported_and_training_moved_them(comparison: Any) -> None:
    assert len(comparison.rows) == len(TASKS)
    assert [r.prompt for r in comparison.rows] == [t["prompt"] for t in TASKS]
    assert [r.reference for r in comparison.rows] == [t["reference"] for t in TASKS]
    assert any(r.base != r.tuned for r in comparison.rows), comparison.rows
    base, tuned = comparison.base, comparison.tuned
    assert tuned.chrf >= base.chrf and tuned.exact_match >= base.exact_match, (base, tuned, comparison.rows)
    assert tuned.chrf > base.chrf, (base, tuned)


def test_report_shows_base_beside_tuned(comparison: Any, trained: dict[str, Any], tmp_path: Path) -> None:
    from pipeline.finetune.report import write_report

    val = validation_loss(trained["model"], trained["val_windows"], trained["pad"], batch_size=2)
    verdict = gate_verdict(comparison.tuned, val, GateConfig(min_chrf=100.0))
    paths = write_report(tmp_path, val=val, verdict=verdict, comparison=comparison, extra={"base": "tiny"})
    assert [p.name for p in paths] == ["report.json", "report.md"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["base"] == "tiny" and data["validation"]["tokens"] == val["tokens"]
    assert data["tasks"]["tuned"]["chrf"] == comparison.tuned.chrf
    assert [r["tuned"] for r in data["tasks"]["rows"]] == [r.tuned for r in comparison.rows]
    assert data["verdict"]["status"] == "not promoted" and data["verdict"]["reasons"]
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict: not promoted**" in md and "finetune.gate.min_chrf" in md
    assert "| score | base | tuned |" in md
    for row in comparison.rows:
        assert row.prompt.replace("|", "\\|") in md


# -- the gate ----------------------------------------------------------------------------------


SCORES = Scores(exact_match=0.25, bleu=12.3, chrf=40.0, count=4)
VAL_LOSS = {"loss": 2.5, "perplexity": math.exp(2.5), "tokens": 100}


def test_gate_refuses_below_a_threshold_naming_the_key() -> None:
    verdict = gate_verdict(SCORES, VAL_LOSS, GateConfig(min_bleu=20.0, min_exact_match=0.2, max_val_loss=2.0))
    assert not verdict.promoted and verdict.status == "not promoted"
    assert verdict.reasons == ["bleu 12.3 < finetune.gate.min_bleu 20.0", "val_loss 2.5 > finetune.gate.max_val_loss 2.0"]
    assert verdict.thresholds == {"finetune.gate.min_exact_match": 0.2, "finetune.gate.min_bleu": 20.0, "finetune.gate.max_val_loss": 2.0}
    assert verdict.scores["bleu"] == 12.3 and verdict.scores["val_loss"] == 2.5


def test_gate_promotes_at_threshold_zero() -> None:
    verdict = gate_verdict(Scores(exact_match=0.0, bleu=0.0, chrf=0.0, count=3), VAL_LOSS, GateConfig())
    assert verdict.promoted and verdict.reasons == [] and verdict.thresholds == {}
    assert gate_verdict(None, VAL_LOSS, GateConfig()).promoted  # no task file, no task thresholds


def test_gate_refuses_what_it_cannot_measure() -> None:
    nan = Scores(exact_match=float("nan"), bleu=30.0, chrf=30.0, count=1)
    assert gate_verdict(nan, VAL_LOSS, GateConfig(min_exact_match=0.5)).reasons == ["exact_match nan < finetune.gate.min_exact_match 0.5"]
    (reason,) = gate_verdict(None, VAL_LOSS, GateConfig(min_chrf=10.0)).reasons
    assert "finetune.gate.min_chrf" in reason and "finetune.gate.task_file" in reason
    (reason,) = gate_verdict(SCORES, {"loss": float("inf")}, GateConfig()).reasons
    assert "val_loss is inf" in reason


# -- the task file -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "field", "words"),
    [
        ('{"prompt": "Q"}', "reference", "missing"),
        ('{"prompt": 3, "reference": "A"}', "prompt", "string"),
        ('{"prompt": "Q", "reference": "  "}', "reference", "empty"),
    ],
)
def test_malformed_task_line_names_file_line_and_field(tmp_path: Path, bad: str, field: str, words: str) -> None:
    path = write_jsonl(tmp_path / "tasks.jsonl", [TASKS[0], bad, TASKS[1]])
    with pytest.raises(DataError) as err:
        load_tasks(path, "gate/tasks.jsonl")
    assert err.value.message.startswith("gate/tasks.jsonl: line 2: ")
    assert f"'{field}'" in err.value.message and words in err.value.message
    assert "prompt" in err.value.hint and "reference" in err.value.hint


def test_task_file_reads_pairs_and_refuses_bad_json(tmp_path: Path) -> None:
    tasks = load_tasks(write_jsonl(tmp_path / "ok.jsonl", TASKS))
    assert [(t.prompt, t.reference, t.line) for t in tasks] == [(t["prompt"], t["reference"], i) for i, t in enumerate(TASKS, start=1)]
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: malformed JSON"):
        load_tasks(write_jsonl(tmp_path / "bad.jsonl", [TASKS[0], TASKS[1], '{"prompt": "Q", ']), "bad.jsonl")


def test_report_without_a_task_file(tmp_path: Path) -> None:
    from pipeline.finetune.report import write_report

    verdict = gate_verdict(None, {"loss": float("inf"), "perplexity": float("inf"), "tokens": 3}, GateConfig())
    write_report(tmp_path, val={"loss": float("inf"), "perplexity": float("inf"), "tokens": 3}, verdict=verdict)
    data = json.loads((tmp_path / "report.json").read_text())  # strict JSON: no bare Infinity
    assert data["tasks"] is None and data["validation"]["loss"] == "inf" and data["verdict"]["status"] == "not promoted"
    assert "no task scores" in (tmp_path / "report.md").read_text()


def test_gate_and_report_import_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, pipeline.finetune.report; sys.exit(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules) != [])"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], check=False).returncode == 0
