"""Bad input through the CLI: a clear error naming the culprit, exit 2, nothing half-recorded."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from tests.conftest import PASSPHRASE, cli

pytestmark = pytest.mark.slow


@pytest.fixture
def home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    h = tmp_path / "home"
    code, _, err = cli(capsys, "--home", str(h), "init")
    assert code == 0, err
    return h


def rows(home: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(home / "ledger.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _run_fails(home: Path, recipe: Path, capsys: pytest.CaptureFixture[str], named: str) -> str:
    code, _, err = cli(capsys, "--home", str(home), "run", str(recipe))
    assert code == 2, err
    assert named in err
    assert "Traceback" not in err
    return err


def _only_failed_runs_recorded(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert rows(home, "SELECT status FROM runs") == [("failed",)]
    # No stage output of the failed run was recorded; only the recipe it was started with.
    assert rows(home, "SELECT DISTINCT kind FROM artifacts") in ([], [("recipe",)])
    assert cli(capsys, "--home", str(home), "ledger", "verify")[0] == 0


def test_non_utf8_file_is_named(home: Path, tiny_recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tiny_recipe.parent / "corpus" / "latin1.txt").write_bytes("caf\xe9 au lait, encore du caf\xe9\n".encode("latin-1") * 5)
    _run_fails(home, tiny_recipe, capsys, "latin1.txt")
    _only_failed_runs_recorded(home, capsys)


def test_binary_file_is_named(home: Path, tiny_recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tiny_recipe.parent / "corpus" / "blob.txt").write_bytes(bytes(range(256)) * 8)
    _run_fails(home, tiny_recipe, capsys, "blob.txt")
    _only_failed_runs_recorded(home, capsys)


def test_malformed_jsonl_line_is_named(home: Path, tiny_recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tiny_recipe.parent / "corpus" / "broken.jsonl").write_text('{"text": "fine line of text here"}\n{"text": "oops\n', encoding="utf-8")
    err = _run_fails(home, tiny_recipe, capsys, "broken.jsonl")
    assert "2" in err  # the line number
    _only_failed_runs_recorded(home, capsys)


def test_empty_folder(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\nname = "empty"\nsource = "empty"\n')
    _run_fails(home, recipe, capsys, "empty")


def test_unknown_recipe_key_records_only_the_decision(home: Path, tiny_recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = rows(home, "SELECT count(*) FROM events")[0][0]
    tiny_recipe.write_text(tiny_recipe.read_text().replace("[train]\n", "[train]\nwarmpu_steps = 3\n"))
    _run_fails(home, tiny_recipe, capsys, "train.warmpu_steps")
    # The service decides before it reads the recipe: the decision is recorded, no run is.
    assert rows(home, f"SELECT kind FROM events WHERE seq > {before}") == [("authz.decision",)]
    assert rows(home, "SELECT count(*) FROM runs") == [(0,)]


def test_wrong_passphrase_records_nothing(home: Path, tiny_recipe: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    before = rows(home, "SELECT count(*) FROM events")
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", PASSPHRASE + "!")
    err = _run_fails(home, tiny_recipe, capsys, "passphrase")
    assert "node.key" in err
    assert rows(home, "SELECT count(*) FROM events") == before


def test_not_a_home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "--home", str(tmp_path / "nowhere"), "ledger", "verify")
    assert code == 2 and "appliance init" in err


def test_someone_else_is_refused_and_the_refusal_recorded(home: Path, tiny_recipe: Path) -> None:
    from appliance.service import Caller, Service
    from appliance.service.api import dispatch
    from policies.errors import PolicyError

    mallory = Caller(uid=4242, user="mallory", gids=(), groups=())
    with Service.open(home, PASSPHRASE.encode()) as svc, pytest.raises(PolicyError, match="mallory"):
        dispatch(svc, mallory, "run.start", {"recipe": str(tiny_recipe)})
    denied = rows(home, "SELECT identity, action, allowed FROM decisions")
    assert ("mallory", "run.start", False) in denied
    assert rows(home, "SELECT count(*) FROM runs") == [(0,)]


def test_half_present_home_names_what_is_missing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (home / "keys" / "node.key").unlink()
    code, _, err = cli(capsys, "--home", str(home), "demo")
    assert code == 2 and "node.key is missing" in err and "backup" in err


def test_sigterm_stops_training_with_a_checkpoint_and_the_run_is_recorded_as_stopped(home: Path, tiny_recipe: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    tiny_recipe.write_text(tiny_recipe.read_text().replace("steps = 12", "steps = 100000"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "--home", str(home), "run", str(tiny_recipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    # Wait until training has started (the train stage's work dir appears), then cancel.
    deadline = time.monotonic() + 120
    while not list((home / "work").glob("*/train/checkpoints")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    [(status, error)] = rows(home, "SELECT status, error FROM runs")
    # The client turned SIGTERM into a cancel request; the record says who cancelled.
    assert status == "stopped" and "cancelled by " in error and "appliance resume" in error
    assert rows(home, "SELECT stage FROM stages WHERE status = 'stopped'") == [("train",)]
    assert rows(home, "SELECT count(*) FROM stages WHERE status = 'failed'") == [(0,)]
    # The step it stopped at was checkpointed and that checkpoint recorded.
    assert rows(home, "SELECT count(*) FROM checkpoints WHERE status = 'saved'")[0][0] >= 1


def test_skip_mode_records_every_skipped_file_and_line(home: Path, tiny_recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tiny_recipe.parent / "corpus"
    (corpus / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 5)
    (corpus / "blob.txt").write_bytes(bytes(range(256)) * 8)
    (corpus / "broken.jsonl").write_text(
        '{"text": "a good line of documentation text, long enough to keep around"}\n{"text": "oops\n{"body": "x"}\n', encoding="utf-8"
    )
    good = gzip.compress(b'{"text": "compressed documentation that is cut off"}\n' * 200)
    (corpus / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    pq.write_table(pa.table({"body": ["no text column"]}), corpus / "schema.parquet")
    tiny_recipe.write_text(tiny_recipe.read_text() + '\n[ingest]\non_error = "skip"\n', encoding="utf-8")

    code, out, err = cli(capsys, "--home", str(home), "run", str(tiny_recipe))
    assert code == 0, err
    skipped = dict((path, (whole, n)) for path, whole, n in rows(home, "SELECT path, whole_file, records_skipped FROM skipped ORDER BY path"))
    assert skipped["latin1.txt"][0] and skipped["blob.txt"][0] and skipped["schema.parquet"][0]
    assert skipped["broken.jsonl"] == (False, 2)
    assert skipped["cut.jsonl.gz"][0] is False
    reasons = {r[0] for r in rows(home, "SELECT unnest(json_keys(reasons)) FROM skipped")}
    assert {"not_utf8", "binary", "malformed_json", "missing_field", "truncated", "wrong_schema"} <= reasons
    # The rejects list (every skipped line) is a stored, signed artifact.
    assert rows(home, "SELECT count(*) FROM artifacts WHERE kind = 'ingest-rejects'") == [(1,)]

    code, out, err = cli(capsys, "--home", str(home), "data", "skipped", "latest")
    assert code == 0 and "broken.jsonl: 2 records" in out and "blob.txt: whole file (binary 1)" in out
    code, out, err = cli(capsys, "--home", str(home), "data", "card", "latest")
    assert code == 0 and "Skipped at ingest" in out and "malformed_json" in out
    code, out, err = cli(capsys, "--home", str(home), "data", "card", "latest", "--json")
    card = __import__("json").loads(out)
    assert card["sources"]["files_skipped"] == 3 and card["tokens"]["total"] > 0
    assert cli(capsys, "--home", str(home), "ledger", "verify")[0] == 0


def test_data_commands_name_what_is_missing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "--home", str(home), "data", "card", "latest")
    assert code == 2 and "no runs" in err and "Traceback" not in err
    code, _, err = cli(capsys, "--home", str(home), "data", "dropped", "run-nope'; DROP")
    assert code == 2 and "not a run id" in err
