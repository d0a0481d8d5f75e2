"""The Llama-style model: shapes, causality, GQA, HF equivalence, config rules, generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keys.errors import ConfigError, TrainingError
from pipeline.config import from_mapping
from pipeline.model import (
    LlamaModel,
    ModelConfig,
    generate,
    hf_config,
    load_checkpoint,
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


def test_generate_is_seeded_and_greedy_is_deterministic() -> None:
    model = build()
    prompt = torch.tensor([[1, 5, 7]])
    a = generate(model, prompt, 8, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 8, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    assert a.shape == (1, 11) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    g = generate(model, prompt, 5, temperature=0)
    expected = model(prompt)[0][0, -1].argmax()
    assert g[0, 3] == expected
    # Longer than max_seq_len: the window slides instead of failing.
    assert generate(model, prompt, 30, temperature=0).shape == (1, 33)


def test_generate_stops_at_eos() -> None:
    model = build()
    prompt = torch.tensor([[1, 5]])
    first = int(generate(model, prompt, 1, temperature=0)[0, -1])
    out = generate(model, prompt, 10, temperature=0, eos_id=first)
    assert out.shape == (1, 3)


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
