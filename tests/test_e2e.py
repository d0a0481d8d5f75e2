"""End to end: a tiny recipe through every stage, then proof, export, and tampering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.conftest import cli, single_operator

pytestmark = pytest.mark.slow
MODEL_SIGNING = str(Path(sys.executable).with_name("model_signing"))


def test_run_summary_has_the_figures(finished_run: tuple[Path, object]) -> None:
    _, s = finished_run
    assert s.stats["curate"]["documents_out"] > 10
    assert s.stats["shard"]["train_tokens"] > 1000
    assert s.stats["train"]["steps"] == 12
    assert s.stats["evaluate"]["perplexity"] > 1
    assert s.model_path.is_dir() and (s.model_path / "model.sig").is_file()
    # recipe, sources, raw, dataset, tokenizer, shards, 1+ checkpoints, report, model
    assert s.artifacts_recorded >= 9


def test_ledger_verifies_and_lineage_reaches_the_sources(finished_run: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, s = finished_run
    code, out, err = cli(capsys, "--home", str(home), "ledger", "verify", "--json")
    assert code == 0, err
    assert json.loads(out)["head_checked"] is True
    code, out, _ = cli(capsys, "--home", str(home), "ledger", "query", "--json", f"SELECT kind, name FROM ancestors('{s.model_digest}')")
    kinds = {r["kind"] for r in json.loads(out)}
    assert {"source", "raw-documents", "dataset", "tokenizer", "token-shards", "checkpoint", "eval-report", "recipe"} <= kinds
    # and the other way round: which models were trained on this source file?
    code, out, _ = cli(
        capsys,
        "--home",
        str(home),
        "ledger",
        "query",
        "--json",
        "SELECT d.kind FROM (SELECT digest FROM artifacts WHERE kind = 'source' LIMIT 1) s, descendants(s.digest) d",
    )
    assert "model" in {r["kind"] for r in json.loads(out)}
    code, out, _ = cli(capsys, "--home", str(home), "ledger", "query", "--json", "SELECT status FROM runs")
    assert [r["status"] for r in json.loads(out)] == ["succeeded"]


def test_every_stored_artifact_verifies(finished_run: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = finished_run
    code, out, _ = cli(capsys, "--home", str(home), "artifact", "list", "--json")
    stored = [a for a in json.loads(out) if a["kind"] != "source"]
    assert stored
    for art in stored:
        code, out, err = cli(capsys, "--home", str(home), "artifact", "verify", art["digest"])
        assert code == 0, err


def test_standard_model_signing_cli_accepts_the_model(finished_run: tuple[Path, object]) -> None:
    home, s = finished_run
    proc = subprocess.run(
        [
            MODEL_SIGNING,
            "verify",
            "key",
            str(s.model_path),
            "--signature",
            str(s.model_path / "model.sig"),
            "--public_key",
            str(home / "keys" / "node.pub.pem"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_export_then_tamper_names_the_file(home_copy: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, s = home_copy
    single_operator(home)  # one person exports here (the two-person flow: test_approvals)
    out_dir = tmp_path / "export"
    code, out, err = cli(capsys, "--home", str(home), "model", "export", s.model_digest[:16], "--out", str(out_dir))
    assert code == 0, err
    proc = subprocess.run(
        [
            MODEL_SIGNING,
            "verify",
            "key",
            str(out_dir / "model"),
            "--signature",
            str(out_dir / "model" / "model.sig"),
            "--public_key",
            str(out_dir / "signer.pub.pem"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    weights = out_dir / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    code, _, err = cli(capsys, "--home", str(home), "model", "verify", str(out_dir / "model"))
    assert code == 2 and "model.safetensors" in err
    proc = subprocess.run(
        [
            MODEL_SIGNING,
            "verify",
            "key",
            str(out_dir / "model"),
            "--signature",
            str(out_dir / "model" / "model.sig"),
            "--public_key",
            str(out_dir / "signer.pub.pem"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0


def _event_count(home: Path) -> int:
    con = duckdb.connect(str(home / "ledger.duckdb"), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        con.close()


def test_edited_ledger_row_is_named(home_copy: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = home_copy
    con = duckdb.connect(str(home / "ledger.duckdb"))
    con.execute("UPDATE events SET body = replace(body, 'succeeded', 'failed') WHERE kind = 'run.finished'")
    seq = con.execute("SELECT seq FROM events WHERE kind = 'run.finished'").fetchone()[0]
    con.close()
    code, _, err = cli(capsys, "--home", str(home), "ledger", "verify")
    assert code == 2 and f"seq {seq}" in err


def test_deleted_ledger_row_is_named(home_copy: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = home_copy
    con = duckdb.connect(str(home / "ledger.duckdb"))
    con.execute("DELETE FROM events WHERE seq = 5")
    con.close()
    code, _, err = cli(capsys, "--home", str(home), "ledger", "verify")
    assert code == 2 and "seq 5" in err


def test_rows_cut_off_the_end_are_caught_by_the_signed_head(home_copy: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = home_copy
    head = tmp_path / "head.json"
    assert cli(capsys, "--home", str(home), "ledger", "head", "--out", str(head))[0] == 0
    total = _event_count(home)
    con = duckdb.connect(str(home / "ledger.duckdb"))
    con.execute(f"DELETE FROM events WHERE seq > {total - 3}")
    con.close()
    code, _, err = cli(capsys, "--home", str(home), "ledger", "verify", "--head", str(head))
    assert code == 2 and str(total) in err


def test_tampered_store_object_is_named(home_copy: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, s = home_copy
    digest = s.artifacts["shards"]
    obj = next((home / "store").rglob(digest))
    shard = sorted(obj.glob("*.bin"))[0]
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = cli(capsys, "--home", str(home), "artifact", "verify", digest[:16])
    assert code == 2 and shard.name in err


def test_sandboxed_query_refuses_writes_and_files(finished_run: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = finished_run
    for sql in ("DELETE FROM events", "SELECT * FROM read_csv('/etc/passwd')", "SELECT 1; SELECT 2"):
        code, _, err = cli(capsys, "--home", str(home), "ledger", "query", sql)
        assert code == 2 and "error:" in err


def test_model_card_states_the_provenance(finished_run: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, s = finished_run
    card = (s.model_path / "README.md").read_text(encoding="utf-8")
    assert s.recipe_digest in card and s.run_id in card
    assert s.artifacts["shards"] in card and s.artifacts["checkpoint"] in card
    code, out, _ = cli(capsys, "--home", str(home), "ledger", "query", "--json", "SELECT digest, name FROM artifacts WHERE kind = 'source'")
    sources = json.loads(out)
    assert sources and all(src["digest"] in card for src in sources)


def test_demo_command_on_the_whole_stdlib_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import platform

    assets = Path(__file__).with_name("assets")
    code, out, err = cli(capsys, "--home", str(tmp_path / "home"), "demo", "--recipe", str(assets / "tiny.toml"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["model_id"].startswith("sha256:")
    assert result["context"]["corpus"]["python"] == platform.python_version()
    assert result["documents"] > 100 and result["perplexity"] > 1
    code, _, err = cli(capsys, "--home", str(tmp_path / "home"), "ledger", "verify")
    assert code == 0, err


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("appliance")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "ledger" in proc.stdout
    proc = subprocess.run([str(exe), "ledger", "verify", "--home-typo"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_model_list_and_home_after_the_subcommand(finished_run: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, s = finished_run
    code, out, err = cli(capsys, "model", "list", "--home", str(home), "--json")
    assert code == 0, err
    assert [m["digest"] for m in json.loads(out)] == [s.model_digest]
    code, out, _ = cli(capsys, "--home", str(home), "model", "list")
    assert s.model_digest in out


def test_artifact_verify_checks_the_ledger_record_too(home_copy: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    home, s = home_copy
    digest = s.artifacts["tokenizer"]
    code, out, err = cli(capsys, "--home", str(home), "artifact", "verify", digest, "--json")
    assert code == 0, err
    seq = json.loads(out)["seq"]
    con = duckdb.connect(str(home / "ledger.duckdb"))
    con.execute(f'UPDATE events SET body = replace(body, \'"kind":"tokenizer"\', \'"kind":"dataset"\') WHERE seq = {seq}')
    con.close()
    code, _, err = cli(capsys, "--home", str(home), "artifact", "verify", digest[:16])
    assert code == 2 and f"seq {seq}" in err
