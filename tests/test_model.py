"""The Llama-style model: shapes, causality, GQA, HF equivalence, config rules, presets,
initialisation, activation checkpointing, FLOPs. The KV cache and sampling: test_generate.py."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import from_mapping
from pipeline.errors import ConfigError, TrainingError
from pipeline.model import (
    PRESETS,
    LlamaModel,
    ModelConfig,
    hf_config,
    load_checkpoint,
    model_flops_per_token,
    read_model_config,
    save_model_config,
    save_weights,
)

VOCAB = 97


def build(seed: int = 0, **overrides: object) -> LlamaModel:
    base = {"vocab_size": VOCAB, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 24, "multiple_of": 16}
    torch.manual_seed(seed)
    return LlamaModel(ModelConfig(**{**base, **overrides}).resolved()).eval()  # type: ignore[arg-type]


def test_forward_shapes_and_loss() -> None:
    model = build()
    idx = torch.randint(0, VOCAB, (3, 11))
    logits, loss = model(idx)
    assert logits.shape == (3, 11, VOCAB)
    assert loss is None
    _, loss = model(idx, torch.randint(0, VOCAB, (3, 11)))
    assert loss is not None and loss.ndim == 0
    # An untrained model with small init predicts near-uniformly (random targets: with tied
    # embeddings it does favour repeating the input token).
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5


def test_causal_future_tokens_do_not_change_the_past() -> None:
    model = build()
    idx = torch.randint(0, VOCAB, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % VOCAB
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gqa_equals_mha_with_shared_key_value_heads() -> None:
    gqa = build(n_kv_heads=2)
    assert gqa.model.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 32)
    mha = build(n_kv_heads=4)
    sd = gqa.state_dict()
    for name, w in list(sd.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # Query heads 0,1 share KV head 0 and 2,3 share head 1: repeat each KV head's rows.
            sd[name] = w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    idx = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0])


@pytest.mark.parametrize("tie,kv", [(True, 2), (False, 4)])
def test_logits_match_transformers_llama(tie: bool, kv: int) -> None:
    transformers = pytest.importorskip("transformers")
    model = build(tie_embeddings=tie, n_kv_heads=kv)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(model.cfg, 1, 2))).eval()
    ours = model.state_dict()
    assert set(ours) == set(hf.state_dict()), "parameter names must be HF's"
    hf.load_state_dict(ours)
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_ffn_dim_follows_llama_rule() -> None:
    # Llama-7B: dim 4096, multiple_of 256 -> 11008.
    assert ModelConfig(dim=4096, n_heads=32, multiple_of=256).resolved().ffn_dim == 11008
    assert ModelConfig(dim=256, ffn_dim=100).resolved().ffn_dim == 100
    cfg = ModelConfig(n_kv_heads=0).resolved(vocab_size=300)
    assert cfg.n_kv_heads == cfg.n_heads and cfg.vocab_size == 300


def test_config_rejects_bad_shapes_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model.*n_heads"):
        from_mapping(ModelConfig, {"dim": 100, "n_heads": 3}, source="recipe.toml", prefix="model")
    with pytest.raises(ConfigError, match="n_kv_heads"):
        from_mapping(ModelConfig, {"n_heads": 8, "n_kv_heads": 3}, source="recipe.toml", prefix="model")
    with pytest.raises(ConfigError, match="model.width"):
        from_mapping(ModelConfig, {"width": 3}, source="recipe.toml", prefix="model")
    with pytest.raises(TrainingError, match="resolved"):
        LlamaModel(ModelConfig())  # vocab_size 0 has not been resolved


def test_checkpoint_round_trip_and_tied_weights_stored_once(tmp_path: Path) -> None:
    model = build(tie_embeddings=True)
    save_weights(model, tmp_path / "model.safetensors")
    save_model_config(tmp_path, model.cfg, bos_id=1, eos_id=2)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["bos_id"] == 1 and loaded.cfg == model.cfg
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    idx = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_load_checkpoint_names_missing_config(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="model_config.json") as err:
        load_checkpoint(tmp_path)
    assert err.value.hint


# Parameter counts with a 32k vocabulary and tied embeddings: (low, high) around the counts
# stated beside each preset in pipeline/model.py.
PRESET_PARAMS_32K = {
    "tiny": (2.0e6, 2.3e6),
    "20m": (22e6, 24e6),
    "124m": (105e6, 115e6),
    "350m": (330e6, 345e6),
    "1b": (1.0e9, 1.1e9),
}


def test_every_preset_is_covered_by_the_parameter_table() -> None:
    assert set(PRESET_PARAMS_32K) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_with_stated_size_and_hf_parameter_layout(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(preset=name).resolved(vocab_size=32000)
    assert {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "max_seq_len")} == {
        k: PRESETS[name][k] for k in ("dim", "n_layers", "n_heads", "max_seq_len")
    }
    with torch.device("meta"):
        ours = LlamaModel(cfg)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(cfg, 1, 2)))
    low, high = PRESET_PARAMS_32K[name]
    assert low <= ours.num_parameters() <= high
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}


def test_preset_shapes() -> None:
    tiny = ModelConfig(preset="tiny").resolved(vocab_size=300)
    assert (tiny.dim, tiny.n_layers, tiny.n_heads, tiny.n_kv_heads, tiny.max_seq_len) == (64, 2, 4, 2, 128)
    one_b = ModelConfig(preset="1b").resolved()
    assert (one_b.dim, one_b.n_layers, one_b.n_heads, one_b.n_kv_heads, one_b.ffn_dim, one_b.max_seq_len) == (2048, 16, 32, 8, 8192, 2048)
    # GPT-2 small's MLP has 2·768·3072 weights; SwiGLU at the Llama rule has exactly as many.
    gpt2 = ModelConfig(preset="124m").resolved()
    assert 3 * gpt2.dim * gpt2.ffn_dim == 2 * 768 * 3072 and gpt2.n_kv_heads == 12


def test_no_preset_resolves_to_the_default_model() -> None:
    cfg = ModelConfig().resolved(vocab_size=8000)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.max_seq_len) == (256, 6, 8, 8, 704, 256)
    assert cfg.preset == "" and cfg.head_dim == 32 and ModelConfig().head_dim == 32
    assert cfg.resolved() == cfg


def test_explicit_dimensions_win_over_the_preset() -> None:
    cfg = ModelConfig(preset="124m", max_seq_len=512, n_layers=4).resolved(vocab_size=300)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.max_seq_len) == (768, 4, 12, 512)
    # The recorded config reads back as the same model, preset name included.
    again = from_mapping(ModelConfig, dataclasses.asdict(cfg), source="model_config.json", prefix="model")
    assert again == cfg and again.resolved() == cfg


def test_bad_preset_or_shape_fails_at_recipe_load() -> None:
    with pytest.raises(ConfigError, match=r"model.*'7b'.*tiny, 20m, 124m, 350m, 1b"):
        from_mapping(ModelConfig, {"preset": "7b"}, source="recipe.toml", prefix="model")
    # The preset's 6 heads do not divide the recipe's width.
    with pytest.raises(ConfigError, match=r"dim \(500\) must be divisible by n_heads \(6\).*preset '20m'"):
        from_mapping(ModelConfig, {"preset": "20m", "dim": 500}, source="recipe.toml", prefix="model")
    # The 1b preset's 8 KV heads are more than the recipe's 4 query heads.
    with pytest.raises(ConfigError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(8\)"):
        from_mapping(ModelConfig, {"preset": "1b", "n_heads": 4}, source="recipe.toml", prefix="model")
    with pytest.raises(ConfigError, match=r"head size dim/n_heads = 3 must be even"):
        from_mapping(ModelConfig, {"dim": 24, "n_heads": 8}, source="recipe.toml", prefix="model")
    with pytest.raises(ConfigError, match=r"max_seq_len must be >= 0"):
        from_mapping(ModelConfig, {"max_seq_len": -1}, source="recipe.toml", prefix="model")
    with pytest.raises(TrainingError, match="resolved"):
        LlamaModel(dataclasses.replace(ModelConfig().resolved(vocab_size=10), dim=0))


def test_old_checkpoint_config_without_preset_still_loads(tmp_path: Path) -> None:
    model = build()
    save_model_config(tmp_path, model.cfg, bos_id=1, eos_id=2)
    body = json.loads((tmp_path / "model_config.json").read_text())
    del body["model"]["preset"]
    (tmp_path / "model_config.json").write_text(json.dumps(body))
    cfg, _ = read_model_config(tmp_path)
    assert cfg == model.cfg


def test_tied_embeddings_are_one_tensor() -> None:
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * 32
    # One tensor, so the output projection's gradient lands in the embedding: rows of tokens
    # absent from the input get gradient only through lm_head.
    idx = torch.randint(0, VOCAB, (2, 8))
    tied.train()(idx, idx)[1].backward()
    grad = tied.model.embed_tokens.weight.grad
    assert grad is not None and grad[~torch.isin(torch.arange(VOCAB), idx)].abs().sum() > 0


def test_residual_projections_are_initialised_at_std_over_sqrt_2l() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1000, dim=256, n_layers=12, n_heads=8).resolved()
    model = LlamaModel(cfg)
    scaled = 0.02 / math.sqrt(2 * 12)

    def std_of(suffix: str) -> float:
        return torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith(suffix)]).std().item()

    # ~10^6 samples per group: the sample std is within 0.2 % of the true one; allow 2 %.
    for suffix in ("o_proj.weight", "down_proj.weight"):
        assert std_of(suffix) == pytest.approx(scaled, rel=0.02)
    for suffix in ("q_proj.weight", "gate_proj.weight", "embed_tokens.weight"):
        assert std_of(suffix) == pytest.approx(0.02, rel=0.02)
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if p.dim() == 1)


def test_activation_checkpointing_gives_identical_loss_and_gradients() -> None:
    def run(recompute: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = build(seed=3).train()
        model.activation_checkpointing = recompute
        idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
        _, loss = model(idx, idx.roll(-1, dims=1))
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = run(False)
    ckpt_loss, ckpt_grads = run(True)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert set(ckpt_grads) == set(plain_grads) and len(plain_grads) == sum(1 for _ in build().parameters())
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)


def test_activation_checkpointing_really_recomputes() -> None:
    # Count layer calls (pre-hooks: the recomputation stops as soon as it has the tensors
    # backward needs, before forward hooks would fire). With checkpointing each layer runs again
    # in backward; under no_grad it is off.
    model = build().train()
    calls: list[int] = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
    idx = torch.randint(0, VOCAB, (1, 8))
    model.activation_checkpointing = True
    model(idx, idx)[1].backward()
    assert len(calls) == 2 * len(model.model.layers)
    calls.clear()
    with torch.no_grad():
        model(idx)
    assert len(calls) == len(model.model.layers)
    calls.clear()
    model.activation_checkpointing = False
    model(idx, idx)[1].backward()
    assert len(calls) == len(model.model.layers)


def test_model_flops_per_token_by_hand() -> None:
    # dim 32, 2 layers, 4 heads of 8, 2 KV heads, ffn 64, vocab 97, T 16.
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    q, kv, o = 32 * 32, 2 * (32 * 16), 32 * 32  # q_proj, k_proj + v_proj (2 heads × 8), o_proj
    mlp = 3 * 32 * 64  # gate, up, down
    n = 2 * (q + kv + o + mlp) + 32 * 97  # + lm_head (tied or not: it is a matmul)
    assert n == 2 * (1024 + 1024 + 1024 + 6144) + 3104 == 21536
    attention = 12 * 2 * 4 * 8 * 16  # 12·L·H·Q·T
    assert model_flops_per_token(cfg, 16) == 6 * 21536 + attention == 141504
    # N is every parameter except the input embedding and the RMSNorm gains (untied: lm_head counted).
    untied = build(tie_embeddings=False, ffn_dim=64)
    norms = sum(p.numel() for p in untied.parameters() if p.dim() == 1)
    assert untied.num_parameters() - VOCAB * 32 - norms == n
    # The attention term grows with the sequence; the parameter term does not.
    assert model_flops_per_token(cfg, 32) - model_flops_per_token(cfg, 16) == attention
    with pytest.raises(TrainingError, match="vocabulary"):
        model_flops_per_token(ModelConfig(), 256)
