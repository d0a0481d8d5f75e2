"""`appliance train` and `appliance resume` through the service: ranks, stop, tamper, resume.

The service runs training as a child job (torchrun for several ranks), signs and records each
checkpoint as it appears, and on resume trusts only a checkpoint whose digest matches its
``checkpoint.saved`` event.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ASSETS, PASSPHRASE, cli

pytestmark = pytest.mark.slow
APPLIANCE = str(Path(sys.executable).with_name("appliance"))


def recipe_with(path: Path, **train: object) -> Path:
    """tiny.toml with [train] values replaced or added (and a model slow enough to stop mid-run)."""
    text = (ASSETS / "tiny.toml").read_text()
    for key, value in train.items():
        line = f"{key} = {json.dumps(value)}"
        text, n = re.subn(rf"(?m)^{key} = .*$", line, text)
        if not n:
            text = text.replace("[train]\n", f"[train]\n{line}\n")
    path.write_text(text)
    return path


def query(home: Path, capsys: pytest.CaptureFixture[str], sql: str) -> list[dict]:
    code, out, err = cli(capsys, "--home", str(home), "ledger", "query", "--json", sql)
    assert code == 0, err
    return json.loads(out)


def test_train_on_an_earlier_runs_data_with_two_ranks(home_copy: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, first = home_copy
    recipe = recipe_with(home.parent / "ddp.toml", steps=8, checkpoint_every=4)
    code, out, err = cli(capsys, "--home", str(home), "train", str(recipe), "--data", first.run_id, "--nproc-per-node", "2", "--json")
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    assert run_id != first.run_id
    reused = query(home, capsys, f"SELECT data ->> '$.stage' AS stage FROM signed_events WHERE kind = 'stage.reused' AND data ->> '$.run_id' = '{run_id}'")
    assert sorted(r["stage"] for r in reused) == sorted(["ingest", "curate", "tokenizer", "shard", "card"])
    started = query(
        home,
        capsys,
        f"SELECT data ->> '$.world' AS world, data ->> '$.engine' AS engine FROM signed_events WHERE kind = 'train.started' AND data ->> '$.run_id' = '{run_id}'",
    )
    assert started == [{"world": "2", "engine": "ddp"}]
    saved = query(home, capsys, f"SELECT step, status, digest FROM checkpoints WHERE run_id = '{run_id}' ORDER BY seq")
    assert [(r["step"], r["status"]) for r in saved] == [(4, "saved"), (8, "saved")]
    # Each kept checkpoint became a store artifact under the digest signed while training ran.
    arts = {r["digest"] for r in query(home, capsys, f"SELECT digest FROM artifacts WHERE run_id = '{run_id}' AND kind = 'checkpoint'")}
    assert {r["digest"] for r in saved} <= arts
    names = {r["name"] for r in query(home, capsys, f"SELECT DISTINCT name FROM metrics WHERE run_id = '{run_id}'")}
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss"} <= names
    # The new model descends from the first run's shards: lineage crosses runs.
    shards = first.artifacts["shards"]
    model = query(home, capsys, f"SELECT digest FROM artifacts WHERE run_id = '{run_id}' AND kind = 'model'")[0]["digest"]
    ancestors = {r["digest"] for r in query(home, capsys, f"SELECT digest FROM ancestors('{model}')")}
    assert shards in ancestors
    code, _, err = cli(capsys, "--home", str(home), "ledger", "verify")
    assert code == 0, err


def test_deepspeed_zero2_recipe_trains_through_the_service(home_copy: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, first = home_copy
    shutil.copyfile(ASSETS / "deepspeed" / "zero2.json", home.parent / "zero2.json")
    recipe = recipe_with(home.parent / "ds.toml", steps=4, checkpoint_every=2)
    recipe.write_text(recipe.read_text() + '\n[distributed]\nengine = "deepspeed"\ndeepspeed_config = "zero2.json"\n')
    code, out, err = cli(capsys, "--home", str(home), "train", str(recipe), "--data", first.run_id, "--nproc-per-node", "2", "--json")
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    started = query(
        home,
        capsys,
        f"SELECT data ->> '$.engine' AS engine, data ->> '$.world' AS world FROM signed_events WHERE kind = 'train.started' AND data ->> '$.run_id' = '{run_id}'",
    )
    assert started == [{"engine": "deepspeed", "world": "2"}]
    config = query(
        home, capsys, f"SELECT data ->> '$.sha256' AS sha FROM signed_events WHERE kind = 'train.deepspeed_config' AND data ->> '$.run_id' = '{run_id}'"
    )
    assert len(config) == 1
    assert [r["step"] for r in query(home, capsys, f"SELECT step FROM checkpoints WHERE run_id = '{run_id}' AND status = 'saved' ORDER BY step")] == [2, 4]


def test_a_deepspeed_config_with_an_optimizer_is_refused_before_the_run(home_copy: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, first = home_copy
    body = json.loads((ASSETS / "deepspeed" / "zero2.json").read_text())
    body["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    (home.parent / "bad.json").write_text(json.dumps(body))
    recipe = recipe_with(home.parent / "bad.toml")
    recipe.write_text(recipe.read_text() + '\n[distributed]\nengine = "deepspeed"\ndeepspeed_config = "bad.json"\n')
    before = query(home, capsys, "SELECT count(*) AS n FROM runs")
    code, _, err = cli(capsys, "--home", str(home), "train", str(recipe), "--data", first.run_id, "--nproc-per-node", "2")
    assert code == 2 and "optimizer" in err and "bad.json" in err
    assert query(home, capsys, "SELECT count(*) AS n FROM runs") == before


def _events(home: Path, other_than: str) -> list[dict]:
    """The events of the training job that is not ``other_than``'s (the new run's)."""
    files = [p for p in (home / "work").glob("run-*/train/events.jsonl") if other_than not in str(p)]
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def test_sigterm_stops_with_a_checkpoint_and_resume_skips_a_tampered_one(home_copy: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, first = home_copy
    # Wide enough that a step takes tens of milliseconds: the signal lands mid-run.
    recipe = recipe_with(home.parent / "long.toml", steps=90, checkpoint_every=15, keep_last=5, log_every=1)
    text = recipe.read_text().replace("dim = 32\n", "dim = 128\n").replace("n_layers = 2\n", "n_layers = 4\n")
    recipe.write_text(text)
    env = dict(os.environ, APPLIANCE_PASSPHRASE=PASSPHRASE, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [APPLIANCE, "--home", str(home), "train", str(recipe), "--data", first.run_id, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while sum(e["event"] == "checkpoint" for e in _events(home, first.run_id)) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no second checkpoint in time"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "appliance resume" in err
    run_id = re.search(r"resume (run-\S+)`", err).group(1)
    rows = query(home, capsys, f"SELECT status FROM runs WHERE run_id = '{run_id}'")
    assert rows == [{"status": "stopped"}]
    saved = query(home, capsys, f"SELECT step, path FROM checkpoints WHERE run_id = '{run_id}' AND status = 'saved' ORDER BY step")
    assert len(saved) >= 3 and saved[-1]["step"] < 90  # two periodic ones, then the one the stop wrote

    # Tamper with the newest checkpoint: resume must set it aside and use the one before.
    latest = Path(saved[-1]["path"])
    shard = next((latest / "state").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    code, out, err = cli(capsys, "--home", str(home), "resume", run_id, "--json")
    assert code == 0, err
    rejected = query(home, capsys, f"SELECT step, reason FROM checkpoints WHERE run_id = '{run_id}' AND status = 'rejected'")
    assert [r["step"] for r in rejected] == [saved[-1]["step"]]
    assert "distcp" in rejected[0]["reason"]
    resumed = query(home, capsys, f"SELECT data ->> '$.step' AS step FROM signed_events WHERE kind = 'train.resumed' AND data ->> '$.run_id' = '{run_id}'")
    assert [int(r["step"]) for r in resumed] == [saved[-2]["step"]]
    assert query(home, capsys, f"SELECT status FROM runs WHERE run_id = '{run_id}'") == [{"status": "succeeded"}]

    # A straight run of the same recipe on the same data ends with the very same weights: the
    # final checkpoint artifact (weights + configs) has the same digest.
    env["OMP_NUM_THREADS"] = "1"
    straight = subprocess.run(
        [APPLIANCE, "--home", str(home), "train", str(recipe), "--data", first.run_id, "--json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert straight.returncode == 0, straight.stderr
    straight_id = json.loads(straight.stdout)["run_id"]
    finals = query(
        home, capsys, f"SELECT run_id, digest FROM artifacts WHERE kind = 'checkpoint' AND name LIKE '%/checkpoint' AND run_id IN ('{run_id}', '{straight_id}')"
    )
    assert len(finals) == 1 or len({r["digest"] for r in finals}) == 1, finals


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_node_0_records_and_node_1_joins(home_copy: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, first = home_copy
    recipe = recipe_with(home.parent / "nodes.toml", steps=6, checkpoint_every=3)
    job_file = home.parent / "shared" / "job.json"
    endpoint = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, APPLIANCE_PASSPHRASE=PASSPHRASE, OMP_NUM_THREADS="1")
    flags = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    head = subprocess.Popen(
        [APPLIANCE, "--home", str(home), "train", str(recipe), "--data", first.run_id, "--job-file", str(job_file), "--json", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Node 1 never opens the home: it waits for the job file, then runs its rank.
    worker = subprocess.run(
        [APPLIANCE, "train", "--join", str(job_file), "--node-rank", "1", "--join-timeout", "120", *flags], env=env, capture_output=True, text=True, timeout=300
    )
    out, err = head.communicate(timeout=300)
    assert head.returncode == 0, err
    assert worker.returncode == 0, worker.stderr
    run_id = json.loads(out)["run_id"]
    started = query(home, capsys, f"SELECT data ->> '$.world' AS world FROM signed_events WHERE kind = 'train.started' AND data ->> '$.run_id' = '{run_id}'")
    assert started == [{"world": "2"}]
    launch = query(home, capsys, f"SELECT data -> '$.launch' AS launch FROM signed_events WHERE kind = 'run.started' AND data ->> '$.run_id' = '{run_id}'")
    assert json.loads(launch[0]["launch"])["nnodes"] == 2
    # The stored checkpoint holds both ranks' files: node 1's reached the ledger through rank 0.
    stored = query(home, capsys, f"SELECT store_path FROM artifacts WHERE name = '{run_id}/checkpoint_step_000003'")[0]["store_path"]
    files = {p.relative_to(home / "store" / stored).as_posix() for p in (home / "store" / stored).rglob("*") if p.is_file()}
    assert {"rng/rank_00000.pt", "rng/rank_00001.pt", "state/__0_0.distcp", "state/__1_0.distcp", "COMPLETE"} <= files


def test_train_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = recipe_with(tmp_path / "r.toml")
    code, _, err = cli(capsys, "--home", str(tmp_path / "h"), "train", str(recipe), "--nnodes", "2", "--rdzv-endpoint", "nohostport")
    assert code == 2 and "--rdzv-endpoint" in err
    code, _, err = cli(capsys, "--home", str(tmp_path / "h"), "train", str(recipe), "--node-rank", "1", "--nnodes", "2")
    assert code == 2 and "--join" in err
    code, _, err = cli(
        capsys,
        "--home",
        str(tmp_path / "h"),
        "train",
        "--join",
        str(tmp_path / "none.json"),
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-endpoint",
        "127.0.0.1:29999",
        "--join-timeout",
        "0.5",
    )
    assert code == 2 and "did not appear" in err
    code, _, err = cli(capsys, "--home", str(tmp_path / "h"), "train")
    assert code == 2 and "RECIPE" in err


def test_resume_refuses_a_run_that_already_succeeded(home_copy: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, first = home_copy
    code, _, err = cli(capsys, "--home", str(home), "resume", first.run_id)
    assert code == 2 and "already succeeded" in err
    code, _, err = cli(capsys, "--home", str(home), "resume", "run-nosuchrun")
    assert code == 2 and "no run" in err
