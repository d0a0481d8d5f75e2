"""The training loop in one process: learning, outputs, bit-identical resume, refusals, retention."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from keys.digest import dir_manifest, sha256_file
from pipeline.config import from_mapping
from pipeline.errors import ConfigError, ShardIntegrityError, TrainingError
from pipeline.model import load_checkpoint
from pipeline.shard_format import open_shards
from pipeline.train import DistConfig, TrainConfig, lr_at, run_train
from pipeline.training import checkpoint as ckpt
from pipeline.training.job import read_spec
from pipeline.training.loader import TokenLoader
from tests.training_fixtures import shards_dir, tiny_model, tiny_train, tokenizer_path  # noqa: F401  (fixtures)

# Metrics that depend on the computation alone (not on wall-clock time or memory).
DETERMINISTIC = {"loss", "lr", "grad_norm", "epoch", "val_loss", "val_perplexity"}


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    # train.num_threads sets torch's process-wide thread count; give the rest of the session its own back.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cfg(**overrides: Any) -> TrainConfig:
    # One thread: tiny matmuls on shared cores run far faster without thread hand-offs.
    return tiny_train(**{"num_threads": 1, **overrides})


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def series(metrics: list[dict], name: str) -> dict[int, float]:
    return {m["step"]: m["value"] for m in metrics if m["name"] == name}


def deterministic(metrics: list[dict]) -> list[tuple[int, str, float]]:
    return [(m["step"], m["name"], m["value"]) for m in metrics if m["name"] in DETERMINISTIC]


def test_loss_goes_down_and_outputs_are_complete(shards_dir: Path, tmp_path: Path) -> None:
    progress: list[tuple[int, int, dict]] = []
    events: list[dict[str, Any]] = []
    mismatched: list[str] = []

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "checkpoint":
            # The digests must describe every file as it lies on disk when the event is sent.
            path = Path(event["path"])
            on_disk = {rel: digest for rel, digest, _ in dir_manifest(path) if rel != "COMPLETE"}
            if event["files"] != on_disk or event["manifest_sha256"] != sha256_file(path / "COMPLETE"):
                mismatched.append(str(path))
        events.append(event)

    train = cfg(steps=30, checkpoint_every=10, keep_last=2, eval_every=15, eval_batches=2)
    res = run_train(shards_dir, tmp_path, tiny_model(), train, lambda d, t, f: progress.append((d, t, f)), on_event=on_event)

    losses = [m["value"] for m in res.metrics if m["name"] == "loss"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses
    s = res.stats
    assert s["steps"] == 30 and s["completed"] and s["stopped_by"] is None and s["resumed_from_step"] == 0
    assert s["tokens_seen"] == s["global_batch_tokens"] * 30 == 30 * 4 * 16
    assert s["final_loss"] == pytest.approx(np.mean(losses[-10:]))
    assert s["tokens_per_s"] > 0 and s["parameters"] > 0
    assert (s["engine"], s["world_size"], s["device"]) == ("single", 1, "cpu")
    assert progress[-1][:2] == (30, 30) and {"loss", "tok/s"} <= set(progress[-1][2])

    # Every logged step carries the full set; memory as rss/peak on CPU.
    for step in range(1, 31):
        names = {m["name"] for m in res.metrics if m["step"] == step}
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "epoch"} <= names, (step, names)
        assert any(n.startswith("memory_") for n in names), names
    assert series(res.metrics, "lr") == {step: pytest.approx(lr_at(step - 1, train)) for step in range(1, 31)}
    windows = TokenLoader(open_shards(shards_dir), "train", seq_len=16, batch_size=4, seed=train.seed).windows
    assert series(res.metrics, "epoch")[30] == pytest.approx(30 * 4 / windows)
    val = series(res.metrics, "val_loss")
    assert list(val) == [15, 30]
    assert series(res.metrics, "val_perplexity") == {k: pytest.approx(math.exp(v)) for k, v in val.items()}
    assert s["val_loss"] == val[30]

    final = res.outputs["checkpoint"]
    assert final == tmp_path / "final"
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "model_config.json", "train_config.json"]
    mc = json.loads((final / "model_config.json").read_text())
    assert mc["model"]["vocab_size"] == 300 and mc["model"]["n_kv_heads"] == 2 and mc["model"]["ffn_dim"] > 0
    assert (mc["bos_id"], mc["eos_id"]) == (1, 2)
    assert json.loads((final / "train_config.json").read_text())["steps"] == 30
    model, _ = load_checkpoint(final)
    assert model.cfg.vocab_size == 300
    # The last checkpoint holds the same weights as final/.
    assert_same_weights(final, tmp_path / "checkpoints" / "step_000030")

    # keep_last=2: step 10 was pruned; no temp directories are left behind.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000020", "step_000030"]
    assert not list(tmp_path.glob(".tmp-*"))
    logs = res.outputs["logs"]
    assert logs == tmp_path / "logs"
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert rows == res.metrics
    assert [p.name for p in (logs / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]

    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert set(kinds) == {"started", "metrics", "checkpoint", "checkpoint_pruned", "finished"}
    assert (events[0]["step"], events[0]["steps"], events[0]["world"], events[0]["engine"]) == (0, 30, 1, "single")
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [10, 20, 30]
    assert [e["step"] for e in events if e["event"] == "checkpoint_pruned"] == [10]
    assert mismatched == []
    assert [p for e in events if e["event"] == "metrics" for p in e["points"]] == res.metrics
    assert events[-1]["stats"] == res.stats


def test_resume_is_bit_identical_to_a_straight_run(shards_dir: Path, tmp_path: Path) -> None:
    train = cfg(steps=10, checkpoint_every=3, eval_every=5, eval_batches=2)
    straight = run_train(shards_dir, tmp_path / "straight", tiny_model(), train)

    part = run_train(shards_dir, tmp_path / "resumed", tiny_model(), train, stop_at_step=5)
    assert part.stats["steps"] == 5 and not part.stats["completed"] and part.stats["stopped_by"] == "stop_at_step"
    assert part.outputs["checkpoint"] == tmp_path / "resumed" / "checkpoints" / "step_000005"
    assert not (tmp_path / "resumed" / "final").exists()
    shutil.copytree(tmp_path / "resumed", tmp_path / "from3")

    events: list[dict] = []
    resumed = run_train(shards_dir, tmp_path / "resumed", tiny_model(), train, on_event=events.append)
    assert resumed.stats["resumed_from_step"] == 5 and resumed.stats["completed"]
    assert [(e["step"], e["saved_world"], e["world"]) for e in events if e["event"] == "resumed"] == [(5, 1, 1)]
    assert_same_weights(straight.outputs["checkpoint"], resumed.outputs["checkpoint"])
    assert deterministic(resumed.metrics) == deterministic(straight.metrics)
    assert resumed.stats["final_loss"] == straight.stats["final_loss"]
    assert resumed.stats["tokens_seen"] == straight.stats["tokens_seen"]
    assert resumed.stats["val_loss"] == straight.stats["val_loss"]
    # The log on disk has each step once, not the resumed steps twice.
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len({(r["step"], r["name"]) for r in rows}) == len(rows) == len(straight.metrics)

    # An explicit, older checkpoint: the run goes on from there and still ends on the same bits.
    older = run_train(shards_dir, tmp_path / "from3", tiny_model(), train, resume_from=tmp_path / "from3" / "checkpoints" / "step_000003")
    assert older.stats["resumed_from_step"] == 3
    assert_same_weights(straight.outputs["checkpoint"], older.outputs["checkpoint"])


def test_should_stop_checkpoints_and_returns(shards_dir: Path, tmp_path: Path) -> None:
    calls = iter(range(100))
    res = run_train(shards_dir, tmp_path, tiny_model(), cfg(steps=10, checkpoint_every=100), should_stop=lambda: next(calls) >= 2)
    assert res.stats["steps"] == 3 and not res.stats["completed"] and res.stats["stopped_by"] == "request"
    path = res.outputs["checkpoint"]
    assert path == tmp_path / "checkpoints" / "step_000003"
    trainer = json.loads((path / "trainer.json").read_text())
    assert trainer["step"] == 3 and trainer["loader"]["position"] == 3 * 4 and trainer["world"] == 1
    assert not (tmp_path / "final").exists()


def test_resume_refuses_another_seed_model_or_shard_set_and_keeps_the_checkpoint(shards_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_train(shards_dir, out, tiny_model(), cfg(steps=10), stop_at_step=5)
    with pytest.raises(ConfigError, match=r"train\.seed") as err:
        run_train(shards_dir, out, tiny_model(), cfg(steps=10, seed=7))
    assert "fresh output directory" in err.value.hint
    with pytest.raises(ConfigError, match=r"train\.seq_len"):
        run_train(shards_dir, out, tiny_model(), cfg(steps=10, seq_len=8))
    with pytest.raises(TrainingError, match="different model"):
        run_train(shards_dir, out, tiny_model(dim=64), cfg(steps=10))
    other = tmp_path / "other_shards"
    shutil.copytree(shards_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "note": "another shard set"}))
    with pytest.raises(TrainingError, match="different shard set"):
        run_train(other, out, tiny_model(), cfg(steps=10))
    # A good checkpoint of another configuration is the user's to sort out: never set aside.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000005"]


def test_tampered_shard_is_refused_naming_it(shards_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "shards"
    shutil.copytree(shards_dir, bad)
    shard = bad / "train_000.bin"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0x01  # one bit in the token payload
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="train_000.bin") as err:
        run_train(bad, tmp_path / "out", tiny_model(), cfg(steps=2))
    assert err.value.hint
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_non_finite_loss_names_the_step_and_suggests_lower_lr(shards_dir: Path, tmp_path: Path) -> None:
    train = cfg(lr=1e5, min_lr=0.0, warmup_steps=0, grad_clip=0.0, steps=10, checkpoint_every=100)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf|-inf) at step \d+") as err:
        run_train(shards_dir, tmp_path, tiny_model(), train)
    assert "train.lr" in err.value.hint and "now 100000" in err.value.hint


def test_unknown_and_invalid_train_keys_are_named() -> None:
    with pytest.raises(ConfigError, match=r"train\.xyz") as err:
        from_mapping(TrainConfig, {"steps": 5, "xyz": 1}, source="recipe.toml", prefix="train")
    assert "lr" in err.value.hint
    with pytest.raises(ConfigError, match="min_lr"):
        from_mapping(TrainConfig, {"lr": 1e-4, "min_lr": 1e-3}, source="recipe.toml", prefix="train")
    with pytest.raises(ConfigError, match=r"train\.device"):
        from_mapping(TrainConfig, {"device": "tpu"}, source="recipe.toml", prefix="train")
    with pytest.raises(ConfigError, match=r"train\.schedule"):
        from_mapping(TrainConfig, {"schedule": "linear"}, source="recipe.toml", prefix="train")
    for key, value in [("keep_last", 0), ("grad_accum", 0), ("decay_fraction", 0.0), ("log_every", 0)]:
        with pytest.raises(ConfigError, match=key):
            from_mapping(TrainConfig, {key: value}, source="recipe.toml", prefix="train")
    train = from_mapping(TrainConfig, {"steps": 5, "lr": 1, "eval_every": 2}, source="recipe.toml", prefix="train")
    assert train.lr == 1.0 and train.eval_every == 2


def test_unknown_and_invalid_distributed_keys_are_named() -> None:
    with pytest.raises(ConfigError, match=r"distributed\.gpus") as err:
        from_mapping(DistConfig, {"gpus": 2}, source="recipe.toml", prefix="distributed")
    assert "nproc_per_node" in err.value.hint
    with pytest.raises(ConfigError, match="deepspeed_config"):
        from_mapping(DistConfig, {"engine": "deepspeed"}, source="recipe.toml", prefix="distributed")
    with pytest.raises(ConfigError, match="nproc_per_node"):
        from_mapping(DistConfig, {"nproc_per_node": 0}, source="recipe.toml", prefix="distributed")
    with pytest.raises(ConfigError, match=r"distributed\.nproc_per_node"):
        from_mapping(DistConfig, {"nproc_per_node": "two"}, source="recipe.toml", prefix="distributed")
    with pytest.raises(ConfigError, match=r"distributed\.engine"):
        from_mapping(DistConfig, {"engine": "horovod"}, source="recipe.toml", prefix="distributed")
    with pytest.raises(ConfigError, match="timeout_s"):
        from_mapping(DistConfig, {"timeout_s": 0}, source="recipe.toml", prefix="distributed")
    ok = from_mapping(DistConfig, {"engine": "fsdp", "nproc_per_node": 2, "timeout_s": 30}, source="recipe.toml", prefix="distributed")
    assert (ok.engine, ok.nproc_per_node, ok.timeout_s) == ("fsdp", 2, 30)


def test_job_spec_keys_are_named(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"shards": "s", "out_dir": "o", "events": "e", "train": {"stpes": 3}}))
    with pytest.raises(ConfigError, match=r"train\.stpes"):
        read_spec(spec)
    spec.write_text(json.dumps({"shards": "s", "out_dir": "o", "events": "e", "distributed": {"engine": "fsdp", "nnodes": 0}}))
    with pytest.raises(ConfigError, match="nnodes"):
        read_spec(spec)
    spec.write_text(json.dumps({"shards": "s", "out_dir": "o", "events": "e"}))
    assert read_spec(spec).records_dir is None  # no service watching: retention as configured
    spec.write_text(json.dumps({"shards": "s", "out_dir": "o", "events": "e", "records_dir": "/srv/run/records"}))
    assert read_spec(spec).records_dir == "/srv/run/records"


def test_fsdp_without_a_launcher_is_a_config_error(shards_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"distributed\.engine") as err:
        run_train(shards_dir, tmp_path, tiny_model(), cfg(steps=2), dist_cfg=DistConfig(engine="fsdp"))
    assert "torchrun" in err.value.message


def test_seq_len_longer_than_model_is_a_config_error(shards_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.seq_len") as err:
        run_train(shards_dir, tmp_path, tiny_model(max_seq_len=8), cfg(seq_len=16))
    assert "model.max_seq_len" in err.value.message


def test_gradient_accumulation_equals_the_bigger_batch(shards_dir: Path, tmp_path: Path) -> None:
    # The loader hands out consecutive windows, so two micro-batches of 4 are the batch of 8;
    # the loss of each is scaled by 1/2, so the summed gradient is the mean over all 8 rows.
    accum = run_train(shards_dir, tmp_path / "accum", tiny_model(), cfg(steps=3, batch_size=4, grad_accum=2, checkpoint_every=100))
    whole = run_train(shards_dir, tmp_path / "whole", tiny_model(), cfg(steps=3, batch_size=8, grad_accum=1, checkpoint_every=100))
    assert accum.stats["tokens_seen"] == whole.stats["tokens_seen"] == 3 * 8 * 16
    for name in ("loss", "grad_norm", "epoch"):
        a, b = series(accum.metrics, name), series(whole.metrics, name)
        assert list(a) == list(b) == [1, 2, 3]
        assert list(a.values()) == pytest.approx(list(b.values()), rel=1e-5, abs=1e-6), name
    # Adam divides by sqrt(v) + eps: where a gradient is about eps, float rounding of the two
    # summation orders can move that one weight by up to 2 lr. Everything else must agree closely.
    wa, wb = weights(accum.outputs["checkpoint"]), weights(whole.outputs["checkpoint"])
    diff = torch.cat([(wa[name] - wb[name]).abs().flatten() for name in wa])
    assert (diff > 1e-6).float().mean() < 1e-3, diff.topk(5)
    assert diff.max() <= 2 * 3 * cfg().lr
    # Without accumulation the same 3 steps would see other data: the equality above is not free.
    half = run_train(shards_dir, tmp_path / "half", tiny_model(), cfg(steps=3, batch_size=4, grad_accum=1, checkpoint_every=100))
    assert series(half.metrics, "loss")[2] != pytest.approx(series(whole.metrics, "loss")[2], rel=1e-5)


def test_retention_keeps_the_last_two_and_every_fourth(shards_dir: Path, tmp_path: Path) -> None:
    events: list[dict] = []
    run_train(shards_dir, tmp_path, tiny_model(), cfg(steps=12, checkpoint_every=2, keep_last=2, keep_every=4), on_event=events.append)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004", "step_000008", "step_000010", "step_000012"]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4, 6, 8, 10, 12]
    assert [e["step"] for e in events if e["event"] == "checkpoint_pruned"] == [2, 6]


class LaggingService:
    """Records each checkpoint one save late, as a service busy hashing would; stops recording after ``dies_after``."""

    def __init__(self, records: Path, dies_after: int | None = None) -> None:
        self.records, self.dies_after = records, dies_after
        self.seen: list[int] = []
        self.pruned_unrecorded: list[int] = []
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if event["event"] == "checkpoint":
            if self.seen and (self.dies_after is None or self.seen[-1] <= self.dies_after):
                ckpt.mark_recorded(self.records, self.seen[-1])
            self.seen.append(event["step"])
        elif event["event"] == "checkpoint_pruned" and event["step"] not in ckpt.recorded_steps(self.records):
            self.pruned_unrecorded.append(event["step"])


def test_retention_prunes_only_what_the_service_has_recorded(shards_dir: Path, tmp_path: Path) -> None:
    service = LaggingService(tmp_path / "records")
    run_train(shards_dir, tmp_path / "out", tiny_model(), cfg(steps=12, checkpoint_every=2, keep_last=2), on_event=service, records_dir=service.records)
    assert service.pruned_unrecorded == []
    # Each save finds the one before it recorded: keep_last counts recorded checkpoints, and the newest waits.
    assert [e["step"] for e in service.events if e["event"] == "checkpoint_pruned"] == [2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step_000008", "step_000010", "step_000012"]
    # After the job the service prunes what is left, with every step recorded.
    assert ckpt.prune(tmp_path / "out", 2, 0, recorded={8, 10, 12}) == [8]


def test_a_dead_service_keeps_every_checkpoint_from_its_ledger_on_disk(shards_dir: Path, tmp_path: Path) -> None:
    service = LaggingService(tmp_path / "records", dies_after=4)
    run_train(shards_dir, tmp_path / "out", tiny_model(), cfg(steps=12, checkpoint_every=2, keep_last=2), on_event=service, records_dir=service.records)
    # Recorded: 2 and 4. The job went on saving 6..12, none of them recorded: nothing may be deleted.
    assert ckpt.recorded_steps(service.records) == {2, 4}
    assert [e for e in service.events if e["event"] == "checkpoint_pruned"] == []
    assert steps_on_disk(tmp_path / "out") == [2, 4, 6, 8, 10, 12]


def test_a_stale_record_does_not_cover_a_checkpoint_saved_again(shards_dir: Path, tmp_path: Path) -> None:
    records = tmp_path / "records"
    # Markers of an earlier attempt's checkpoints at the same steps; nobody records this attempt's.
    for step in (2, 4, 6):
        ckpt.mark_recorded(records, step)
    events: list[dict] = []
    run_train(shards_dir, tmp_path / "out", tiny_model(), cfg(steps=6, checkpoint_every=2, keep_last=1), on_event=events.append, records_dir=records)
    assert ckpt.recorded_steps(records) == set()
    assert [e for e in events if e["event"] == "checkpoint_pruned"] == []
    assert steps_on_disk(tmp_path / "out") == [2, 4, 6]


def steps_on_disk(out: Path) -> list[int]:
    return [s for p in ckpt.list_checkpoints(out) if (s := ckpt.step_of(p)) is not None]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda_with_bf16_autocast(shards_dir: Path, tmp_path: Path) -> None:
    res = run_train(shards_dir, tmp_path, tiny_model(), tiny_train(steps=20, device="cuda", lr=3e-3))
    losses = [m["value"] for m in res.metrics if m["name"] == "loss"]
    assert res.stats["device"].startswith("cuda")
    assert np.mean(losses[-3:]) < losses[0]
    assert any(m["name"] == "memory_allocated_mib" for m in res.metrics)
    # Weights are saved in float32 whatever the autocast dtype.
    assert all(t.dtype == torch.float32 for t in weights(res.outputs["checkpoint"]).values())
