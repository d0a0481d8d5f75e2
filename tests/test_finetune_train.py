"""The adapter trainer and the LoRA / QLoRA model spec on tiny local bases (CPU, a few steps each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from pipeline.errors import ConfigError, TrainingError  # noqa: E402
from pipeline.settings.finetune import DatasetConfig, FinetuneConfig  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402
from tests.finetune_fixtures import build_tiny_base  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Call open() to read a file; the result is a file object.",
    "Lists hold items in order, and dictionaries map keys to values.",
    "Errors are raised as exceptions and handled with try and except.",
]
SEQ = 24


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def rows(llama_base: Path) -> tuple[Any, Any]:
    """(input_ids, labels) of the sentences, padded to SEQ; the first half of each sentence carries no loss."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_base, local_files_only=True)
    ids = torch.full((len(SENTENCES), SEQ), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(SENTENCES), SEQ), -100, dtype=torch.long)
    for i, s in enumerate(SENTENCES):
        t = tok(s)["input_ids"][:SEQ]
        ids[i, : len(t)] = torch.tensor(t)
        labels[i, len(t) // 2 : len(t)] = torch.tensor(t[len(t) // 2 :])
    return ids, labels


def make_batches(rows: tuple[Any, Any], batch_size: int = 2) -> Any:
    ids, labels = rows

    def batches(step: int, micro: int) -> dict[str, Any]:
        # A pure function of (step, micro): rows rotate through the sentences.
        start = (step * 3 + micro * batch_size) % len(SENTENCES)
        pick = [(start + i) % len(SENTENCES) for i in range(batch_size)]
        x = ids[pick]
        return {"input_ids": x, "labels": labels[pick], "attention_mask": (x != 0).long()}  # <pad> is id 0

    return batches


def fcfg(method: str = "lora", **kw: Any) -> FinetuneConfig:
    return FinetuneConfig(base="base", method=method, datasets=[DatasetConfig(path="train.jsonl")], **kw)  # type: ignore[arg-type]


def tcfg(**kw: Any) -> TrainConfig:
    base = {"steps": 20, "batch_size": 2, "seq_len": SEQ, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 10, "log_every": 1, "seed": 7}
    return TrainConfig(**{**base, **kw})


def lora_spec(base: Path, method: str = "lora", **kw: Any) -> Any:
    from pipeline.finetune.spec import build_spec

    return build_spec(fcfg(method, **kw), base)


def run(spec: Any, batches: Any, cfg: TrainConfig, out: Path, **kw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from pipeline.finetune.train import train_adapter

    events: list[dict[str, Any]] = []
    stats = train_adapter(spec, batches, cfg, out, on_event=events.append, device=torch.device("cpu"), **kw)
    return stats, events


def losses(events: list[dict[str, Any]]) -> list[float]:
    return [e["loss"] for e in events if e["event"] == "log"]


def logits_of(model: Any, rows: tuple[Any, Any]) -> Any:
    model.eval()
    with torch.no_grad():
        return model(input_ids=rows[0], attention_mask=torch.ones_like(rows[0])).logits


def all_grads_present(spec: Any, rows: tuple[Any, Any]) -> list[str]:
    """Names of trainable parameters left without a gradient by one forward/backward."""
    from pipeline.finetune.train import _token_loss_sum

    batch = make_batches(rows)(0, 0)
    _token_loss_sum(spec.model, batch).backward()
    return [n for n, p in spec.trainable_parameters() if p.grad is None]


# -- LoRA: one 20-step run, looked at from several sides --------------------------------------


@pytest.fixture(scope="module")
def trained(llama_base: Path, rows: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    spec = lora_spec(llama_base, target_modules=["all-linear"])
    out = tmp_path_factory.mktemp("lora_run")
    stats, events = run(spec, make_batches(rows), tcfg(), out)
    return {"spec": spec, "out": out, "stats": stats, "events": events}


def test_lora_loss_falls_and_run_completes(trained: dict[str, Any]) -> None:
    ls = losses(trained["events"])
    assert len(ls) == 20
    # A random tiny base with a frozen (tied) output head: the adapters take ~5.75 to ~5.1.
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.4, ls
    stats = trained["stats"]
    assert stats["completed"] and stats["steps"] == 20 and stats["stopped_by"] is None
    log = next(e for e in trained["events"] if e["event"] == "log")
    assert set(log) >= {"event", "step", "loss", "lr", "grad_norm", "tokens_per_s"}


def test_lora_changes_only_the_adapters(trained: dict[str, Any], llama_base: Path) -> None:
    from safetensors.torch import load_file

    original = load_file(str(llama_base / "model.safetensors"))
    base_state = trained["spec"].model.get_base_model().state_dict()
    compared = 0
    for name, tensor in base_state.items():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer", "")
        if plain in original:
            assert torch.equal(tensor, original[plain]), plain
            compared += 1
    assert compared >= len(original) - 1
    trainable = trained["spec"].trainable_parameters()
    assert trainable and all("lora_" in n for n, _ in trainable)
    # lora_B starts at zero: every one has moved.
    assert all(p.abs().sum() > 0 for n, p in trainable if "lora_B" in n)


def test_lora_checkpoints_follow_the_training_layout(trained: dict[str, Any]) -> None:
    from pipeline.finetune.train import OPTIMIZER, TRAINABLE
    from pipeline.training import checkpoint as ckpt

    kept = ckpt.list_checkpoints(trained["out"])
    assert [p.name for p in kept] == ["step_000010", "step_000020"]  # keep_last = 2
    info = ckpt.verify_checkpoint(kept[-1])
    assert set(info.files) == {TRAINABLE, f"state/{OPTIMIZER}", "rng/rank_00000.pt", "trainer.json"}
    events = [e for e in trained["events"] if e["event"] == "checkpoint"]
    assert [e["step"] for e in events] == [10, 20] and events[-1]["manifest_sha256"] == info.manifest_sha256


def test_export_loads_with_peft_and_gives_the_trained_logits(trained: dict[str, Any], llama_base: Path, rows: tuple[Any, Any]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = Path(trained["stats"]["adapter"])
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(llama_base, local_files_only=True)
    loaded = PeftModel.from_pretrained(base, final)
    assert torch.equal(logits_of(loaded, rows), logits_of(trained["spec"].model, rows))


def test_merged_model_equals_base_plus_adapter(trained: dict[str, Any], llama_base: Path, rows: tuple[Any, Any], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.finetune.lora import merge_and_export

    merged_dir = tmp_path / "merged"
    files = {p.name for p in merge_and_export(llama_base, Path(trained["stats"]["adapter"]), merged_dir)}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    assert not any(n.startswith("adapter_") for n in files)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True)
    expected = logits_of(trained["spec"].model, rows)
    assert torch.allclose(logits_of(merged, rows), expected, atol=1e-5, rtol=1e-4)
    # The base alone is measurably different: the adapter is really in the merged weights.
    base = AutoModelForCausalLM.from_pretrained(llama_base, local_files_only=True)
    assert not torch.allclose(logits_of(base, rows), expected, atol=1e-3)
    assert AutoTokenizer.from_pretrained(merged_dir, local_files_only=True)("fox")["input_ids"]


# -- gradients, loss weighting -----------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_lora_parameter_gets_a_gradient(llama_base: Path, rows: tuple[Any, Any], checkpointing: bool) -> None:
    spec = lora_spec(llama_base, gradient_checkpointing=checkpointing)
    spec.build(torch.device("cpu"))
    assert all_grads_present(spec, rows) == []
    assert len(spec.trainable_parameters()) == 2 * 7 * 2  # A and B × 7 projections × 2 layers


def test_a_parameter_without_gradient_stops_the_run() -> None:
    from pipeline.finetune.train import _check_grads

    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(TrainingError, match="no gradient"):
        _check_grads([("layer.lora_A.weight", p)])


def test_loss_is_the_token_mean_across_micro_batches(llama_base: Path, rows: tuple[Any, Any], tmp_path: Path) -> None:
    # Two micro-batches of 1 row (grad_accum 2) take the same first loss as one batch of 2 rows:
    # every label token weighs the same, however the rows are split.
    one = make_batches(rows, batch_size=2)

    def halves(step: int, micro: int) -> dict[str, Any]:
        return {k: v[micro : micro + 1] for k, v in one(step, 0).items()}

    cfg = dict(steps=1, lr=1e-3, warmup_steps=0)
    _, whole = run(lora_spec(llama_base, lora_dropout=0.0), one, tcfg(**cfg), tmp_path / "a")
    _, split = run(lora_spec(llama_base, lora_dropout=0.0), halves, tcfg(**cfg, batch_size=1, grad_accum=2), tmp_path / "b")
    assert losses(whole)[0] == pytest.approx(losses(split)[0], rel=1e-6)


def test_packed_rows_with_a_4d_mask_score_like_separate_rows(llama_base: Path, rows: tuple[Any, Any]) -> None:
    from pipeline.finetune.train import _token_loss_sum

    spec = lora_spec(llama_base, lora_dropout=0.0)
    model = spec.build(torch.device("cpu"))
    model.eval()
    ids, labels = rows
    n0, n1 = int((ids[0] != 0).sum()), int((ids[1] != 0).sum())
    a, b = ids[0, :n0], ids[1, :n1]
    la, lb = labels[0, :n0], labels[1, :n1].clone()
    lb[0] = -100  # the packer's job: the first token of an example is never a target
    packed = {
        "input_ids": torch.cat([a, b])[None],
        "labels": torch.cat([la, lb])[None],
        "position_ids": torch.cat([torch.arange(n0), torch.arange(n1)])[None],
    }
    allowed = torch.zeros(n0 + n1, n0 + n1, dtype=torch.bool)
    allowed[:n0, :n0] = torch.ones(n0, n0, dtype=torch.bool).tril()
    allowed[n0:, n0:] = torch.ones(n1, n1, dtype=torch.bool).tril()
    packed["attention_mask"] = torch.zeros(1, 1, n0 + n1, n0 + n1).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        together = _token_loss_sum(model, packed)
        apart = sum(_token_loss_sum(model, {"input_ids": x[None], "labels": y[None], "attention_mask": torch.ones(1, len(x))}) for x, y in [(a, la), (b, lb)])
    assert torch.allclose(together, apart, rtol=1e-5)


# -- resume and stop ---------------------------------------------------------------------------


def test_stop_then_resume_is_bit_identical_to_a_straight_run(llama_base: Path, rows: tuple[Any, Any], tmp_path: Path) -> None:
    batches = make_batches(rows, batch_size=1)
    cfg = tcfg(steps=6, grad_accum=2, batch_size=1, checkpoint_every=100)  # checkpoints only at stop and end
    straight = lora_spec(llama_base)  # lora_dropout 0.05: resume must restore the RNG too
    _, straight_events = run(straight, batches, cfg, tmp_path / "straight")

    asked = {"n": 0}

    def stop_after_3() -> bool:
        asked["n"] += 1
        return asked["n"] == 3

    first = lora_spec(llama_base)
    stats1, events1 = run(first, batches, cfg, tmp_path / "resumed", should_stop=stop_after_3)
    assert stats1["completed"] is False and stats1["stopped_by"] == "request" and stats1["steps"] == 3
    assert [e["step"] for e in events1 if e["event"] == "checkpoint"] == [3]
    assert stats1["adapter"] is None

    second = lora_spec(llama_base)
    stats2, events2 = run(second, batches, cfg, tmp_path / "resumed")
    assert stats2["completed"] and stats2["resumed_from_step"] == 3
    assert any(e["event"] == "resumed" and e["step"] == 3 for e in events2)
    assert losses(events1) + losses(events2) == losses(straight_events)
    a, b = straight.state_dict_trainable(), second.state_dict_trainable()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_lora_settings(llama_base: Path, rows: tuple[Any, Any], tmp_path: Path) -> None:
    run(lora_spec(llama_base), make_batches(rows), tcfg(steps=1), tmp_path)
    with pytest.raises(ConfigError, match="finetune settings"):
        run(lora_spec(llama_base, lora_r=4), make_batches(rows), tcfg(steps=2), tmp_path)


# -- QLoRA, other bases, the method seam --------------------------------------------------------


@pytest.mark.slow
def test_qlora_on_cpu_trains_its_adapters(llama_base: Path, rows: tuple[Any, Any], tmp_path: Path) -> None:
    spec = lora_spec(llama_base, "qlora", bnb_4bit_compute_dtype="float32")
    spec.build(torch.device("cpu"))
    assert type(spec.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert all_grads_present(spec, rows) == []
    stats, events = run(lora_spec(llama_base, "qlora"), make_batches(rows), tcfg(steps=12), tmp_path)
    ls = losses(events)
    assert stats["completed"] and sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.2, ls


def test_qlora_without_bitsandbytes_says_so_before_loading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pipeline.finetune import spec as spec_mod

    spec_mod.qlora_available()  # the real probe passes here: bitsandbytes runs NF4 on CPU

    def missing() -> Any:
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(spec_mod, "_import_bitsandbytes", missing)
    with pytest.raises(ConfigError) as err:
        spec_mod.qlora_available()
    assert "needs bitsandbytes" in err.value.message and 'method = "lora"' in err.value.hint
    # build() probes first: the missing base directory is never reached.
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        lora_spec(tmp_path / "no-such-base", "qlora").build(torch.device("cpu"))


def test_full_method_gets_the_full_spec_and_lora_spec_refuses_it(llama_base: Path) -> None:
    from pipeline.finetune.full import FullSpec
    from pipeline.finetune.lora import LoraSpec

    assert isinstance(lora_spec(llama_base, "full"), FullSpec)  # every weight, through the engines (test_finetune_full)
    with pytest.raises(ConfigError, match='LoraSpec trains method "lora" or "qlora"'):
        LoraSpec(llama_base, fcfg("full"))


def test_unknown_target_modules_name_the_setting(llama_base: Path) -> None:
    with pytest.raises(ConfigError, match="target_modules"):
        lora_spec(llama_base, target_modules=["no_such_proj"]).build(torch.device("cpu"))


def test_qwen2_base_trains_and_exports(tmp_path: Path, rows: tuple[Any, Any]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = build_tiny_base(tmp_path / "qwen2", arch="qwen2")
    spec = lora_spec(base)
    stats, events = run(spec, make_batches(rows), tcfg(steps=8), tmp_path / "run")
    ls = losses(events)
    assert stats["completed"] and ls[-1] < ls[0]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, local_files_only=True), stats["adapter"])
    assert torch.equal(logits_of(loaded, rows), logits_of(spec.model, rows))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qlora_on_gpu_trains_its_adapters(llama_base: Path, rows: tuple[Any, Any], tmp_path: Path) -> None:
    from pipeline.finetune.train import train_adapter

    spec = lora_spec(llama_base, "qlora")
    events: list[dict[str, Any]] = []
    stats = train_adapter(spec, make_batches(rows), tcfg(steps=12, device="cuda"), tmp_path, on_event=events.append)
    assert stats["device"].startswith("cuda")
    assert type(spec.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    ls = losses(events)
    assert stats["completed"] and sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.2, ls
