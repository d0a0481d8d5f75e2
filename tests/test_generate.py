"""Generation: samplers on hand-made distributions, the KV cache against the uncached path, loading."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError, TrainingError
from pipeline.generate import (
    SampleConfig,
    generate_ids,
    generate_text,
    load_for_generation,
    next_token,
    read_hf_config,
    top_k_mask,
    top_p_mask,
)
from pipeline.model import KVCache, LlamaModel, ModelConfig, hf_config, save_model_config, save_weights
from pipeline.package import PackageConfig, run_package
from registry.store import Store
from tests.conftest import cli, new_home
from tests.training_fixtures import tiny_model, tokenizer_path  # noqa: F401  (fixture)

GREEDY = SampleConfig(temperature=0, max_new_tokens=12)


def _model(seed: int = 0, **overrides: object) -> LlamaModel:
    torch.manual_seed(seed)
    # A wide init spreads the logits, so greedy paths wander instead of repeating one token.
    return LlamaModel(tiny_model(init_std=0.3, **overrides).resolved(vocab_size=300)).eval()


def _same_shape(a: ModelConfig, b: ModelConfig) -> bool:
    # multiple_of only derives ffn_dim, which a resolved config already carries; HF has no such key.
    return dataclasses.replace(a, multiple_of=b.multiple_of) == b


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    save_weights(_model(), out / "model.safetensors")
    save_model_config(out, _model().cfg, bos_id=1, eos_id=2)
    return out


@pytest.fixture(scope="module")
def package_dir(checkpoint_dir: Path, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return run_package(checkpoint_dir, tokenizer_path, tmp_path_factory.mktemp("pkg"), PackageConfig(), {}).outputs["model"]


# -- samplers ----------------------------------------------------------------------------------


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.125, 0.5, 0.125, 0.25])  # sorted: 0.5, 0.25, 0.125, 0.125
    assert top_p_mask(probs, 0.5).tolist() == [False, True, False, False]
    assert top_p_mask(probs, 0.75).tolist() == [False, True, False, True]  # mass exactly p is enough
    wider = top_p_mask(probs, 0.76)  # 0.75 falls short: one of the two 0.125 ties joins
    assert wider.sum() == 3 and wider[1] and wider[3]
    assert top_p_mask(probs, 0.1).tolist() == [False, True, False, False]  # the top token always stays
    assert top_p_mask(probs, 1.0).all()
    batch = torch.stack([probs, probs.flip(0)])
    assert top_p_mask(batch, 0.75).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([1.0, 4.0, 2.0, 3.0, 0.0])
    assert top_k_mask(logits, 2).tolist() == [False, True, False, True, False]
    assert top_k_mask(logits, 3).tolist() == [False, True, True, True, False]
    assert top_k_mask(logits, 0).all() and top_k_mask(logits, 9).all()


def test_sampling_draws_only_from_the_kept_set() -> None:
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    gen = torch.Generator().manual_seed(0)
    nucleus = {next_token(logits, SampleConfig(temperature=1.0, top_k=0, top_p=0.75), gen) for _ in range(200)}
    assert nucleus == {0, 1}
    top2 = {next_token(logits, SampleConfig(temperature=1.0, top_k=2), gen) for _ in range(200)}
    assert top2 == {0, 1}
    free = {next_token(logits, SampleConfig(temperature=1.0, top_k=0), gen) for _ in range(200)}
    assert free == {0, 1, 2, 3}
    assert next_token(torch.tensor([0.1, 0.3, 0.2]), SampleConfig(temperature=0)) == 1


def test_sample_config_rejects_bad_values() -> None:
    for bad in ({"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SampleConfig(**bad)  # type: ignore[arg-type]


# -- the KV cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_cached_logits_match_the_full_forward(kv_heads: int) -> None:
    model = _model(n_kv_heads=kv_heads)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.cfg.max_seq_len)
    with torch.no_grad():
        full, _ = model(ids)
        prefill, _ = model(ids[:, :8], cache=cache)
        torch.testing.assert_close(prefill, full[:, :8], atol=1e-5, rtol=1e-5)
        for t in range(8, 14):
            step, _ = model(ids[:, t : t + 1], cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
        # A block after position 0 (a chunked prefill) sees the cache and itself, causally.
        block, _ = model(ids[:, 14:20], cache=cache)
        torch.testing.assert_close(block, full[:, 14:20], atol=1e-5, rtol=1e-5)
    assert cache.length == 20
    with pytest.raises(TrainingError, match="do not fit the KV cache"):
        model(ids[:, :13], cache=cache)  # 20 + 13 > the 32-token context


def _uncached_greedy(model: LlamaModel, ids: list[int], n: int) -> list[int]:
    # The reference: the whole window (the last max_seq_len tokens) through the plain forward, per token.
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids[-model.cfg.max_seq_len :]]))[0][0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("prompt_len", [1, 6, 31, 40])
def test_cached_greedy_equals_uncached_forward(prompt_len: int) -> None:
    model = _model(seed=prompt_len)
    prompt = torch.randint(3, 300, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    # 45 new tokens run past the 32-token context, where both paths slide the window.
    cfg = SampleConfig(temperature=0, max_new_tokens=45)
    ours, stopped = generate_ids(model, prompt, cfg, eos_id=None)
    assert not stopped and ours == _uncached_greedy(model, prompt, 45)
    assert len(set(ours)) > 3  # a real path, not one token repeated


def test_greedy_is_deterministic_and_seeded_sampling_reproducible() -> None:
    model = _model()
    prompt = [1, 17, 42, 99]
    assert generate_ids(model, prompt, GREEDY, eos_id=None) == generate_ids(model, prompt, GREEDY, eos_id=None)
    cfg = SampleConfig(temperature=1.0, top_k=0, max_new_tokens=20)

    def sample(seed: int) -> list[int]:
        return generate_ids(model, prompt, cfg, eos_id=None, generator=torch.Generator().manual_seed(seed))[0]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_eos_stops_generation() -> None:
    model = _model()
    prompt = [1, 17, 42]
    free, _ = generate_ids(model, prompt, GREEDY, eos_id=None)
    # Declare the third greedy token the end of sequence: generation stops before it.
    eos = free[2]
    stop_at = free.index(eos)
    new, stopped = generate_ids(model, prompt, GREEDY, eos_id=eos)
    assert stopped and new == free[:stop_at]
    assert generate_ids(model, prompt, SampleConfig(temperature=0, max_new_tokens=0), eos_id=eos) == ([], False)


# -- loading -----------------------------------------------------------------------------------


def test_package_and_checkpoint_load_and_agree(checkpoint_dir: Path, package_dir: Path, tokenizer_path: Path) -> None:  # noqa: F811
    pkg = load_for_generation(package_dir)
    ckpt = load_for_generation(checkpoint_dir, tokenizer=tokenizer_path)
    assert (pkg.kind, ckpt.kind) == ("package", "checkpoint")
    assert _same_shape(pkg.model.cfg, ckpt.model.cfg)
    assert (pkg.bos_id, pkg.eos_id) == (ckpt.bos_id, ckpt.eos_id) == (1, 2)
    assert pkg.tokenizer_path == package_dir / "tokenizer.model"
    a = generate_text(pkg, ["the cat", "a dog sees"], GREEDY)
    b = generate_text(ckpt, ["the cat", "a dog sees"], GREEDY)
    assert a == b
    assert [g.prompt for g in a] == ["the cat", "a dog sees"]
    for g in a:
        assert isinstance(g.text, str) and 0 <= g.new_tokens <= 12
        assert g.prompt_tokens == 1 + len(pkg.tokenizer.encode(g.prompt))
        assert g.stopped_at_eos == (g.new_tokens < 12)


def test_continuation_keeps_its_leading_space(package_dir: Path) -> None:
    bundle = load_for_generation(package_dir)
    sp = bundle.tokenizer
    prompt = "the cat"
    ids = sp.encode(prompt) + sp.encode(" sees the red barn")
    from pipeline.generate import _continuation

    assert _continuation(sp, sp.encode(prompt), ids[len(sp.encode(prompt)) :]) == " sees the red barn"


def test_eos_in_generate_text_is_not_decoded(package_dir: Path) -> None:
    bundle = load_for_generation(package_dir)
    first = generate_ids(bundle.model, [bundle.bos_id, *bundle.tokenizer.encode("the cat")], GREEDY, eos_id=None)[0][0]
    stopping = dataclasses.replace(bundle, eos_id=first)
    [g] = generate_text(stopping, ["the cat"], GREEDY)
    assert g.stopped_at_eos and g.new_tokens == 0 and g.text == ""


def test_read_hf_config_rebuilds_model_config(tmp_path: Path) -> None:
    cfg = tiny_model(rope_theta=5000.0, tie_embeddings=False, norm_eps=1e-6).resolved(vocab_size=300)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg, 5, 6)))
    got, bos, eos = read_hf_config(tmp_path)
    assert _same_shape(got, cfg) and (bos, eos) == (5, 6)
    body = hf_config(cfg, 5, 6)
    body["eos_token_id"] = [6, 7]
    del body["rope_theta"]  # transformers 5.x writes only rope_parameters
    (tmp_path / "config.json").write_text(json.dumps(body))
    got, bos, eos = read_hf_config(tmp_path)
    assert _same_shape(got, cfg) and (bos, eos) == (5, 6)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda b: b.pop("hidden_size"), "has no 'hidden_size'"),
        (lambda b: b.update(model_type="mistral"), "not describe a Llama"),
        (lambda b: b.update(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
        (lambda b: b.update(attention_bias=True), "attention_bias"),
        (lambda b: b.update(head_dim=4), "head_dim 4"),
        (lambda b: b.update(bos_token_id="one"), "bos_token_id"),
    ],
)
def test_bad_hf_config_names_the_file(tmp_path: Path, edit: object, match: str) -> None:
    body = hf_config(tiny_model().resolved(vocab_size=300), 1, 2)
    edit(body)  # type: ignore[operator]
    (tmp_path / "config.json").write_text(json.dumps(body))
    with pytest.raises(TrainingError, match=match) as err:
        read_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in err.value.message


def test_hf_config_with_impossible_shape_is_a_config_error(tmp_path: Path) -> None:
    body = hf_config(tiny_model().resolved(vocab_size=300), 1, 2)
    body["num_attention_heads"] = 5  # 32 is not divisible by 5
    (tmp_path / "config.json").write_text(json.dumps(body))
    with pytest.raises(ConfigError, match="config.json"):
        read_hf_config(tmp_path)


def test_loading_errors_say_what_to_do(checkpoint_dir: Path, package_dir: Path, tokenizer_path: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(TrainingError, match="carries no tokenizer") as err:
        load_for_generation(checkpoint_dir)
    assert "--tokenizer" in err.value.hint
    with pytest.raises(TrainingError, match="does not exist"):
        load_for_generation(tmp_path / "nope")
    with pytest.raises(TrainingError, match="no model.safetensors"):
        load_for_generation(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TrainingError, match="neither model_config.json"):
        load_for_generation(tmp_path)
    no_tok = tmp_path / "pkg"
    shutil.copytree(package_dir, no_tok)
    (no_tok / "tokenizer.model").unlink()
    with pytest.raises(TrainingError, match="no tokenizer.model"):
        load_for_generation(no_tok)
    assert load_for_generation(no_tok, tokenizer=tokenizer_path).kind == "package"
    with pytest.raises(TrainingError, match="does not exist"):
        load_for_generation(checkpoint_dir, tokenizer=tmp_path / "missing.model")
    with pytest.raises(TrainingError, match="not a SentencePiece model"):
        load_for_generation(checkpoint_dir, tokenizer=tmp_path / "model.safetensors")


def test_files_linked_from_outside_the_directory_are_refused(package_dir: Path, tokenizer_path: Path, tmp_path: Path) -> None:  # noqa: F811
    linked = tmp_path / "pkg"
    shutil.copytree(package_dir, linked)
    (linked / "tokenizer.model").unlink()
    (linked / "tokenizer.model").symlink_to(tokenizer_path)
    with pytest.raises(TrainingError, match="outside the model directory"):
        load_for_generation(linked)
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(package_dir / "model.safetensors")
    with pytest.raises(TrainingError, match="model.safetensors links to"):
        load_for_generation(linked, tokenizer=tokenizer_path)
    # A link that stays inside is just another name for a file of the model.
    inside = tmp_path / "inside"
    shutil.copytree(package_dir, inside)
    (inside / "tokenizer.model").rename(inside / "spm.model")
    (inside / "tokenizer.model").symlink_to("spm.model")
    assert load_for_generation(inside).kind == "package"


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path: Path, tokenizer_path: Path) -> None:  # noqa: F811
    torch.manual_seed(0)
    small = LlamaModel(tiny_model().resolved(vocab_size=100))
    save_weights(small, tmp_path / "model.safetensors")
    save_model_config(tmp_path, small.cfg, bos_id=1, eos_id=2)
    with pytest.raises(TrainingError, match="300 pieces"):
        load_for_generation(tmp_path, tokenizer=tokenizer_path)


def test_prompt_longer_than_the_context_uses_its_tail(package_dir: Path) -> None:
    bundle = load_for_generation(package_dir)
    long_prompt = " ".join(["the cat sees the red barn."] * 20)
    assert len(bundle.tokenizer.encode(long_prompt)) > bundle.model.cfg.max_seq_len
    [g] = generate_text(bundle, [long_prompt], SampleConfig(temperature=0, max_new_tokens=3))
    assert g.prompt_tokens > bundle.model.cfg.max_seq_len and 0 < g.new_tokens + g.stopped_at_eos <= 3


# -- the command (through the service, which verifies before anything is loaded) ---------------


@pytest.fixture
def signed_home(tmp_path: Path, package_dir: Path) -> tuple[Path, Path]:
    """(home, a copy of the package signed with that home's node key)."""
    from registry.modelsig import sign_model_dir

    signed = tmp_path / "signed"
    shutil.copytree(package_dir, signed)
    with new_home(tmp_path / "home") as svc:
        sign_model_dir(signed, svc.key)
    return tmp_path / "home", signed


def test_cli_generates_from_a_signed_directory(signed_home: tuple[Path, Path], package_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, signed = signed_home
    args = ["--home", str(home), "generate", str(signed), "--prompt", "the cat", "--prompt", "a dog sees", "--temperature", "0", "--max-new-tokens", "6"]
    code, out, err = cli(capsys, *args, "--device", "cpu", "--json")
    assert code == 0, err
    expected = generate_text(load_for_generation(package_dir), ["the cat", "a dog sees"], SampleConfig(temperature=0, max_new_tokens=6))
    assert json.loads(out) == [
        {"prompt": g.prompt, "text": g.text, "new_tokens": g.new_tokens, "prompt_tokens": g.prompt_tokens, "stopped_at_eos": g.stopped_at_eos} for g in expected
    ]
    assert "package" in err and "new tokens" in err and "model.sig verified" in err
    code, out, _ = cli(capsys, *args)
    assert code == 0 and out == "\n\n".join(g.prompt + g.text for g in expected) + "\n"
    # Sampling: a seed reproduces the text, and --top-p is accepted.
    sampled = ["--home", str(home), "generate", str(signed), "--prompt", "the cat", "--top-p", "0.9", "--seed", "3", "--json"]
    assert cli(capsys, *sampled)[1] == cli(capsys, *sampled)[1]


def test_cli_refuses_a_tampered_or_unsigned_directory_before_loading(
    signed_home: tuple[Path, Path], checkpoint_dir: Path, tokenizer_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # noqa: F811
    home, signed = signed_home
    config = signed / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 0.1'))
    code, _, err = cli(capsys, "--home", str(home), "generate", str(signed), "--prompt", "x")
    assert code == 2 and "config.json" in err and "Traceback" not in err
    (signed / "model.sig").unlink()
    code, _, err = cli(capsys, "--home", str(home), "generate", str(signed), "--prompt", "x")
    assert code == 2 and "cannot be verified" in err
    # A checkpoint is trusted only if this appliance recorded it.
    code, _, err = cli(capsys, "--home", str(home), "generate", str(checkpoint_dir), "--tokenizer", str(tokenizer_path), "--prompt", "x")
    assert code == 2 and "cannot be verified" in err, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--max-new-tokens", "-2"], "--max-new-tokens must be between 0 and 65536"),
        (["--top-k", "-1"], "--top-k must be >= 0"),
    ],
)
def test_cli_bad_sampling_options_name_the_flag(package_dir: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "generate", str(package_dir), "--prompt", "x", *extra)
    assert code == 2 and f"error: {message}" in err and "hint:" in err


def test_cli_model_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "generate", str(tmp_path / "no-such-model"), "--prompt", "x")
    assert code == 2 and "neither a directory nor a model digest" in err
    code, _, err = cli(capsys, "--home", str(tmp_path / "home"), "generate", "deadbeef00", "--prompt", "x")
    assert code == 2 and "not an initialised appliance home" in err


@pytest.mark.slow
def test_cli_generates_from_a_model_in_the_store(finished_run: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, summary = finished_run
    digest = summary.model_digest  # type: ignore[attr-defined]
    before = json.loads(cli(capsys, "--home", str(home), "ledger", "query", "SELECT max(seq) AS n FROM events", "--json")[1])[0]["n"]
    code, out, err = cli(
        capsys, "--home", str(home), "generate", digest[:12], "--prompt", "The module", "--temperature", "0", "--max-new-tokens", "5", "--json"
    )
    assert code == 0, err
    [g] = json.loads(out)
    assert g["prompt"] == "The module" and 0 <= g["new_tokens"] <= 5 and digest[:16] in err
    # The decision to generate is recorded, from which model; the prompt is not (a ledger cannot be purged).
    code, out, _ = cli(capsys, "--home", str(home), "ledger", "query", f"SELECT kind, data FROM signed_events WHERE seq > {before}", "--json")
    rows = json.loads(out)
    assert {r["kind"] for r in rows} == {"authz.decision"}
    assert any(digest[:12] in json.dumps(r["data"]) and "model.generate" in json.dumps(r["data"]) for r in rows)
    assert not any("The module" in json.dumps(r["data"]) for r in rows)


@pytest.mark.slow
def test_a_tampered_stored_model_is_refused_before_loading(home_copy: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, summary = home_copy
    digest = summary.model_digest  # type: ignore[attr-defined]
    config = Store(home / "store").path_of(digest) / "config.json"
    config.parent.chmod(0o755)
    config.chmod(0o644)
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 0.1'))
    code, _, err = cli(capsys, "--home", str(home), "generate", digest[:12], "--prompt", "The module")
    assert code == 2 and "file config.json differs" in err
