"""The job launcher: options, the torchrun command, the event tail, ports and failure messages."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from appliance.jobs.launch import LaunchOptions, check_port, command, failure_message
from appliance.jobs.runner import job_env
from pipeline.errors import ConfigError
from pipeline.events import EventTail

# torchrun's own summary after a worker was killed with SIGKILL (torch 2.13), as it appears in
# the launcher log; the survivor was sent SIGTERM by torchrun and is listed first.
TORCHRUN_SUMMARY = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
=======================================================
pipeline.training.job FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-21_15:45:20
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 19176)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 19176
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-21_15:45:20
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 19177)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 19177
=======================================================
"""


def test_one_process_runs_the_job_module_behind_the_egress_guard() -> None:
    cmd = command(Path("spec.json"), LaunchOptions())
    assert cmd == [sys.executable, "-m", "airgap.run", "pipeline.training.job", "spec.json"]


def test_one_node_uses_a_standalone_rendezvous_and_no_restarts() -> None:
    cmd = command(Path("spec.json"), LaunchOptions(nproc_per_node=4))
    assert cmd[1:4] == ["-m", "airgap.run", "torch.distributed.run"]
    assert cmd[-4:] == ["-m", "airgap.run", "pipeline.training.job", "spec.json"]  # each worker too
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd and "--max-restarts=0" in cmd


def test_several_nodes_use_a_static_rendezvous_at_node_0() -> None:
    cmd = command(Path("spec.json"), LaunchOptions(nproc_per_node=8, nnodes=2, node_rank=1, rdzv_endpoint="head:29500"))
    assert {"--nnodes=2", "--node-rank=1", "--rdzv-backend=static", "--rdzv-endpoint=head:29500", "--master-addr=head", "--master-port=29500"} <= set(cmd)
    assert "--standalone" not in cmd


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"nproc_per_node": 0}, "--nproc-per-node"),
        ({"nnodes": 0}, "--nnodes"),
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "--node-rank"),
        ({"nnodes": 2, "rdzv_endpoint": "no-port"}, "--rdzv-endpoint"),
        ({"nnodes": 2, "rdzv_endpoint": "h:70000"}, "--rdzv-endpoint"),
    ],
)
def test_bad_launch_options_name_the_flag(options: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        LaunchOptions(**options)


def test_a_taken_rendezvous_port_is_refused_on_node_0() -> None:
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port}"):
            check_port(LaunchOptions(nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}"))
        # Other nodes do not bind it: node 0 holds it.
        check_port(LaunchOptions(nnodes=2, node_rank=1, rdzv_endpoint=f"127.0.0.1:{port}"))


def test_event_tail_returns_whole_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []
    path.write_text(json.dumps({"event": "started"}) + "\n" + '{"event": "metrics", "poi')
    assert tail.read() == [{"event": "started"}]
    with open(path, "a") as f:
        f.write('nts": []}\n{"event": "nonsense"}\n{"event": "checkpoint"}\nnot json\n')
    # A torn line waits for its end; unknown kinds and events without their fields are dropped.
    assert tail.read() == [{"event": "metrics", "points": []}]
    assert tail.read() == []


def test_a_job_gets_no_passphrase_and_none_of_the_callers_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", "secret")
    monkeypatch.setenv("APPLIANCE_PASSPHRASE_FILE", "/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    env = job_env(LaunchOptions())
    assert not any("PASSPHRASE" in k or k.startswith("AWS") for k in env)
    assert env["OMP_NUM_THREADS"] == "3" and env["HF_HUB_OFFLINE"] == "1" and "APPLIANCE_JOB_PARENT" in env


def test_failure_message_names_the_rank_that_died_first_and_how(tmp_path: Path) -> None:
    out = tmp_path / "train"
    (out / "errors").mkdir(parents=True)
    (out / "errors" / "rank_00000.json").write_text(json.dumps({"rank": 0, "message": "lost contact with another rank (it died or hung)"}))
    log = tmp_path / "launcher.log"
    log.write_text("some output\n" + TORCHRUN_SUMMARY)
    message = failure_message(out, log, 1)
    assert message.startswith("training process rank 1 failed first (killed by SIGKILL)")
    assert "rank 0: lost contact" in message


def test_failure_message_falls_back_to_rank_errors_then_the_log_tail(tmp_path: Path) -> None:
    out = tmp_path / "train"
    log = tmp_path / "launcher.log"
    log.write_text("line 1\nValueError: something broke\n")
    assert "something broke" in failure_message(out, log, 1)
    (out / "errors").mkdir(parents=True)
    (out / "errors" / "rank_00000.json").write_text(json.dumps({"rank": 0, "message": "training diverged: loss is nan at step 3"}))
    assert failure_message(out, log, 2) == "rank 0: training diverged: loss is nan at step 3"
    assert "SIGKILL" in failure_message(tmp_path / "none", tmp_path / "none.log", -9)
