"""Axolotl configs convert into recipes: every key accounted for, the recipe checked, refusals named at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.recipe import Recipe, load_recipe, parse_recipe
from pipeline.errors import ConfigError
from pipeline.finetune import axolotl
from pipeline.finetune.axolotl import Conversion, convert_axolotl
from pipeline.training.ds_config import read_json, resolve_deepspeed_config
from tests.conftest import ASSETS, cli

# A real QLoRA project's config, as its authors trained it with Axolotl (base_model is replaced
# by a local directory in each test: the appliance never downloads).
QLORA_PROJECT = """\
base_model: Qwen/Qwen2.5-Coder-7B-Instruct
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer
trust_remote_code: false
load_in_4bit: true
adapter: lora
lora_model_dir: null
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules: [q_proj, v_proj, k_proj, o_proj]
lora_target_linear: false
lora_fan_in_fan_out: false
datasets:
  - path: data/processed/train.jsonl
    type: completion
    field: text
val_set_size: 0.0
test_datasets:
  - path: data/processed/val.jsonl
    type: completion
    field: text
sequence_len: 512
sample_packing: false
pad_to_sequence_len: true
micro_batch_size: 1
gradient_accumulation_steps: 4
eval_batch_size: 1
num_epochs: 1
max_steps: 500
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
warmup_steps: 50
bf16: true
fp16: false
tf32: false
gradient_checkpointing: true
output_dir: models/checkpoints
save_strategy: steps
save_steps: 100
save_total_limit: 3
eval_strategy: steps
eval_steps: 50
logging_steps: 10
wandb_project: cli-tuner
wandb_run_name: phase2-training-v1
wandb_log_model: false
special_tokens: {}
"""

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(autouse=True)
def _bitsandbytes_here(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests decide whether bitsandbytes is installed; the machine running them does not.
    monkeypatch.setattr(axolotl, "bitsandbytes_available", lambda: True)


def make_project(root: Path, *, template: bool = True, lines: int = 3) -> Path:
    """A project folder as Axolotl users have it: a base model directory and data files."""
    base = root / "models" / "qwen"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML} if template else {}))
    data = root / "data" / "processed"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "val.jsonl", "chat.jsonl", "alpaca.jsonl", "segments.jsonl"):
        (data / name).write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(lines)))
    return root


def project_config(**changes: Any) -> dict[str, Any]:
    config = yaml.safe_load(QLORA_PROJECT)
    config["base_model"] = "models/qwen"
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def convert(root: Path, config: dict[str, Any] | str, **kw: Any) -> Conversion:
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    (root / "axolotl.yml").write_text(text)
    return convert_axolotl(text, source=str(root / "axolotl.yml"), recipe_dir=kw.pop("recipe_dir", root), **kw)


def recipe_of(conversion: Conversion) -> Recipe:
    return parse_recipe(conversion.recipe_text, source="converted.toml")


def refusal(root: Path, config: dict[str, Any] | str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        convert(root, config)
    return caught.value


def test_the_qlora_project_config_converts_with_only_base_model_changed(tmp_path: Path) -> None:
    make_project(tmp_path)
    text = QLORA_PROJECT.replace("Qwen/Qwen2.5-Coder-7B-Instruct", "models/qwen")
    conversion = convert(tmp_path, text)
    recipe = recipe_of(conversion)
    ft, train = recipe.finetune, recipe.train
    assert ft is not None
    assert ft.base == "models/qwen" and ft.method == "qlora" and ft.bnb_4bit_compute_dtype == "bfloat16"
    assert (ft.lora_r, ft.lora_alpha, ft.lora_dropout) == (8, 16, 0.05)
    assert ft.target_modules == ["q_proj", "v_proj", "k_proj", "o_proj"]
    assert ft.packing is False and ft.gradient_checkpointing is True and ft.train_on_inputs is False and ft.val_fraction == 0.0
    assert [(d.path, d.format, d.field, d.split) for d in ft.datasets] == [
        ("data/processed/train.jsonl", "completion", "text", "train"),
        ("data/processed/val.jsonl", "completion", "text", "val"),
    ]
    assert (train.seq_len, train.steps, train.batch_size, train.grad_accum) == (512, 500, 1, 4)
    assert (train.lr, train.schedule, train.min_lr, train.warmup_steps) == (0.0002, "cosine", 0.0, 50)
    assert (train.precision, train.tf32, train.weight_decay, train.beta2) == ("bf16", False, 0.0, 0.999)
    assert (train.checkpoint_every, train.keep_last, train.eval_every, train.log_every) == (100, 3, 50, 10)
    # Every key has one note, in the config's order; dataset entries have theirs after their list.
    top = [n.key for n in conversion.notes if "[" not in n.key]
    assert top == list(yaml.safe_load(text))
    assert all(n.what.startswith(("mapped to ", "accepted: ", "ignored: ", "refused: ")) for n in conversion.notes)
    notes = dict(conversion.notes)
    for key in ("wandb_project", "wandb_run_name"):
        assert notes[key].startswith("refused: nothing leaves the appliance") and "TensorBoard" in notes[key]
    assert notes["wandb_log_model"].startswith("ignored: ")
    assert notes["optimizer"].startswith("ignored: ") and "AdamW" in notes["optimizer"] and "resume" in notes["optimizer"]
    assert notes["output_dir"].startswith("ignored: ") and "home" in notes["output_dir"]
    assert notes["load_in_4bit"] == 'mapped to finetune.method = "qlora"'
    assert notes["max_steps"] == "mapped to train.steps = 500"
    assert "model.sig" in notes["base_model"]
    assert "datasets[0]" in notes and "test_datasets[0]" in notes


def test_missing_bitsandbytes_names_the_key_and_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(axolotl, "bitsandbytes_available", lambda: False)
    make_project(tmp_path)
    error = refusal(tmp_path, project_config())
    assert [p.key for p in error.problems] == ["load_in_4bit"]
    assert "needs bitsandbytes" in error.diagnostics() and "pip install bitsandbytes" in error.diagnostics()
    # Plain LoRA needs no bitsandbytes, and the 8-bit optimizer is torch AdamW here.
    recipe = recipe_of(convert(tmp_path, project_config(load_in_4bit=False)))
    assert recipe.finetune is not None and recipe.finetune.method == "lora"


def test_what_cannot_be_honoured_fails_naming_every_key_at_once(tmp_path: Path) -> None:
    make_project(tmp_path)
    config = project_config(base_model="Qwen/Qwen2.5-Coder-7B-Instruct", trust_remote_code=True, optimizer="lion_8bit", rl="dpo")
    error = refusal(tmp_path, config)
    assert {p.key for p in error.problems} == {"base_model", "trust_remote_code", "optimizer", "rl"}
    text = error.diagnostics()
    assert "4 problems" in text and "not a local directory" in text and "never downloads" in text
    assert "no code from a model directory runs" in text and "convert it again" in text


def test_a_hub_base_model_alone_says_to_point_it_at_a_local_directory(tmp_path: Path) -> None:
    make_project(tmp_path)
    error = refusal(tmp_path, project_config(base_model="Qwen/Qwen2.5-Coder-7B-Instruct"))
    assert error.problems[0].key == "base_model" and "Qwen/Qwen2.5-Coder-7B-Instruct" in error.message
    assert "point base_model at that directory" in error.hint
    (tmp_path / "empty").mkdir()
    assert "no config.json" in refusal(tmp_path, project_config(base_model="empty")).message


def test_axolotl_dataset_types_map_to_recipe_formats(tmp_path: Path) -> None:
    make_project(tmp_path)
    datasets = [
        {"path": "data/processed/train.jsonl", "type": "completion", "field": "body"},
        {"path": "data/processed/alpaca.jsonl", "type": "alpaca"},
        {
            "path": "data/processed/chat.jsonl",
            "type": "chat_template",
            "field_messages": "conversations",
            "roles_to_train": ["assistant", "tool"],
            "chat_template": "tokenizer_default",
            "message_property_mappings": {"role": "role", "content": "content"},
        },
        {"path": "data/processed/segments.jsonl", "type": "input_output"},
        {"path": "json", "ds_type": "json", "data_files": ["data/processed/chat.jsonl"], "type": "chat_template", "field_tools": "tools"},
    ]
    conversion = convert(tmp_path, project_config(datasets=datasets, test_datasets=None, val_set_size=0.1))
    ft = recipe_of(conversion).finetune
    assert ft is not None
    got = [(d.path.rsplit("/", 1)[-1], d.format, d.field, d.field_messages) for d in ft.datasets]
    assert got == [
        ("train.jsonl", "completion", "body", "messages"),
        ("alpaca.jsonl", "alpaca", "text", "messages"),
        ("chat.jsonl", "chat", "text", "conversations"),
        ("segments.jsonl", "input_output", "text", "messages"),
        ("chat.jsonl", "tools", "text", "messages"),
    ]
    assert ft.roles_to_train == ["assistant", "tool"] and ft.chat_template == "" and ft.val_fraction == 0.1
    notes = dict(conversion.notes)
    assert notes["datasets[2].message_property_mappings"].startswith("accepted")
    assert notes["datasets[4].ds_type"].startswith("accepted")


def test_chat_templates_by_name_and_as_jinja(tmp_path: Path) -> None:
    make_project(tmp_path, template=False)
    chat = [{"path": "data/processed/chat.jsonl", "type": "chat_template"}]
    base = project_config(datasets=chat, test_datasets=None)
    error = refusal(tmp_path, base)
    assert "has no chat template" in error.message and "chat_template_jinja" in error.hint
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    conversion = convert(tmp_path, {**base, "chat_template": "jinja", "chat_template_jinja": jinja})
    ft = recipe_of(conversion).finetune
    assert ft is not None and ft.chat_template == jinja
    assert dict(conversion.notes)["chat_template_jinja"].startswith("mapped to finetune.chat_template")
    ft = recipe_of(convert(tmp_path, {**base, "chat_template": "chatml"})).finetune
    assert ft is not None and "<|im_start|>" in ft.chat_template
    assert "not built in" in refusal(tmp_path, {**base, "chat_template": "llama3"}).message


def test_num_epochs_without_max_steps_is_estimated_from_jsonl_lines(tmp_path: Path) -> None:
    make_project(tmp_path, lines=40)
    config = project_config(max_steps=None, num_epochs=3, micro_batch_size=2, gradient_accumulation_steps=2, test_datasets=None, val_set_size=0.1)
    conversion = convert(tmp_path, config)
    assert recipe_of(conversion).train.steps == 27  # ceil(3 epochs x 40 examples x 0.9 kept / 4 per step)
    assert "estimated" in dict(conversion.notes)["num_epochs"]
    error = refusal(tmp_path, {**config, "sample_packing": True})
    assert error.problems[0].key == "num_epochs" and "set max_steps" in error.hint


def test_trainer_defaults_and_other_spellings(tmp_path: Path) -> None:
    make_project(tmp_path)
    text = QLORA_PROJECT.replace("Qwen/Qwen2.5-Coder-7B-Instruct", "models/qwen").replace("learning_rate: 0.0002", "learning_rate: 2e-4")
    text = text.replace("warmup_steps: 50", "warmup_ratio: 0.1\ncosine_min_lr_ratio: 0.1").replace("lora_target_linear: false", "lora_target_linear: true")
    text = text.replace("save_steps: 100", "save_steps: 0.25").replace("adapter: lora", "adapter: qlora")
    train = recipe_of(c := convert(tmp_path, text)).train
    assert (train.lr, train.warmup_steps, train.checkpoint_every) == (0.0002, 50, 125)
    assert train.min_lr == pytest.approx(0.00002)
    ft = recipe_of(c).finetune
    assert ft is not None and ft.target_modules == ["all-linear"] and ft.method == "qlora"
    constant = recipe_of(convert(tmp_path, project_config(lr_scheduler="constant"))).train
    assert (constant.schedule, constant.warmup_steps) == ("constant", 0)
    full = recipe_of(convert(tmp_path, project_config(adapter=None, load_in_4bit=False))).finetune
    assert full is not None and full.method == "full"
    assert "fraction" in refusal(tmp_path, project_config(val_set_size=200)).message
    assert "lr_scheduler: linear" in refusal(tmp_path, project_config(lr_scheduler="linear")).message


def test_values_the_recipe_refuses_are_reported_by_their_axolotl_key(tmp_path: Path) -> None:
    make_project(tmp_path)
    error = refusal(tmp_path, project_config(lora_dropout=1.5, warmup_steps=-1))
    assert {p.key for p in error.problems} == {"lora_dropout", "warmup_steps"}
    assert "lora_dropout gives finetune.lora_dropout must be in [0, 1)" in error.message


def test_unknown_keys_special_tokens_and_remote_settings(tmp_path: Path) -> None:
    make_project(tmp_path)
    config = project_config(
        my_own_setting=3, special_tokens={"pad_token": "<|endoftext|>"}, hub_model_id="me/model", wandb_mode="disabled", flash_attention=True
    )
    notes = dict(convert(tmp_path, config).notes)
    assert notes["my_own_setting"] == "ignored: unknown to this converter"
    assert notes["special_tokens"].startswith("ignored: padding")
    assert notes["hub_model_id"].startswith("refused: nothing leaves the appliance") and "appliance model export" in notes["hub_model_id"]
    assert notes["wandb_mode"].startswith("ignored: off")
    assert notes["flash_attention"].startswith("ignored: a kernel choice")
    error = refusal(tmp_path, project_config(special_tokens={"eos_token": "</s>"}, fp16=True, lora_model_dir="out/adapter"))
    assert {p.key for p in error.problems} == {"special_tokens", "fp16", "lora_model_dir"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("base_model: [unclosed\n", "not valid YAML at line 2"),
        ("- just\n- a list\n", "got a list"),
        ("", "got an empty document"),
        ("lora_r: eight\n", "lora_r must be a whole number, got 'eight'"),
        ("1: x\n", "setting names must be text"),
        ("!!python/object:os.system {}\n", "not valid YAML"),
    ],
)
def test_yaml_problems_are_config_errors_naming_file_and_key(tmp_path: Path, text: str, words: str) -> None:
    make_project(tmp_path)
    if text.startswith("lora_r"):
        text = QLORA_PROJECT.replace("Qwen/Qwen2.5-Coder-7B-Instruct", "models/qwen").replace("lora_r: 8\n", text)
    error = refusal(tmp_path, text)
    assert words in error.message and "axolotl.yml" in error.message


def test_cli_prints_the_recipe_and_notes_and_writes_only_with_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path)
    path = tmp_path / "qlora.yml"
    path.write_text(QLORA_PROJECT.replace("Qwen/Qwen2.5-Coder-7B-Instruct", "models/qwen"))
    code, out, err = cli(capsys, "finetune", "--from-axolotl", str(path))
    assert code == 0, err
    recipe = parse_recipe(out, source="stdout")
    assert recipe.finetune is not None and recipe.finetune.base == str(tmp_path / "models" / "qwen")  # printed: absolute
    assert "  wandb_project: refused: nothing leaves the appliance" in err and "  lora_r: mapped to finetune.lora_r = 8" in err
    target = tmp_path / "recipes" / "qlora.toml"
    target.parent.mkdir()
    code, out, err = cli(capsys, "finetune", "--from-axolotl", str(path), "--out", str(target))
    assert code == 0, err
    assert "wrote" in out and "appliance recipe check" in out
    loaded = load_recipe(target)
    assert loaded.recipe.finetune is not None and loaded.recipe.finetune.base == str(tmp_path / "models" / "qwen")
    code, out, err = cli(capsys, "finetune", "--from-axolotl", str(path), "--out", str(target))
    assert code == 2 and "already exists" in err and "--force" in err
    beside = tmp_path / "qlora.toml"
    assert cli(capsys, "finetune", "--from-axolotl", str(path), "--out", str(beside))[0] == 0
    assert load_recipe(beside).recipe.finetune.datasets[0].path == "data/processed/train.jsonl"  # type: ignore[union-attr]
    code, out, err = cli(capsys, "finetune", "--from-axolotl", str(path), "--out", str(beside), "--force", "--json")
    assert code == 0 and json.loads(out)["recipe"] == str(beside)


def test_cli_refusals_and_bad_yaml_end_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path)
    path = tmp_path / "bad.yml"
    path.write_text("base_model: [oops\n")
    code, _, err = cli(capsys, "finetune", "--from-axolotl", str(path))
    assert code == 2 and "not valid YAML" in err and "Traceback" not in err
    path.write_text(QLORA_PROJECT)
    code, out, err = cli(capsys, "finetune", "--from-axolotl", str(path))
    assert code == 2 and out == "" and "base_model" in err and "never downloads" in err and "Traceback" not in err
    code, _, err = cli(capsys, "finetune", "--from-axolotl", str(tmp_path / "missing.yml"))
    assert code == 2 and "cannot read" in err


def test_finetune_needs_a_recipe_with_a_finetune_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = cli(capsys, "finetune")
    assert code == 2 and "--from-axolotl" in err
    code, _, err = cli(capsys, "finetune", str(tmp_path / "recipe.toml"))
    assert code == 2 and "cannot read recipe" in err and "Traceback" not in err
    plain = tmp_path / "plain.toml"
    plain.write_text('[recipe]\nname = "x"\n')
    code, _, err = cli(capsys, "finetune", str(plain))
    assert code == 2 and "no [finetune] table" in err and "appliance run" in err
    with pytest.raises(SystemExit):
        cli(capsys, "finetune", "recipe.toml", "--from-axolotl", "x.yml")


# -- deepspeed / fsdp: the engine of a full fine-tune ([distributed]) ----------------------------------

ZERO2 = ASSETS / "deepspeed" / "zero2.json"


def full_config(**changes: Any) -> dict[str, Any]:
    """The project's config without an adapter: every weight trains (finetune.method = "full")."""
    return project_config(adapter=None, load_in_4bit=False, **changes)


def top_keys(conversion: Conversion) -> list[str]:
    """The notes' keys without those of dataset entries, fsdp options and fsdp_config keys."""
    return [n.key for n in conversion.notes if "[" not in n.key and "." not in n.key]


def test_deepspeed_maps_to_the_distributed_table_with_the_json_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(tmp_path)
    (tmp_path / "ds").mkdir()
    shutil.copyfile(ZERO2, tmp_path / "ds" / "zero2.json")
    config = full_config(deepspeed="ds/zero2.json")
    conversion = convert(tmp_path, config)
    recipe = recipe_of(conversion)
    assert recipe.finetune is not None and recipe.finetune.method == "full"
    assert (recipe.distributed.engine, recipe.distributed.deepspeed_config) == ("deepspeed", "ds/zero2.json")
    assert '[distributed]\nengine = "deepspeed"  # deepspeed\ndeepspeed_config = "ds/zero2.json"  # deepspeed\n' in conversion.recipe_text
    assert "# nproc_per_node = " in conversion.recipe_text  # commented: Axolotl's launcher chose the count
    notes = dict(conversion.notes)
    assert notes["deepspeed"].startswith('mapped to distributed.engine = "deepspeed", deepspeed_config = "ds/zero2.json"')
    assert "refuse" not in notes["deepspeed"] and top_keys(conversion) == list(config)
    # The file the recipe names passes the check the run makes at its start, against the recipe's [train].
    resolved, _ = resolve_deepspeed_config(read_json(tmp_path / recipe.distributed.deepspeed_config), recipe.train, 1, "cpu", source="zero2.json")
    assert resolved["zero_optimization"]["stage"] == 2 and resolved["gradient_accumulation_steps"] == 4
    # Outside the recipe's folder, or printed (its folder unknown): absolute.
    outside = recipe_of(convert(tmp_path, full_config(deepspeed=str(ZERO2))))
    assert outside.distributed.deepspeed_config == str(ZERO2.resolve())
    path = tmp_path / "full.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    code, out, err = cli(capsys, "finetune", "--from-axolotl", str(path))
    assert code == 0, err
    assert parse_recipe(out, source="stdout").distributed.deepspeed_config == str(tmp_path / "ds" / "zero2.json")
    # A JSON the run would refuse still converts; the note says what the run will say.
    (tmp_path / "ds" / "own.json").write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    note = dict(convert(tmp_path, full_config(deepspeed="ds/own.json")).notes)["deepspeed"]
    assert "the run will refuse the file" in note and "'optimizer' section" in note


def test_fsdp_maps_to_engine_fsdp_with_a_note_on_each_setting(tmp_path: Path) -> None:
    make_project(tmp_path)
    fsdp_config = {
        "fsdp_offload_params": True,
        "fsdp_sharding_strategy": "SHARD_GRAD_OP",
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "Qwen2DecoderLayer",
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_activation_checkpointing": True,
    }
    config = full_config(fsdp=["full_shard", "auto_wrap"], fsdp_config=fsdp_config, gradient_checkpointing=False)
    conversion = convert(tmp_path, config)
    recipe = recipe_of(conversion)
    assert (recipe.distributed.engine, recipe.distributed.deepspeed_config) == ("fsdp", "")
    # FSDP's activation checkpointing is the recipe's gradient checkpointing.
    assert recipe.finetune is not None and recipe.finetune.gradient_checkpointing is True
    notes = dict(conversion.notes)
    for key in ("fsdp", "fsdp_config"):
        assert notes[key].startswith('mapped to distributed.engine = "fsdp"') and "one group per decoder layer (FSDP2 fully_shard)" in notes[key]
    assert "not honoured" not in notes["fsdp"]
    assert notes["fsdp_config"].endswith("not honoured: fsdp_offload_params, fsdp_sharding_strategy")
    assert "DeepSpeed ZeRO-3 with offload" in notes["fsdp_config.fsdp_offload_params"]
    assert notes["fsdp_config.fsdp_sharding_strategy"].startswith("ignored: the appliance always shards fully")
    assert notes["fsdp_config.fsdp_auto_wrap_policy"].startswith("accepted") and notes["fsdp.full_shard"].startswith("accepted")
    assert notes["fsdp_config.fsdp_state_dict_type"].startswith("ignored") and top_keys(conversion) == list(config)
    # Axolotl's older spelling: the options as one string, offload among them.
    notes = dict(convert(tmp_path, full_config(fsdp="full_shard offload auto_wrap")).notes)
    assert notes["fsdp"].endswith("not honoured: offload") and "DeepSpeed ZeRO-3" in notes["fsdp.offload"]


@pytest.mark.parametrize("key", ["deepspeed", "fsdp", "fsdp_config"])
def test_an_engine_with_an_adapter_is_refused_naming_the_key(tmp_path: Path, key: str) -> None:
    make_project(tmp_path)
    (tmp_path / "zero2.json").write_bytes(ZERO2.read_bytes())
    value = {"deepspeed": "zero2.json", "fsdp": ["full_shard"], "fsdp_config": {"fsdp_offload_params": False}}[key]
    for config in (project_config(**{key: value}), project_config(load_in_4bit=False, **{key: value})):  # qlora, lora
        error = refusal(tmp_path, config)
        assert [p.key for p in error.problems] == [key]
        assert "adapter: lora" in error.message and "full fine-tuning" in error.message
        assert f"remove {key}, or remove adapter" in error.hint


def test_deepspeed_problems_name_the_key(tmp_path: Path) -> None:
    make_project(tmp_path)
    error = refusal(tmp_path, full_config(deepspeed="configs/zero3.json"))
    assert [p.key for p in error.problems] == ["deepspeed"]
    assert "'configs/zero3.json' is not a file" in error.message and str(tmp_path / "configs" / "zero3.json") in error.message
    assert "deepspeed_configs/" in error.hint
    error = refusal(tmp_path, full_config(deepspeed={"zero_optimization": {"stage": 2}}))
    assert error.problems[0].key == "deepspeed" and "must name a DeepSpeed JSON file" in error.message
    error = refusal(tmp_path, full_config(deepspeed=str(ZERO2), fsdp=["full_shard"]))
    assert [p.key for p in error.problems] == ["fsdp"] and "one engine" in error.message


def test_engine_keys_that_are_off_write_no_distributed_table(tmp_path: Path) -> None:
    make_project(tmp_path)
    conversion = convert(tmp_path, full_config(deepspeed=None, fsdp=[], fsdp_config={}))
    assert "[distributed]" not in conversion.recipe_text
    assert "[distributed]" not in convert(tmp_path, project_config()).recipe_text
    config = full_config()
    config.update(deepspeed=None, fsdp=[], fsdp_config={})  # present, and off
    notes = dict(convert(tmp_path, config).notes)
    assert notes["deepspeed"] == notes["fsdp"] == notes["fsdp_config"] == "accepted: off"


# -- property: whatever a config holds, conversion gives a recipe that parses, or a ConfigError --------

_KEYS = [
    "adapter", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear", "sequence_len",
    "micro_batch_size", "gradient_accumulation_steps", "batch_size", "max_steps", "num_epochs", "learning_rate", "lr_scheduler",
    "warmup_steps", "warmup_ratio", "bf16", "fp16", "tf32", "save_steps", "eval_steps", "logging_steps", "save_total_limit",
    "val_set_size", "sample_packing", "optimizer", "special_tokens", "gradient_checkpointing", "chat_template", "wandb_project",
    "weight_decay", "cosine_min_lr_ratio", "seed", "unknown_key", "datasets", "test_datasets", "deepspeed", "fsdp", "fsdp_config",
]  # fmt: skip
_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["lora", "qlora", "cosine", "constant", "auto", "2e-4", "", "all-linear", "chatml", "adamw_torch", "x"]),
    st.lists(st.sampled_from(["q_proj", "", "v_proj"]), max_size=3), st.dictionaries(st.sampled_from(["pad_token", "path", "type"]), st.text(max_size=5)),
)  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("axolotl"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6))
def test_any_config_converts_to_a_recipe_that_parses_or_fails_with_config_error(project: Path, changes: dict[str, Any]) -> None:
    config = {**project_config(), **changes}
    try:
        conversion = convert_axolotl(yaml.safe_dump(config, sort_keys=False), source=str(project / "axolotl.yml"), recipe_dir=project)
    except ConfigError as exc:
        assert exc.problems or exc.message
        return
    recipe_of(conversion)
    assert top_keys(conversion) == list(config)
