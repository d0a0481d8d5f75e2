"""Evaluation report and the Hugging Face package (loads in transformers, logits match)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import from_mapping
from pipeline.errors import ConfigError, DataError, TrainingError
from pipeline.evaluate import EvalConfig, run_evaluate
from pipeline.generate import SampleConfig, generate_text, load_for_generation
from pipeline.model import load_checkpoint
from pipeline.package import PackageConfig, run_package
from pipeline.train import run_train
from tests.test_val_split import strip_val
from tests.training_fixtures import shards_dir, tiny_model, tiny_train, tokenizer_path  # noqa: F401  (fixtures)

PROVENANCE = {
    "run_id": "run-7f3a",
    "recipe_digest": "sha256:" + "ab" * 32,
    "inputs": {"shards": "sha256:" + "cd" * 32, "tokenizer": "sha256:" + "ef" * 32},
    "eval": {"val_loss": 3.25, "perplexity": 25.79},
    "note": "a | pipe",
}


@pytest.fixture(scope="module")
def checkpoint(shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train")
    return run_train(shards_dir, out, tiny_model(), tiny_train(steps=8)).outputs["checkpoint"]


def test_evaluate_reports_loss_perplexity_and_seeded_samples(checkpoint: Path, shards_dir: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    cfg = EvalConfig(max_batches=3, batch_size=2, seq_len=16, prompts=["the cat", "a dog sees"], max_new_tokens=6, device="cpu")
    seen: list[int] = []
    res = run_evaluate(checkpoint, shards_dir, tokenizer_path, tmp_path / "a", cfg, lambda d, t, f: seen.append(d))
    s = res.stats
    assert s["val_tokens"] == 3 * 2 * 16
    assert s["perplexity"] == pytest.approx(math.exp(s["val_loss"]))
    assert 0 < s["val_loss"] < math.log(300) + 1
    assert [x["prompt"] for x in s["samples"]] == ["the cat", "a dog sees"]
    assert all(isinstance(x["completion"], str) for x in s["samples"])
    assert seen == [1, 2, 3]
    report = json.loads(res.outputs["report"].read_text())
    assert res.outputs["report"] == tmp_path / "a" / "eval_report.json"
    assert report["val_loss"] == s["val_loss"] and report["samples"] == s["samples"]
    again = run_evaluate(checkpoint, shards_dir, tokenizer_path, tmp_path / "b", cfg)
    assert again.stats == s  # same checkpoint, same seed: same numbers and samples
    # The samples come from the sampler `appliance generate` uses, with the same settings.
    bundle = load_for_generation(checkpoint, tokenizer=tokenizer_path)
    expected = generate_text(bundle, cfg.prompts, SampleConfig(max_new_tokens=6, temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed))
    assert [x["completion"] for x in s["samples"]] == [g.text for g in expected]


def test_evaluate_seq_len_defaults_to_model_and_is_bounded(checkpoint: Path, shards_dir: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    res = run_evaluate(checkpoint, shards_dir, tokenizer_path, tmp_path, EvalConfig(max_batches=1, batch_size=2, max_new_tokens=0, prompts=[], device="cpu"))
    assert res.stats["seq_len"] == 32 and res.stats["val_tokens"] == 64
    with pytest.raises(ConfigError, match="evaluate.seq_len"):
        run_evaluate(checkpoint, shards_dir, tokenizer_path, tmp_path, EvalConfig(seq_len=64, device="cpu"))
    with pytest.raises(ConfigError, match=r"evaluate\.bogus"):
        from_mapping(EvalConfig, {"bogus": 1}, source="recipe.toml", prefix="evaluate")


def test_evaluate_calls_an_empty_val_split_a_recipe_problem_not_damage(checkpoint: Path, shards_dir: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    empty = strip_val(shards_dir, tmp_path / "empty")
    cfg = EvalConfig(max_batches=1, batch_size=2, seq_len=16, prompts=[], max_new_tokens=0, device="cpu")
    with pytest.raises(DataError) as err:
        run_evaluate(checkpoint, empty, tokenizer_path, tmp_path / "out", cfg)
    assert type(err.value) is DataError  # not ShardIntegrityError: nothing is damaged
    assert f"shard set {empty} has no validation tokens (its manifest lists 0 validation documents). It is not damaged" in err.value.message
    assert "damaged" not in err.value.hint and "[ingest] split" in err.value.hint and "[shard] val_fraction" in err.value.hint
    assert not (tmp_path / "out").exists()
    short = strip_val(shards_dir, tmp_path / "short", keep_val_tokens=20)
    with pytest.raises(DataError, match=r"holds 20 validation tokens, fewer than one evaluation window of 33 \(model\.max_seq_len = 32") as err:
        run_evaluate(checkpoint, short, tokenizer_path, tmp_path / "out", EvalConfig(max_batches=1, prompts=[], max_new_tokens=0, device="cpu"))
    assert "lower evaluate.seq_len" in err.value.hint
    assert run_evaluate(checkpoint, short, tokenizer_path, tmp_path / "out", cfg).stats["val_tokens"] == 16


def test_package_loads_in_transformers_with_matching_logits(checkpoint: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    res = run_package(checkpoint, tokenizer_path, tmp_path, PackageConfig(model_name="tiny"), PROVENANCE)
    model_dir = res.outputs["model"]
    assert model_dir == tmp_path / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    # Tied embeddings are stored once.
    assert "lm_head.weight" not in load_file(str(model_dir / "model.safetensors"))

    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    ours, _ = load_checkpoint(checkpoint)
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-4, rtol=1e-4)
    assert res.stats["parameters"] == ours.num_parameters() == hf.num_parameters()

    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    text = "the farmer paints a yellow kite."
    assert tok(text).input_ids == [1, *sp.encode(text)]
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")


def test_model_card_lists_provenance_and_architecture(checkpoint: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    res = run_package(
        checkpoint, tokenizer_path, tmp_path, PackageConfig(model_name="tiny-llama", license="apache-2.0", description="A test model."), PROVENANCE
    )
    card = (res.outputs["model"] / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n")
    assert "# tiny-llama" in card and "A test model." in card
    for value in ("run-7f3a", PROVENANCE["recipe_digest"], PROVENANCE["inputs"]["shards"], "3.25", "25.79"):
        assert value in card
    assert "| inputs.tokenizer |" in card and "| eval.val_loss | 3.25 |" in card
    assert "a \\| pipe" in card  # a pipe in a value does not break the table
    assert f"{res.stats['parameters']:,}" in card and "grouped-query attention" in card


def test_free_text_license_stays_valid_front_matter(checkpoint: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    text = "Internal use only: ACME Corp. terms"
    res = run_package(checkpoint, tokenizer_path, tmp_path, PackageConfig(license=text), {})
    card = (res.outputs["model"] / "README.md").read_text()
    assert card.startswith('---\nlicense: other\nlicense_name: "Internal use only: ACME Corp. terms"\n')
    assert f"License: {text}" in card


def test_package_is_deterministic_and_never_overwrites(checkpoint: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    a = run_package(checkpoint, tokenizer_path, tmp_path / "a", PackageConfig(), PROVENANCE).outputs["model"]
    b = run_package(checkpoint, tokenizer_path, tmp_path / "b", PackageConfig(), PROVENANCE).outputs["model"]
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    with pytest.raises(ConfigError, match="already exists"):
        run_package(checkpoint, tokenizer_path, tmp_path / "a", PackageConfig(), PROVENANCE)


def test_bfloat16_package_halves_the_weights(checkpoint: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    res = run_package(checkpoint, tokenizer_path, tmp_path, PackageConfig(dtype="bfloat16"), {})
    model_dir = res.outputs["model"]
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(model_dir / "model.safetensors")).values())
    assert json.loads((model_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert hf.dtype == torch.bfloat16
    assert "No provenance" in (model_dir / "README.md").read_text()


def test_package_refuses_a_tokenizer_larger_than_the_model(shards_dir: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    small = run_train(shards_dir, tmp_path / "t", tiny_model(), tiny_train(steps=1)).outputs["checkpoint"]
    cfg_path = small / "model_config.json"
    body = json.loads(cfg_path.read_text())
    body["model"]["vocab_size"] = 100
    cfg_path.write_text(json.dumps(body))
    with pytest.raises(TrainingError, match="tokenizer"):
        run_package(small, tokenizer_path, tmp_path / "p", PackageConfig(), {})
