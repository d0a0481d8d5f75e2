"""The training loop: learning, bit-identical resume, integrity, divergence, config errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from keys.errors import ConfigError, ShardIntegrityError, TrainingError
from pipeline.config import from_mapping
from pipeline.model import load_checkpoint
from pipeline.train import Ranks, TrainConfig, batch_at, lr_at, run_train
from tests.training_fixtures import shards_dir, tiny_model, tiny_train, tokenizer_path  # noqa: F401  (fixtures)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def test_loss_goes_down_and_outputs_are_complete(shards_dir: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int, dict]] = []
    res = run_train(shards_dir, tmp_path, tiny_model(), tiny_train(steps=30, checkpoint_every=10, keep_checkpoints=2, eval_every=15, eval_batches=2), lambda d, t, f: seen.append((d, t, f)))
    losses = [m["value"] for m in res.metrics if m["name"] == "loss"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses
    assert res.stats["steps"] == 30 and res.stats["completed"]
    assert res.stats["tokens_seen"] == 30 * 4 * 16
    assert res.stats["final_loss"] == pytest.approx(np.mean(losses[-10:]))
    assert res.stats["tokens_per_s"] > 0 and res.stats["parameters"] > 0
    assert [m["step"] for m in res.metrics if m["name"] == "val_loss"] == [15, 30]
    assert seen[-1][0] == 30 and seen[-1][1] == 30 and {"loss", "tok/s"} <= set(seen[-1][2])

    final = res.outputs["checkpoint"]
    assert final == tmp_path / "final"
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "model_config.json", "train_config.json"]
    mc = json.loads((final / "model_config.json").read_text())
    assert mc["model"]["vocab_size"] == 300 and mc["model"]["n_kv_heads"] == 2 and mc["model"]["ffn_dim"] > 0
    assert (mc["bos_id"], mc["eos_id"]) == (1, 2)
    assert json.loads((final / "train_config.json").read_text())["steps"] == 30
    # keep_checkpoints=2: step 10 was pruned; no temp directories are left behind.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000020", "step_000030"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == res.metrics
    model, _ = load_checkpoint(final)
    assert model.cfg.vocab_size == 300


def test_resume_is_bit_identical_to_a_straight_run(shards_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_train(steps=10, checkpoint_every=3)
    straight = run_train(shards_dir, tmp_path / "straight", tiny_model(), cfg)

    part = run_train(shards_dir, tmp_path / "resumed", tiny_model(), cfg, stop_at_step=5)
    assert not part.stats["completed"] and part.stats["steps"] == 5
    assert part.outputs["checkpoint"] == tmp_path / "resumed" / "checkpoints" / "step_000005"
    assert not (tmp_path / "resumed" / "final").exists()
    resumed = run_train(shards_dir, tmp_path / "resumed", tiny_model(), cfg)
    assert resumed.stats["resumed_from_step"] == 5 and resumed.stats["completed"]

    a, b = weights(straight.outputs["checkpoint"]), weights(resumed.outputs["checkpoint"])
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.metrics == straight.metrics
    assert resumed.stats["final_loss"] == straight.stats["final_loss"]
    assert resumed.stats["tokens_seen"] == straight.stats["tokens_seen"]


def test_should_stop_checkpoints_and_returns(shards_dir: Path, tmp_path: Path) -> None:
    calls = iter(range(100))
    res = run_train(shards_dir, tmp_path, tiny_model(), tiny_train(steps=10, checkpoint_every=100), should_stop=lambda: next(calls) >= 2)
    assert res.stats["steps"] == 3 and not res.stats["completed"]
    assert res.outputs["checkpoint"].name == "step_000003"
    assert (res.outputs["checkpoint"] / "trainer_state.pt").is_file()


def test_resume_refuses_a_changed_data_order(shards_dir: Path, tmp_path: Path) -> None:
    run_train(shards_dir, tmp_path, tiny_model(), tiny_train(steps=10), stop_at_step=5)
    with pytest.raises(ConfigError, match=r"train\.seed") as err:
        run_train(shards_dir, tmp_path, tiny_model(), tiny_train(steps=10, seed=7))
    assert "fresh output directory" in err.value.hint
    with pytest.raises(TrainingError, match="different model"):
        run_train(shards_dir, tmp_path, tiny_model(dim=64), tiny_train(steps=10))


def test_tampered_shard_is_refused_naming_it(shards_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "shards"
    shutil.copytree(shards_dir, bad)
    shard = bad / "train_000.bin"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0x01  # one bit in the token payload
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="train_000.bin") as err:
        run_train(bad, tmp_path / "out", tiny_model(), tiny_train(steps=2))
    assert err.value.hint
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_non_finite_loss_names_the_step_and_suggests_lower_lr(shards_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_train(lr=1e5, min_lr=0.0, warmup_steps=0, grad_clip=0.0, steps=10)
    with pytest.raises(TrainingError, match=r"loss is nan at step \d+") as err:
        run_train(shards_dir, tmp_path, tiny_model(), cfg)
    assert "train.lr" in err.value.hint


def test_unknown_and_invalid_train_keys_are_named() -> None:
    with pytest.raises(ConfigError, match=r"train\.xyz") as err:
        from_mapping(TrainConfig, {"steps": 5, "xyz": 1}, source="recipe.toml", prefix="train")
    assert "lr" in err.value.hint
    with pytest.raises(ConfigError, match="min_lr"):
        from_mapping(TrainConfig, {"lr": 1e-4, "min_lr": 1e-3}, source="recipe.toml", prefix="train")
    with pytest.raises(ConfigError, match=r"train\.device"):
        from_mapping(TrainConfig, {"device": "tpu"}, source="recipe.toml", prefix="train")
    cfg = from_mapping(TrainConfig, {"steps": 5, "lr": 1, "eval_every": 2}, source="recipe.toml", prefix="train")
    assert cfg.lr == 1.0 and cfg.eval_every == 2


def test_seq_len_longer_than_model_is_a_config_error(shards_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.seq_len"):
        run_train(shards_dir, tmp_path, tiny_model(max_seq_len=8), tiny_train(seq_len=16))


def test_lr_schedule_warms_up_then_decays_to_min_lr() -> None:
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_batches_depend_only_on_seed_and_step() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = batch_at(tokens, 7, batch_size=4, seq_len=8, seed=1)
    x2, _ = batch_at(tokens, 7, batch_size=4, seq_len=8, seed=1)
    x3, _ = batch_at(tokens, 8, batch_size=4, seq_len=8, seed=1)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:]) and x1.dtype == torch.int64
    # Two ranks together see exactly the one-rank global batch of twice the size.
    whole, _ = batch_at(tokens, 7, batch_size=8, seq_len=8, seed=1)
    halves = [batch_at(tokens, 7, batch_size=4, seq_len=8, seed=1, ranks=Ranks(rank=r, world=2))[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda_with_bf16_autocast(shards_dir: Path, tmp_path: Path) -> None:
    res = run_train(shards_dir, tmp_path, tiny_model(), tiny_train(steps=20, device="cuda", lr=3e-3))
    losses = [m["value"] for m in res.metrics if m["name"] == "loss"]
    assert res.stats["device"].startswith("cuda")
    assert np.mean(losses[-3:]) < losses[0]
    # Weights are saved in float32 whatever the autocast dtype.
    assert all(t.dtype == torch.float32 for t in weights(res.outputs["checkpoint"]).values())
