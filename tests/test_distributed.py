"""The training job under torchrun on loopback (gloo, one thread per rank), and killed, stopped or
corrupted single-process jobs that must resume to the very bits of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from keys.digest import sha256_path
from pipeline.model import LlamaModel, read_model_config
from pipeline.train import DistConfig, TrainConfig, run_train
from pipeline.training.checkpoint import checkpoint_digest, find_resumable, verify_checkpoint
from pipeline.training.dist import DistContext
from pipeline.training.engine_native import NativeEngine
from tests import dist_helpers as h
from tests.training_fixtures import shards_dir, tiny_model, tiny_train, tokenizer_path  # noqa: F401  (fixtures)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds worker processes through /proc"),
]

STEPS = 20
MID = 10


def train(**overrides: Any) -> TrainConfig:
    return tiny_train(**{"steps": STEPS, "checkpoint_every": MID, "keep_last": 3, "num_threads": 1, **overrides})


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float) -> None:
    """Equal up to float reduction order. Adam divides by sqrt(v) + eps, so where a gradient is
    about eps a rounding difference can move that one weight by up to 2 lr per step; all the
    others must agree closely."""
    assert set(a) == set(b)
    diff = torch.cat([(a[n] - b[n]).abs().flatten() for n in a])
    assert (diff > 1e-5).float().mean() < 1e-3, diff.topk(5)
    assert diff.max() <= 2 * lr * STEPS


def assert_close_curves(a: dict[int, float], b: dict[int, float]) -> None:
    assert list(a) == list(b)
    assert list(a.values()) == pytest.approx(list(b.values()), rel=1e-4, abs=1e-5)


@dataclass
class Run:
    spec: Path | None
    out: Path
    events: list[dict[str, Any]]
    ranks: Path | None = None

    @property
    def final(self) -> dict[str, torch.Tensor]:
        return weights(self.out / "final")

    @property
    def losses(self) -> dict[int, float]:
        return h.loss_curve(self.events)


def torchrun_job(
    base: Path, name: str, shards: Path, *, engine: str, batch_size: int = 4, grad_accum: int = 1, capture: bool = True, out: Path | None = None
) -> Run:
    out = out or base / name
    spec = h.write_spec(
        base / f"{name}.json",
        shards=shards,
        out_dir=out,
        model=tiny_model(),
        train=train(batch_size=batch_size, grad_accum=grad_accum),
        distributed=DistConfig(engine=engine, nproc_per_node=2, timeout_s=60),
    )  # type: ignore[arg-type]
    ranks = base / f"{name}_ranks" if capture else None
    module, extra = ("tests.dist_helpers", [str(ranks)]) if capture else ("pipeline.training.job", None)
    h.check(h.run(h.torchrun_cmd(spec, nproc=2, module=module, extra=extra)))
    return Run(spec, out, h.read_events(spec), ranks)


def in_process(out: Path, shards: Path, *, batch_size: int) -> Run:
    events: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    try:
        run_train(shards, out, tiny_model(), train(batch_size=batch_size), on_event=events.append)
    finally:
        torch.set_num_threads(threads)
    return Run(None, out, events)


@pytest.fixture(scope="module")
def runs(shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """One launch each, all with a global batch of the same 8 windows per step: DDP on 2 ranks ×
    batch 4; FSDP on 2 ranks × 2 micro-batches of 2 (gradients reduced on the last one only);
    one process × batch 8."""
    base = tmp_path_factory.mktemp("dist")
    return {
        "ddp": torchrun_job(base, "ddp", shards_dir, engine="ddp"),
        "fsdp": torchrun_job(base, "fsdp", shards_dir, engine="fsdp", batch_size=2, grad_accum=2),
        "single": in_process(base / "single", shards_dir, batch_size=8),
    }


def test_ddp_ranks_end_with_identical_weights_and_optimizer_state(runs: dict[str, Run]) -> None:
    run = runs["ddp"]
    assert run.events[0]["engine"] == "ddp" and run.events[0]["world"] == 2
    r0, r1 = (h.load_rank_state(run.ranks, r) for r in (0, 1))  # type: ignore[arg-type]
    assert_equal_weights(r0["params"], r1["params"])
    for name in r0["optim"]:
        assert_equal_weights(r0["optim"][name], r1["optim"][name])
    # And rank 0 wrote what the ranks hold.
    assert_equal_weights(r0["params"], run.final)


def test_fsdp_rank_shards_make_up_the_written_weights(runs: dict[str, Run]) -> None:
    run = runs["fsdp"]
    assert run.events[0]["engine"] == "fsdp" and run.events[0]["world"] == 2
    r0, r1 = (h.load_rank_state(run.ranks, r) for r in (0, 1))  # type: ignore[arg-type]
    joined = {name: torch.cat([r0["params"][name], r1["params"][name]]) for name in r0["params"]}
    assert any(r0["params"][n].shape != joined[n].shape for n in joined), "parameters were not sharded"
    assert_equal_weights(joined, run.final)
    # Both ranks took every optimizer step.
    assert {float(s["step"]) for rank in (r0, r1) for s in rank["optim"].values()} == {float(STEPS)}


def test_ddp_and_fsdp_reach_the_same_curve_and_weights(runs: dict[str, Run]) -> None:
    assert len(runs["ddp"].losses) == STEPS
    assert_close_curves(runs["ddp"].losses, runs["fsdp"].losses)
    assert_close_weights(runs["ddp"].final, runs["fsdp"].final, train().lr)


def test_two_ranks_of_batch_4_match_one_process_of_batch_8(runs: dict[str, Run]) -> None:
    single = runs["single"]
    assert single.events[0]["world"] == 1
    assert_close_curves(runs["ddp"].losses, single.losses)
    assert_close_weights(runs["ddp"].final, single.final, train().lr)
    assert list(single.losses.values())[-1] < list(single.losses.values())[0] - 0.5


def test_a_checkpoint_of_two_fsdp_ranks_loads_into_one_process_exactly(runs: dict[str, Run]) -> None:
    run = runs["fsdp"]
    path = run.out / "checkpoints" / f"step_{STEPS:06d}"
    verify_checkpoint(path)
    assert sorted(p.name for p in (path / "state").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    mcfg, _ = read_model_config(path)
    torch.manual_seed(0)  # any initialisation: the load must overwrite all of it
    engine = NativeEngine(LlamaModel(mcfg), train(), torch.device("cpu"), DistContext())
    engine.load(path / "state")
    loaded = {name: p.detach() for name, p in engine.model.named_parameters()}
    assert_equal_weights(loaded, weights(path))
    # The optimizer state too: every Adam moment equals the two ranks' shards joined.
    r0, r1 = (h.load_rank_state(run.ranks, r) for r in (0, 1))  # type: ignore[arg-type]
    for name, param in engine.model.named_parameters():
        state = engine.optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], torch.cat([r0["optim"][name][key], r1["optim"][name][key]])), (name, key)
        assert float(state["step"]) == STEPS


def keep_only_mid_checkpoint(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    shutil.rmtree(dest / "final")
    for p in (dest / "checkpoints").iterdir():
        if p.name != f"step_{MID:06d}":
            shutil.rmtree(p)
    return dest


def test_fsdp_checkpoint_resumes_on_one_process(runs: dict[str, Run], shards_dir: Path, tmp_path: Path) -> None:
    out = keep_only_mid_checkpoint(runs["fsdp"].out, tmp_path / "resume1")
    resumed = in_process(out, shards_dir, batch_size=8)
    assert [(e["step"], e["saved_world"], e["world"]) for e in resumed.events if e["event"] == "resumed"] == [(MID, 2, 1)]
    after = {s: v for s, v in resumed.losses.items() if s > MID}
    assert list(after) == list(range(MID + 1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(v)) for v in after.values())
    assert after[STEPS] < after[MID + 1]
    assert_close_curves(after, {s: v for s, v in runs["fsdp"].losses.items() if s > MID})
    # Had the Adam moments not come along, the first updates after the resume would differ by ~lr.
    assert_close_weights(resumed.final, runs["fsdp"].final, train().lr)


def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(runs: dict[str, Run], shards_dir: Path, tmp_path: Path) -> None:
    out = keep_only_mid_checkpoint(runs["single"].out, tmp_path / "resume2")
    resumed = torchrun_job(tmp_path, "resume2", shards_dir, engine="fsdp", capture=False, out=out)
    assert [(e["step"], e["saved_world"], e["world"]) for e in resumed.events if e["event"] == "resumed"] == [(MID, 1, 2)]
    assert list(resumed.losses) == list(range(MID + 1, STEPS + 1))
    assert_close_curves(resumed.losses, {s: v for s, v in runs["single"].losses.items() if s > MID})
    assert_close_weights(resumed.final, runs["single"].final, train().lr)


def test_two_nodes_on_loopback_match_a_standalone_run(runs: dict[str, Run], shards_dir: Path, tmp_path: Path) -> None:
    spec = h.write_spec(
        tmp_path / "nodes.json",
        shards=shards_dir,
        out_dir=tmp_path / "nodes",
        model=tiny_model(),
        train=train(),
        distributed=DistConfig(engine="ddp", nnodes=2, timeout_s=60),
    )
    port = h.free_port()
    nodes = [h.start(h.torchrun_cmd(spec, nproc=1, nnodes=2, node_rank=r, port=port)) for r in (0, 1)]
    try:
        results = [p.communicate(timeout=h.LAUNCH_TIMEOUT_S) for p in nodes]
    finally:
        for p in nodes:
            h.kill_group(p)
    for p, (_, err) in zip(nodes, results):
        assert p.returncode == 0, err[-4000:]
    events = h.read_events(spec)
    assert events[0]["world"] == 2 and events[0]["engine"] == "ddp"
    # Same ranks, same windows, same two-term gradient sums: the very same bits.
    assert h.loss_curve(events) == runs["ddp"].losses
    assert_equal_weights(weights(tmp_path / "nodes" / "final"), runs["ddp"].final)


def test_a_dead_rank_fails_the_run_promptly(shards_dir: Path, tmp_path: Path) -> None:
    spec = h.write_spec(
        tmp_path / "dead.json",
        shards=shards_dir,
        out_dir=tmp_path / "dead",
        model=tiny_model(),
        train=train(steps=1_000_000, checkpoint_every=100_000),
        distributed=DistConfig(engine="ddp", nproc_per_node=2, timeout_s=30),
    )
    launcher = h.start(h.torchrun_cmd(spec, nproc=2))
    try:
        h.wait_for(spec, launcher, h.metrics_at_or_after(3))
        victim = h.worker_pid(launcher.pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        # Well inside the launch timeout; without prompt failure the survivor would wait for the
        # process-group timeout and then for the launcher's own shutdown grace period.
        _, err = launcher.communicate(timeout=120)
    finally:
        h.kill_group(launcher)
    assert launcher.returncode != 0
    assert f"pid: {victim}" in err and "SIGKILL" in err, err[-4000:]
    events = h.read_events(spec)
    assert "finished" not in {e["event"] for e in events}
    errors = [e for e in events if e["event"] == "error"]
    assert errors and errors[0]["rank"] == 0, events[-3:]
    assert (tmp_path / "dead" / "errors" / "rank_00000.json").is_file()


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(shards_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "term"
    spec = h.write_spec(
        tmp_path / "term.json",
        shards=shards_dir,
        out_dir=out,
        model=tiny_model(),
        train=train(steps=1_000_000, checkpoint_every=100_000),
        distributed=DistConfig(engine="fsdp", nproc_per_node=2, timeout_s=30),
    )
    launcher = h.start(h.torchrun_cmd(spec, nproc=2))
    try:
        h.wait_for(spec, launcher, h.metrics_at_or_after(3))
        # torchrun passes SIGTERM on to its workers; they agree on the step to stop at.
        os.kill(launcher.pid, signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:
        h.kill_group(launcher)
    # torchrun reports the signal it received as its own failure (exit 1), so a clean stop is
    # read from the events, not from the launcher's exit status.
    events = h.read_events(spec)
    assert events[-1]["event"] == "stopped", (events[-3:], err[-3000:])
    step = events[-1]["step"]
    info = verify_checkpoint(out / "checkpoints" / f"step_{step:06d}")
    assert {"state/__0_0.distcp", "state/__1_0.distcp", "rng/rank_00000.pt", "rng/rank_00001.pt"} <= set(info.files)
    assert not (out / "errors").exists()


# -- a single job killed, stopped or given a corrupted checkpoint ---------------------------

JOB_STEPS = 120
JOB_EVERY = 20


def job_spec(path: Path, shards: Path, out: Path) -> Path:
    return h.write_spec(path, shards=shards, out_dir=out, model=tiny_model(), train=train(steps=JOB_STEPS, checkpoint_every=JOB_EVERY, keep_last=2))


@pytest.fixture(scope="module")
def straight(shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    base = tmp_path_factory.mktemp("straight")
    spec = job_spec(base / "straight.json", shards_dir, base / "out")
    h.check(h.run(h.job_cmd(spec)))
    return Run(spec, base / "out", h.read_events(spec))


def rerun(spec: Path) -> list[dict[str, Any]]:
    before = len(h.read_events(spec))
    h.check(h.run(h.job_cmd(spec)))
    return h.read_events(spec)[before:]


def assert_same_as_straight(run_out: Path, events: list[dict[str, Any]], straight: Run) -> None:
    assert events[-1]["event"] == "finished" and events[-1]["stats"]["completed"]
    assert_equal_weights(weights(run_out / "final"), straight.final)
    rows = [json.loads(line) for line in (run_out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["value"] for r in rows if r["name"] == "loss"} == straight.losses
    assert events[-1]["stats"]["final_loss"] == straight.events[-1]["stats"]["final_loss"]


def test_killed_job_resumes_to_the_same_bits(straight: Run, shards_dir: Path, tmp_path: Path) -> None:
    k = random.randrange(JOB_EVERY + 5, JOB_STEPS // 2)
    spec = job_spec(tmp_path / "killed.json", shards_dir, tmp_path / "out")
    job = h.start(h.job_cmd(spec))
    try:
        h.wait_for(spec, job, h.metrics_at_or_after(k))
        os.kill(job.pid, signal.SIGKILL)
        job.communicate(timeout=60)
    finally:
        h.kill_group(job)
    assert job.returncode == -signal.SIGKILL
    assert not (tmp_path / "out" / "final").exists(), f"the job finished before the kill at step {k}"
    events = rerun(spec)
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] % JOB_EVERY == 0 and resumed[0]["step"] >= JOB_EVERY, (k, resumed)
    assert_same_as_straight(tmp_path / "out", events, straight)


@pytest.fixture(scope="module")
def sigtermed(shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[dict[str, Any]], Path]]:
    """A job stopped by SIGTERM: (spec, its events, an untouched copy of its output directory)."""
    base = tmp_path_factory.mktemp("sigterm")
    spec = job_spec(base / "term.json", shards_dir, base / "out")
    job = h.start(h.job_cmd(spec))
    try:
        h.wait_for(spec, job, h.metrics_at_or_after(random.randrange(JOB_EVERY + 5, JOB_STEPS // 2)))
        os.kill(job.pid, signal.SIGTERM)
        _, err = job.communicate(timeout=120)
    finally:
        h.kill_group(job)
    assert job.returncode == 0, err[-4000:]
    shutil.copytree(base / "out", base / "copy")
    yield spec, h.read_events(spec), base / "copy"


def test_sigterm_stops_with_a_checkpoint_and_the_rerun_matches(sigtermed: tuple[Path, list[dict[str, Any]], Path], straight: Run) -> None:
    spec, events, _ = sigtermed
    stopped = events[-1]
    assert stopped["event"] == "stopped" and stopped["signal"] == "SIGTERM", events[-3:]
    step = stopped["step"]
    assert JOB_EVERY < step < JOB_STEPS
    assert [e for e in events if e["event"] == "checkpoint"][-1]["step"] == step
    out = Path(json.loads(spec.read_text())["out_dir"])
    verify_checkpoint(out / "checkpoints" / f"step_{step:06d}")
    assert not (out / "final").exists()
    again = rerun(spec)
    assert [e["step"] for e in again if e["event"] == "resumed"] == [step]
    assert_same_as_straight(out, again, straight)


def test_a_corrupted_latest_checkpoint_is_rejected_and_the_previous_one_used(
    sigtermed: tuple[Path, list[dict[str, Any]], Path], straight: Run, shards_dir: Path, tmp_path: Path
) -> None:
    _, events, copy = sigtermed
    out = tmp_path / "out"
    shutil.copytree(copy, out)
    latest = events[-1]["step"]
    previous = (latest - 1) // JOB_EVERY * JOB_EVERY
    shard = out / "checkpoints" / f"step_{latest:06d}" / "state" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    spec = job_spec(tmp_path / "corrupt.json", shards_dir, out)
    h.check(h.run(h.job_cmd(spec)))
    again = h.read_events(spec)
    rejected = [e for e in again if e["event"] == "checkpoint_rejected"]
    assert [e["step"] for e in rejected] == [latest] and "state/__0_0.distcp" in rejected[0]["reason"]
    assert (out / "checkpoints" / f"rejected-step_{latest:06d}").is_dir()
    assert [e["step"] for e in again if e["event"] == "resumed"] == [previous]
    assert_same_as_straight(out, again, straight)
    # What is left verifies, and its digest is the one the store computes for the directory.
    info, bad = find_resumable(out)
    assert info is not None and bad == [] and checkpoint_digest(info) == sha256_path(info.path)
