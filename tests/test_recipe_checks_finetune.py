"""A fine-tuning recipe is checked against its local base (config.json only) and the machine up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.recipe import load_recipe, parse_recipe
from appliance.recipe_checks import Machine, recipe_problems, recipe_summary, summary_text
from appliance.recipe_checks_ft import estimate, read_base, trainable_parameters
from pipeline.errors import ConfigError
from tests.conftest import cli

SMALL = Machine(memory_bytes=24 << 30, cpu_cores=2)
# Holds the tiny base with LoRA at a micro-batch of 16 tokens (about 0.9 MB), not its full
# fine-tune (fp32 weights, gradients and Adam state: 1.5 MB before activations).
TINY = Machine(memory_bytes=1 << 20, cpu_cores=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from tests.finetune_fixtures import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("ft") / "base")  # context 256


def _text(base: str = "base", train: str = "seq_len = 64\n", finetune: str = "") -> str:
    return (
        f'[recipe]\nname = "ft"\n[finetune]\nbase = "{base}"\nallow_unsigned_base = true\n{finetune}'
        f'[[finetune.datasets]]\npath = "train.jsonl"\n[train]\n{train}'
    )


def _recipe(folder: Path, base: Path, **kw: str) -> Path:
    """A recipe in ``folder`` next to a copy-free link to ``base`` (relative ``base = "base"``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "base").exists():
        (folder / "base").symlink_to(base, target_is_directory=True)
    path = folder / "ft.toml"
    path.write_text(_text(**kw))
    return path


def test_recipe_check_refuses_a_seq_len_past_the_bases_context(tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, base, train="seq_len = 512\n")
    code, out, err = cli(capsys, "recipe", "check", str(recipe))
    assert code == 2, out
    assert "train.seq_len = 512" in err and "256 positions" in err and "config.json" in err and "set train.seq_len = 256" in err
    assert "Traceback" not in err


def test_recipe_check_summarises_the_base(tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.finetune.base import inspect_base

    params = inspect_base(base).parameters
    recipe = _recipe(tmp_path, base)
    code, out, err = cli(capsys, "recipe", "check", str(recipe), "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["parameters"] == params and payload["context"] == 256
    assert payload["finetune"]["method"] == "lora" and payload["finetune"]["base_dir"] == str((tmp_path / "base").resolve())
    assert 0 < payload["trainable_parameters"] < params and payload["memory_bytes_per_process"] > 0
    code, out, err = cli(capsys, "recipe", "check", str(recipe))
    assert code == 0, err
    assert "fine-tune base" in out and f"{params / 1e3:,.1f}k parameters" in out and "with lora" in out and "trainable parameters" in out
    assert "no corpus named" not in out


def test_a_tiny_machine_refuses_a_full_fine_tune_but_holds_lora(tmp_path: Path, base: Path) -> None:
    _recipe(tmp_path, base)
    small_batch = "seq_len = 16\nbatch_size = 1\n"
    parse_recipe(_text(train=small_batch), source="ft.toml", machine=TINY, recipe_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        parse_recipe(_text(train=small_batch, finetune='method = "full"\n'), source="ft.toml", machine=TINY, recipe_dir=tmp_path)
    assert [p.key for p in err.value.problems] == ["finetune.method"], err.value.diagnostics()
    assert 'method = "full"' in err.value.message and "more than the 1 MiB of this machine's memory" in err.value.message
    assert "Adam state" in err.value.message and 'finetune.method = "lora"' in err.value.hint and "smaller base" in err.value.hint


def test_lora_that_does_not_fit_suggests_qlora(tmp_path: Path, base: Path) -> None:
    _recipe(tmp_path, base)
    with pytest.raises(ConfigError) as err:
        parse_recipe(_text(train="seq_len = 256\nbatch_size = 16\n"), source="ft.toml", machine=TINY, recipe_dir=tmp_path)
    assert [p.key for p in err.value.problems] == ["finetune.method"]
    assert "activations at train.batch_size = 16 × train.seq_len = 256" in err.value.message
    assert 'finetune.method = "qlora"' in err.value.hint and "gradient_checkpointing = true" in err.value.hint
    # QLoRA's base is smaller; gradient checkpointing keeps fewer activations.
    recipe = parse_recipe(_text(), source="ft.toml")
    found, _ = read_base(recipe, tmp_path)
    assert found is not None
    lora, qlora = estimate(recipe, SMALL, found), estimate(recipe, SMALL, found, "qlora")
    assert qlora.weights < lora.weights and qlora.trainable_state == lora.trainable_state
    checkpointed = parse_recipe(_text(finetune="gradient_checkpointing = true\n"), source="ft.toml")
    assert estimate(checkpointed, SMALL, found).activations < lora.activations


def test_a_step_budget_no_hardware_finishes_is_refused(tmp_path: Path, base: Path) -> None:
    _recipe(tmp_path, base)
    with pytest.raises(ConfigError) as err:
        parse_recipe(_text(train="steps = 9223372036854775807\n"), source="ft.toml", machine=SMALL, recipe_dir=tmp_path)
    assert [p.key for p in err.value.problems] == ["train.steps"] and "years" in err.value.message and "at most" in err.value.hint


def test_lora_trainable_parameters_are_peft_s(tmp_path: Path, base: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    recipe = parse_recipe(_text(), source="ft.toml")
    found, _ = read_base(recipe, base.parent)
    assert found is not None
    for targets in (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ["all-linear"]):
        fcfg = parse_recipe(_text(finetune=f"target_modules = {json.dumps(targets)}\nlora_r = 4\n"), source="ft.toml").finetune
        model = peft.get_peft_model(
            AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(r=4, target_modules=targets[0] if targets == ["all-linear"] else targets)
        )
        assert trainable_parameters(fcfg, found) == sum(p.numel() for p in model.parameters() if p.requires_grad), targets


def test_a_missing_base_is_named_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipe(_text(base="nowhere"), source="ft.toml", machine=SMALL, recipe_dir=tmp_path)
    assert [p.key for p in err.value.problems] == ["finetune.base"] and str(tmp_path / "nowhere") in err.value.message


def test_only_config_json_is_read(tmp_path: Path) -> None:
    # Weights that are not safetensors at all, and no tokenizer: the base stage refuses those;
    # the recipe check reads config.json only, so it finds the shape and nothing else.
    (tmp_path / "base").mkdir()
    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 320,
        "max_position_embeddings": 128,
    }
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    (tmp_path / "base" / "model.safetensors").write_bytes(b"\xff" * 64)
    problems = recipe_problems(parse_recipe(_text(train="seq_len = 200\n"), source="ft.toml"), SMALL, tmp_path)
    assert [p.key for p in problems] == ["train.seq_len"] and "128 positions" in problems[0].message
    # An unsupported architecture is named as the base stage names it.
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    problems = recipe_problems(parse_recipe(_text(), source="ft.toml"), SMALL, tmp_path)
    assert [p.key for p in problems] == ["finetune.base"] and "model_type 'gpt2'" in problems[0].message


def test_a_stored_base_is_left_to_the_run_and_the_summary_says_so() -> None:
    recipe = parse_recipe(_text(base="model:abcdef012345", train="seq_len = 100000\n"), source="ft.toml", machine=SMALL, recipe_dir=Path("/nonexistent"))
    summary = recipe_summary(recipe, SMALL, Path("/nonexistent"))
    assert summary["parameters"] is None and "service's store" in summary_text(summary)


def test_without_the_folder_the_base_is_not_read(tmp_path: Path, base: Path) -> None:
    # The service reads files its callers may not: load_recipe reads the base only when asked.
    recipe = _recipe(tmp_path, base, train="seq_len = 512\n")
    load_recipe(recipe, machine=SMALL)
    with pytest.raises(ConfigError):
        load_recipe(recipe, machine=SMALL, read_base=True)
