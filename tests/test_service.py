"""The service as the one authority: jobs never outlive it, runs survive it, callers are checked.

Real processes, real signals: a stage job killed with SIGKILL fails its stage and leaves no
worker behind; a service (here the local-mode CLI process) killed with SIGKILL takes its
training job with it, leaves no checkpoint unrecorded, and the run resumes to the very same
weights as an uninterrupted one; the service reads a path only where the caller could.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.jobs.runner import RunLock, child_pids
from appliance.service import Caller
from appliance.service.api import dispatch
from appliance.service.resolve import run_events
from pipeline.errors import TrainingError
from policies.errors import PolicyError
from tests.conftest import PASSPHRASE, cli, new_home, run_to_end
from tests.test_train_cli import recipe_with

pytestmark = pytest.mark.slow
APPLIANCE = str(Path(sys.executable).with_name("appliance"))


def _cmdlines() -> dict[int, str]:
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                out[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _processes_mentioning(text: str) -> list[int]:
    return [pid for pid, cmd in _cmdlines().items() if text in cmd and pid != os.getpid() and _alive(pid)]


def _wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_killed_data_job_fails_its_stage_leaves_no_worker_and_the_run_resumes(tmp_path: Path, tiny_recipe: Path) -> None:
    corpus = tiny_recipe.parent / "corpus"
    # Enough documents that curation's worker pool is up before the job is killed.
    src = next(corpus.glob("*.jsonl"))
    for i in range(30):
        shutil.copyfile(src, corpus / f"copy_{i:02d}.jsonl")
    with new_home(tmp_path / "home") as svc:
        me = Caller.current()
        run_id = dispatch(svc, me, "run.start", {"recipe": str(tiny_recipe)})["run_id"]
        spec = svc.home.work_dir / run_id / "curate" / "job" / "job.json"
        job_pid: list[int] = []

        def curate_job_with_workers() -> bool:
            pids = _processes_mentioning(str(spec))
            job = [p for p in pids if child_pids(p)]
            job_pid[:] = job[:1]
            return bool(job)

        _wait_until(curate_job_with_workers, 120, "the curate job and its workers")
        os.kill(job_pid[0], signal.SIGKILL)
        final = svc.runs.wait(run_id, timeout=120)
        assert final["status"] == "failed" and "SIGKILL" in final["error"], final
        # The pool's workers followed their job: nothing mentioning its spec is left.
        _wait_until(lambda: not _processes_mentioning(str(spec)), 30, "curate workers to exit")
        rows = svc.ledger.select("SELECT stage, status FROM stages WHERE run_id = ? ORDER BY seq", [run_id])
        assert rows == [("ingest", "finished"), ("curate", "failed")]
        # The service is unharmed: it answers, verifies its ledger, and the run resumes.
        assert dispatch(svc, me, "ledger.verify", {})["ok"] is True
        dispatch(svc, me, "run.resume", {"run": run_id})
        assert svc.runs.wait(run_id, timeout=600)["status"] == "succeeded"
        assert dispatch(svc, me, "ledger.verify", {})["ok"] is True
        # A stage's time counts from the resume, not from the failure before it.
        shown = dispatch(svc, me, "run.show", {"run": run_id})
        (resumed,) = [e.ts for e in run_events(svc.ledger, run_id) if e.kind == "run.resumed"]
        assert shown["stage_began"]["curate"] == resumed > shown["stage_ts"]["ingest"]
        assert shown["stage_began"]["ingest"] < shown["stage_ts"]["ingest"]


def test_killing_the_service_stops_its_training_job_and_resume_ends_bit_identical(home_copy: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, first = home_copy
    recipe = recipe_with(home.parent / "long.toml", steps=90, checkpoint_every=15, keep_last=2, log_every=1)
    recipe.write_text(recipe.read_text().replace("dim = 32\n", "dim = 128\n").replace("n_layers = 2\n", "n_layers = 4\n"))
    env = dict(os.environ, APPLIANCE_PASSPHRASE=PASSPHRASE, OMP_NUM_THREADS="1")
    before = set((home / "work").iterdir())
    proc = subprocess.Popen(
        [APPLIANCE, "--home", str(home), "train", str(recipe), "--data", first.run_id],  # type: ignore[attr-defined]
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    work: list[Path] = []

    # A run dir appears, then its checkpoints get recorded (the service marks each one).
    def two_recorded() -> bool:
        assert proc.poll() is None, proc.communicate()
        new = [p for p in (home / "work").iterdir() if p not in before and p.name.startswith("run-")]
        work[:] = new
        return bool(new) and len(list((new[0] / "train" / "recorded").glob("step_*"))) >= 2

    _wait_until(two_recorded, 300, "two recorded checkpoints")
    run_dir = work[0]
    run_id = run_dir.name
    # The job never sees the passphrase its service was unlocked with.
    jobs = _processes_mentioning(str(run_dir))
    assert jobs
    for pid in jobs:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"PASSPHRASE" not in environ and PASSPHRASE.encode() not in environ
    # One run, one job: nobody else can take the run while its job lives.
    with pytest.raises(TrainingError, match="already has a job running"):
        RunLock(run_dir).acquire()
    proc.kill()
    proc.wait()
    # The training job follows its service at once: no process of this home is left running.
    _wait_until(lambda: not _processes_mentioning(str(home)), 30, "the training job to die with its service")
    checkpoints = sorted(p.name for p in (run_dir / "train" / "checkpoints").iterdir())
    time.sleep(2)
    assert sorted(p.name for p in (run_dir / "train" / "checkpoints").iterdir()) == checkpoints, "a checkpoint appeared after the service died"
    lock = RunLock(run_dir)
    lock.acquire()  # free again
    lock.release()

    # The next service on this home finds the run it left, records it, and resume completes it.
    code, out, err = cli(capsys, "--home", str(home), "runs", "show", run_id, "--json")
    assert code == 0, err
    assert json.loads(out)["status"] == "interrupted"
    code, out, err = cli(capsys, "--home", str(home), "resume", run_id, "--json")
    assert code == 0, err
    code, out, err = cli(capsys, "--home", str(home), "ledger", "query", "--json", f"SELECT status FROM runs WHERE run_id = '{run_id}'")
    assert json.loads(out) == [{"status": "succeeded"}]
    code, out, err = cli(
        capsys,
        "--home",
        str(home),
        "ledger",
        "query",
        "--json",
        f"SELECT data ->> '$.status' AS s FROM signed_events WHERE kind = 'run.finished' AND data ->> '$.run_id' = '{run_id}' ORDER BY seq",
    )
    assert [r["s"] for r in json.loads(out)] == ["interrupted", "succeeded"]

    # An uninterrupted run of the same recipe on the same data ends with the very same weights.
    straight = subprocess.run(
        [APPLIANCE, "--home", str(home), "train", str(recipe), "--data", first.run_id, "--json"],  # type: ignore[attr-defined]
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr
    straight_id = json.loads(straight.stdout)["run_id"]
    code, out, err = cli(
        capsys,
        "--home",
        str(home),
        "ledger",
        "query",
        "--json",
        f"SELECT run_id, digest FROM artifacts WHERE kind = 'checkpoint' AND name LIKE '%/checkpoint' AND run_id IN ('{run_id}', '{straight_id}')",
    )
    finals = json.loads(out)
    assert len(finals) == 1 or len({r["digest"] for r in finals}) == 1, finals
    assert cli(capsys, "--home", str(home), "ledger", "verify")[0] == 0


def test_the_service_reads_only_what_the_caller_could(tmp_path: Path, tiny_recipe: Path) -> None:
    # The home's owner is "nobody": allowed by the policy, but unable to read root's 0700 files.
    nobody = Caller.from_uid(65534)
    tmp_path.chmod(0o700)
    from appliance.service import Service

    with Service.initialise(tmp_path / "home", PASSPHRASE.encode(), nobody) as svc:
        with pytest.raises(PolicyError, match="may not read"):
            dispatch(svc, nobody, "run.start", {"recipe": str(tiny_recipe)})
        # The corpus is checked too, file by file, even when the recipe itself is readable.
        readable = Path(shutil.copy(tiny_recipe, "/tmp")).resolve()
        try:
            readable.chmod(0o644)
            text = readable.read_text().replace('source = "corpus"', f'source = "{tiny_recipe.parent / "corpus"}"')
            readable.write_text(text)
            with pytest.raises(PolicyError, match="corpus folder"):
                dispatch(svc, nobody, "run.start", {"recipe": str(readable)})
        finally:
            readable.unlink()
        rows = svc.ledger.select("SELECT identity, action, allowed FROM decisions WHERE action = 'run.start'")
        assert rows == [("nobody", "run.start", True), ("nobody", "run.start", True)]
        assert svc.ledger.select("SELECT count(*) FROM runs") == [(0,)]


def test_a_run_cannot_start_twice_and_a_second_service_is_refused(tmp_path: Path, tiny_recipe: Path) -> None:
    from appliance.service import Service
    from keys.errors import ApplianceError

    with new_home(tmp_path / "home") as svc:
        with pytest.raises(ApplianceError, match="holds the home"):
            Service.open(tmp_path / "home", PASSPHRASE.encode())
        final = run_to_end(svc, tiny_recipe)
        assert final["status"] == "succeeded"
        with pytest.raises(Exception, match="already succeeded"):
            dispatch(svc, Caller.current(), "run.resume", {"run": final["run_id"]})


def _serve(home: Path, socket: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [APPLIANCE, "--home", str(home), "serve", "--socket", str(socket), "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the service prints its facts once it listens
    assert line, proc.communicate()
    return proc


def test_kill_9_of_the_served_service_mid_training_then_restart_resumes_the_run(home_copy: tuple[Path, object], tmp_path: Path) -> None:
    from appliance.server.client import ServiceClient

    home, first = home_copy
    recipe = recipe_with(home.parent / "long.toml", steps=90, checkpoint_every=15, keep_last=2, log_every=1)
    recipe.write_text(recipe.read_text().replace("dim = 32\n", "dim = 128\n").replace("n_layers = 2\n", "n_layers = 4\n"))
    env = dict(os.environ, APPLIANCE_PASSPHRASE=PASSPHRASE, OMP_NUM_THREADS="1")
    socket = tmp_path / "sock" / "appliance.sock"
    service = _serve(home, socket, env)
    client = ServiceClient(socket)
    try:
        run_id = client.call("run.start", recipe=str(recipe), data_from=first.run_id)["run_id"]  # type: ignore[attr-defined]
        records = home / "work" / run_id / "train" / "recorded"
        _wait_until(lambda: len(list(records.glob("step_*"))) >= 2, 300, "two recorded checkpoints")
        service.kill()
        service.communicate()
        # Nothing of the run goes on without its authority.
        _wait_until(lambda: not _processes_mentioning(str(home / "work" / run_id)), 30, "the training job to die with the service")

        # Restarted, the service records what happened and resumes the run on its own.
        service = _serve(home, socket, env)
        _wait_until(lambda: client.call("run.show", run=run_id)["status"] in ("succeeded", "failed", "stopped"), 600, "the resumed run to end")
        shown = client.call("run.show", run=run_id)
        assert shown["status"] == "succeeded", shown
        statuses = client.call(
            "ledger.query",
            sql=f"SELECT data ->> '$.status' AS s FROM signed_events WHERE kind = 'run.finished' AND data ->> '$.run_id' = '{run_id}' ORDER BY seq",
        )["rows"]
        assert [r[0] for r in statuses] == ["interrupted", "succeeded"]
        resumed = client.call("ledger.query", sql=f"SELECT data ->> '$.by' FROM signed_events WHERE kind = 'run.resumed' AND data ->> '$.run_id' = '{run_id}'")
        assert resumed["rows"] == [["restart"]]
        # The same weights as an uninterrupted run of the same recipe on the same data.
        straight = client.call("run.start", recipe=str(recipe), data_from=first.run_id)["run_id"]  # type: ignore[attr-defined]
        _wait_until(lambda: client.call("run.show", run=straight)["status"] != "running", 600, "the straight run")
        finals = client.call(
            "ledger.query",
            sql="SELECT data ->> '$.run_id', data ->> '$.digest' FROM signed_events WHERE kind = 'artifact.recorded' "
            f"AND data ->> '$.name' IN ('{run_id}/checkpoint', '{straight}/checkpoint')",
        )["rows"]
        assert {r[0] for r in finals} == {run_id, straight} and len({r[1] for r in finals}) == 1, finals
        assert client.call("ledger.verify")["ok"] is True
    finally:
        client.close()
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            _, err = service.communicate(timeout=120)
            assert service.returncode == 0 and "Traceback" not in err, err


def test_a_replaced_public_key_file_is_named_and_nothing_is_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from keys.keystore import create_key

    with new_home(tmp_path / "home") as svc:
        before = svc.ledger.select("SELECT count(*) FROM events")
        real = svc.key.key_id
    other = create_key(tmp_path / "other.key", b"another passphrase here")
    shutil.copyfile(tmp_path / "other.pub.pem", tmp_path / "home" / "keys" / "node.pub.pem")
    code, _, err = cli(capsys, "--home", str(tmp_path / "home"), "ledger", "verify")
    assert code == 2 and "node.pub.pem" in err and other.key_id[:16] in err and real[:16] in err and "Traceback" not in err
    from appliance.service import Service
    from keys.errors import KeyStoreError

    # Twice: the failed open left the home unlocked. And nothing was recorded.
    for _ in range(2):
        with pytest.raises(KeyStoreError, match="node.pub.pem holds key"):
            Service.open(tmp_path / "home", PASSPHRASE.encode())
    import duckdb

    con = duckdb.connect(str(tmp_path / "home" / "ledger.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM events").fetchall() == before
    finally:
        con.close()
