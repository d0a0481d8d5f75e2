"""Full fine-tuning: every weight of a tiny local base trains inside the pre-training engines.

One process through ``train_adapter`` (the one-process engine), then the fine-tuning job under
torchrun with two ranks on DDP and on FSDP2 (gloo, loopback only), each against one process
that sees the same micro-batches: the engines change where the work happens, not the result.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from pipeline.errors import ConfigError  # noqa: E402
from pipeline.settings.finetune import DatasetConfig, FinetuneConfig  # noqa: E402
from pipeline.training.config import DistConfig, TrainConfig  # noqa: E402
from tests.dist_helpers import check, job_cmd, read_events, run, torchrun_cmd  # noqa: E402
from tests.finetune_fixtures import build_tiny_base  # noqa: E402

LINES = [
    "The module provides functions for working with paths.",
    "Call open() to read a file; the result is a file object.",
    "Lists hold items in order, and dictionaries map keys to values.",
    "A function returns a value; a generator yields many.",
    "Errors are raised as exceptions and handled with try and except.",
    "Strings are immutable; numbers can be integers or floating point.",
]
JOB = "pipeline.finetune.job"
ZERO2 = Path(__file__).parent / "assets" / "deepspeed" / "zero2.json"


def fcfg(**kw: Any) -> FinetuneConfig:
    return FinetuneConfig(base="base", method="full", allow_unsigned_base=True, datasets=[DatasetConfig(path="train.jsonl")], val_fraction=0.2, **kw)  # type: ignore[arg-type]


def tcfg(**kw: Any) -> TrainConfig:
    base = {"steps": 6, "batch_size": 2, "seq_len": 32, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 1, "seed": 3}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base, verified (base.json) and its examples rendered (examples.parquet), as the run's first stages leave them."""
    from pipeline.finetune.stages import run_base, run_examples

    root = tmp_path_factory.mktemp("full")
    build_tiny_base(root / "base")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES * 3), encoding="utf-8")
    base = run_base(fcfg(), root, root / "base_stage", [])
    examples = run_examples(fcfg(), root, base.outputs["base"], root / "examples_stage", lambda *a: None)
    return {"root": root, "base": root / "base", "base_json": base.outputs["base"], "examples": examples.outputs["examples"]}


def train_here(prepared: dict[str, Path], out: Path, cfg: TrainConfig, **kw: Any) -> dict[str, Any]:
    from pipeline.finetune.stages import train_finetune

    events: list[dict[str, Any]] = []
    stats = train_finetune(fcfg(), cfg, prepared["base_json"], prepared["examples"], out, on_event=events.append, **kw)
    stats["events"] = events
    return stats


def weights(final: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(final / "model.safetensors"))


@pytest.fixture(scope="module")
def single(prepared: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return train_here(prepared, tmp_path_factory.mktemp("single") / "run", tcfg())


def test_every_weight_trains_and_the_model_loads_in_transformers(single: dict[str, Any], prepared: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    assert single["completed"] and single["engine"] == "single" and single["method"] == "full"
    losses = [e["loss"] for e in single["events"] if e["event"] == "log"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    final = Path(single["adapter"])
    base = AutoModelForCausalLM.from_pretrained(prepared["base"], local_files_only=True)
    tuned = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    assert single["trainable_parameters"] == sum(p.numel() for p in base.parameters())
    moved = [n for (n, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters(), strict=True) if not torch.equal(a, b)]
    assert len(moved) == len(list(base.parameters())), "some weight did not train"
    # The tied head stays tied, and the tokenizer and chat template came along byte for byte.
    assert "lm_head.weight" not in weights(final) and tuned.lm_head.weight is tuned.model.embed_tokens.weight
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (prepared["base"] / name).is_file():
            assert (final / name).read_bytes() == (prepared["base"] / name).read_bytes()


def test_full_checkpoints_hold_the_engine_state_of_every_rank(single: dict[str, Any]) -> None:
    from pipeline.training import checkpoint as ckpt

    out = Path(single["adapter"]).parent
    kept = ckpt.list_checkpoints(out)
    assert [p.name for p in kept] == ["step_000003", "step_000006"]
    info = ckpt.verify_checkpoint(kept[-1])
    assert "state/.metadata" in info.files and "rng/rank_00000.pt" in info.files and "trainer.json" in info.files
    assert not any(f.startswith("trainable") for f in info.files)  # the engine's DCP files, not an adapter's
    trainer = json.loads((kept[-1] / "trainer.json").read_text())
    assert trainer["engine"] == "single" and trainer["spec"]["method"] == "full"


def test_stop_then_resume_is_bit_identical(single: dict[str, Any], prepared: dict[str, Path], tmp_path: Path) -> None:
    asked = {"n": 0}

    def stop_after_two() -> bool:
        asked["n"] += 1
        return asked["n"] >= 2

    first = train_here(prepared, tmp_path / "run", tcfg(), should_stop=stop_after_two)
    assert not first["completed"] and first["steps"] == 2
    second = train_here(prepared, tmp_path / "run", tcfg())
    assert second["completed"] and second["resumed_from_step"] == 2
    got, want = weights(Path(second["adapter"])), weights(Path(single["adapter"]))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_adapters_on_several_processes_are_refused_before_anything_loads() -> None:
    from pipeline.finetune.train_state import engine_for
    from pipeline.training.dist import DistContext

    with pytest.raises(ConfigError, match="2 processes"):
        engine_for("lora", DistConfig(nproc_per_node=2), DistContext(rank=0, world=2, initialised=True))
    with pytest.raises(ConfigError, match="one process"):
        engine_for("qlora", DistConfig(engine="fsdp"), DistContext())
    assert engine_for("full", DistConfig(), DistContext()) == "single"
    assert engine_for("full", DistConfig(), DistContext(rank=0, world=2, initialised=True)) == "ddp"


# -- two ranks under torchrun --------------------------------------------------------------------


def write_job(path: Path, prepared: dict[str, Path], out: Path, train: TrainConfig, distributed: DistConfig) -> Path:
    deepspeed = None
    if distributed.engine == "deepspeed":
        from pipeline.training.ds_config import read_json, resolve_deepspeed_config

        # Resolved against the recipe as the service resolves it before a launch.
        deepspeed, _ = resolve_deepspeed_config(read_json(ZERO2), train, distributed.nproc_per_node, "cpu", source=str(ZERO2))
    body = {
        "deepspeed": deepspeed,
        "base_json": str(prepared["base_json"]),
        "examples": str(prepared["examples"]),
        "out_dir": str(out),
        "events": str(path.with_suffix(".events.jsonl")),
        "finetune": dataclasses.asdict(fcfg()),
        "train": dataclasses.asdict(train),
        "distributed": dataclasses.asdict(distributed),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_process(prepared: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The job alone with grad_accum 2: the same micro-batches two ranks of grad_accum 1 see together."""
    root = tmp_path_factory.mktemp("one")
    spec = write_job(root / "job.json", prepared, root / "out", tcfg(steps=4, grad_accum=2, num_threads=1), DistConfig())
    check(run(job_cmd(spec, module=JOB)))
    return {"out": root / "out", "events": read_events(spec)}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "deepspeed"])
def test_two_ranks_give_what_one_process_gives(engine: str, prepared: dict[str, Path], one_process: dict[str, Any], tmp_path: Path) -> None:
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    dcfg = DistConfig(engine=engine, nproc_per_node=2, deepspeed_config=str(ZERO2) if engine == "deepspeed" else "")  # type: ignore[arg-type]
    spec = write_job(tmp_path / "job.json", prepared, tmp_path / "out", tcfg(steps=4, num_threads=1), dcfg)
    check(run(torchrun_cmd(spec, nproc=2, module=JOB)))
    events = read_events(spec)
    finished = [e for e in events if e["event"] == "finished"][-1]["stats"]
    assert finished["engine"] == engine and finished["world_size"] == 2 and finished["completed"]
    want = [e["loss"] for e in one_process["events"] if e["event"] == "log"]
    got = [e["loss"] for e in events if e["event"] == "log"]
    # fp32 sums in another order differ in the last bits; a lost rank or a wrong scale by far more.
    assert got == pytest.approx(want, rel=0, abs=2e-5)
    a, b = weights(tmp_path / "out" / "final"), weights(one_process["out"] / "final")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=5e-5, msg=name)
    # Every rank's share of every checkpoint is in its manifest.
    from pipeline.training import checkpoint as ckpt

    info = ckpt.verify_checkpoint(ckpt.list_checkpoints(tmp_path / "out")[-1])
    assert {"rng/rank_00000.pt", "rng/rank_00001.pt"} <= set(info.files)
    if engine == "deepspeed":  # ZeRO's own sharded state, one optimizer shard per rank
        assert sum("zero_pp_rank_" in f and "optim_states" in f for f in info.files) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_fine_tuning_on_a_gpu_in_bf16(prepared: dict[str, Path], tmp_path: Path) -> None:
    # fp32 master weights, bf16 autocast compute: the additive packing mask meets bf16 activations.
    stats = train_here(prepared, tmp_path / "run", tcfg(device="cuda", precision="bf16"))
    assert stats["completed"] and stats["device"].startswith("cuda")
    losses = [e["loss"] for e in stats["events"] if e["event"] == "log"]
    assert all(v == v for v in losses) and losses[-1] < losses[0]
    assert weights(Path(stats["adapter"]))["model.embed_tokens.weight"].dtype == torch.float32
