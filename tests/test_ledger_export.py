"""The auditor's copy of the ledger: `ledger export --duckdb|--parquet` and `ledger verify-export`.

Real homes and ledgers, the real CLI in-process, and the real `duckdb` binary of the PyPI
`duckdb-cli` 1.5 package an auditor installs. The tampering tests do what someone holding
the copy could do: edit a row, cut rows off the end, swap in an older signed head, or sign
with their own key; each is refused with the seq or file it concerns.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from keys.keystore import create_key
from registry.errors import LedgerError, LedgerIntegrityError
from registry.ledger import Ledger
from registry.ledger_export import HEAD_KEY, verify_export
from tests.conftest import cli, new_home

DUCKDB_CLI = Path(sys.executable).parent / "duckdb"
COLUMNS = ["seq", "ts", "kind", "actor", "body", "prev_hash", "hash", "key_id", "signature"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with some events besides its own (start-up, policy, keys)."""
    path = tmp_path_factory.mktemp("exp") / "home"
    with new_home(path) as svc:
        for i in range(6):
            svc.ledger.append("note", "alice", {"i": i, "text": f"note {i}"})
    return path


def _export(capsys: pytest.CaptureFixture[str], home: Path, fmt: str, target: Path) -> dict[str, Any]:
    code, out, err = cli(capsys, "--home", str(home), "ledger", "export", f"--{fmt}", str(target), "--json")
    assert code == 0, err
    return json.loads(out)


def _verify(capsys: pytest.CaptureFixture[str], path: Path, *extra: str, key: Path | None = None) -> tuple[int, str, str]:
    return cli(capsys, "ledger", "verify-export", str(path), "--trusted-key", str(key), *extra)


def _tamper(path: Path, sql: str, params: list[Any] | None = None, head: dict[str, Any] | None = None) -> None:
    """Change an export's rows with SQL over ``events`` (and put ``head`` in, if given), keeping its shape."""
    if path.is_dir():  # Parquet: rewrite the file, the head in its metadata and head.json, as the export does
        file = path / "events.parquet"
        head = head or json.loads(pq.read_schema(file).metadata[HEAD_KEY.encode()])
        con = duckdb.connect()
        con.execute("CREATE TABLE events AS SELECT * FROM read_parquet(?)", [str(file)])
        con.execute(sql, params or [])
        con.execute(f"COPY (SELECT * FROM events ORDER BY seq) TO ? (FORMAT parquet, KV_METADATA {{'{HEAD_KEY}': ?}})", [str(file), json.dumps(head)])
        con.close()
        (path / "head.json").write_text(json.dumps(head))
        return
    con = duckdb.connect(str(path))
    con.execute(sql, params or [])
    if head is not None:
        con.execute("DELETE FROM ledger_head")
        con.execute("INSERT INTO ledger_head VALUES (?, ?, ?, ?, ?)", [head[c] for c in ("seq", "hash", "key_id", "ts", "signature")])
    con.close()


def _ledger_rows(home: Path, upto: int) -> list[tuple[Any, ...]]:
    with Ledger.open(home / "ledger.duckdb", None, read_only=True, head_path=None) as ledger:
        return ledger.select("SELECT seq, ts, kind, actor, body, prev_hash, hash, key_id, signature FROM events WHERE seq <= ? ORDER BY seq", [upto])


def test_parquet_export_holds_every_column_and_the_signed_head(capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path) -> None:
    result = _export(capsys, home, "parquet", tmp_path / "audit")
    folder = Path(result["path"])
    assert sorted(p.name for p in folder.iterdir()) == ["events.parquet", "head.json"]
    table = pq.read_table(folder / "events.parquet")
    assert table.column_names == COLUMNS
    # Every row of the ledger up to the head, byte for byte; the last is the export's own authorization.
    rows = [tuple(r.values()) for r in table.to_pylist()]
    assert rows == _ledger_rows(home, result["seq"])
    assert json.loads(rows[-1][4])["data"]["action"] == "ledger.export"
    head = json.loads(pq.read_schema(folder / "events.parquet").metadata[HEAD_KEY.encode()])
    assert head == json.loads((folder / "head.json").read_text())
    assert (head["seq"], head["hash"]) == (result["seq"], result["hash"]) == (rows[-1][0], rows[-1][6])
    code, out, err = _verify(capsys, folder, key=home / "keys" / "node.pub.pem")
    assert code == 0, err
    assert f"{len(rows)} events" in out and "OK (parquet)" in out
    # The file alone (its metadata carries the head) verifies too.
    assert verify_export(folder / "events.parquet", _trust(home)).last_seq == head["seq"]


def _trust(home: Path) -> dict[str, Any]:
    from keys.keystore import key_id_of, public_key_from_pem

    public_key = public_key_from_pem((home / "keys" / "node.pub.pem").read_bytes())
    return {key_id_of(public_key): public_key}


def test_duckdb_copy_opens_in_the_duckdb_cli_an_auditor_installs(capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path) -> None:
    if not DUCKDB_CLI.is_file():
        pytest.skip(f"no duckdb binary at {DUCKDB_CLI}: pip install 'duckdb-cli>=1.5,<1.6' (the dev extras)")
    version = subprocess.run([str(DUCKDB_CLI), "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("v1.5."), version
    result = _export(capsys, home, "duckdb", tmp_path / "audit.duckdb")
    copy = Path(result["path"])
    assert copy.is_file() and not copy.with_name(copy.name + ".wal").exists()

    def query(sql: str) -> list[dict[str, Any]]:
        run = subprocess.run([str(DUCKDB_CLI), "-readonly", "-json", str(copy), "-c", sql], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout or "[]")

    assert query("SELECT count(*) AS n, max(seq) AS last FROM events") == [{"n": result["seq"], "last": result["seq"]}]
    # The copy ends with the decision that allowed it.
    decisions = query("SELECT seq, action, subject, allowed FROM decisions ORDER BY seq DESC LIMIT 1")
    assert decisions == [{"seq": result["seq"], "action": "ledger.export", "subject": "duckdb", "allowed": True}]
    assert query("SELECT seq, hash, key_id FROM ledger_head") == [{k: result[k] for k in ("seq", "hash", "key_id")}]
    assert query("SELECT count(*) AS n FROM signed_events WHERE kind = 'note'") == [{"n": 6}]
    code, out, err = _verify(capsys, copy, key=home / "keys" / "node.pub.pem")
    assert code == 0, err
    assert "OK (duckdb)" in out


@pytest.fixture(params=["duckdb", "parquet"])
def fmt(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_an_edited_row_is_named(capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path, fmt: str) -> None:
    path = Path(_export(capsys, home, fmt, tmp_path / "audit")["path"])
    seq = _note_seq(home)  # a note well inside the export
    _tamper(path, "UPDATE events SET body = replace(body, '\"note 3\"', '\"note 9\"') WHERE seq = ?", [seq])
    code, _, err = _verify(capsys, path, key=home / "keys" / "node.pub.pem")
    assert code == 2
    assert f"event seq {seq} does not match its hash" in err and "Traceback" not in err
    assert "hint:" in err


def _note_seq(home: Path) -> int:
    rows = _ledger_rows(home, 10**9)
    return next(int(r[0]) for r in rows if r[2] == "note" and '"note 3"' in r[4])


def test_rows_cut_off_the_end_are_caught_by_the_head_and_by_an_earlier_checkpoint(
    capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path, fmt: str
) -> None:
    node = home / "keys" / "node.pub.pem"
    assert cli(capsys, "--home", str(home), "ledger", "head", "--out", str(tmp_path / "old.json"))[0] == 0
    assert cli(capsys, "--home", str(home), "ledger", "head", "--out", str(tmp_path / "checkpoint.json"))[0] == 0
    old = json.loads((tmp_path / "old.json").read_text())
    checkpoint = tmp_path / "checkpoint.json"
    later = json.loads(checkpoint.read_text())["seq"]
    result = _export(capsys, home, fmt, tmp_path / "audit")
    path = Path(result["path"])
    code, out, err = _verify(capsys, path, "--head", str(checkpoint), key=node)
    assert code == 0, err
    assert f"earlier signed head {checkpoint}" in out

    # A copy of the whole export with its last rows cut: its own head no longer matches.
    cut = tmp_path / ("cut" + ("" if fmt == "parquet" else ".duckdb"))
    (shutil.copytree if path.is_dir() else shutil.copyfile)(path, cut)
    _tamper(cut, "DELETE FROM events WHERE seq > ?", [old["seq"]])
    code, _, err = _verify(capsys, cut, key=node)
    assert code == 2
    assert f"ends at seq {old['seq']} but the signed head says {result['seq']}" in err

    # Cut back to an older head and re-headed with it: consistent on its own, so only the
    # checkpoint kept elsewhere tells that rows are missing.
    _tamper(cut, "SELECT 1", head=old)
    code, _, err = _verify(capsys, cut, key=node)
    assert code == 0, err
    code, _, err = _verify(capsys, cut, "--head", str(checkpoint), key=node)
    assert code == 2
    assert f"earlier signed head (seq {later})" in err and f"ends at seq {old['seq']}" in err and "cut off the end" in err


def test_a_head_that_does_not_sign_the_last_row_is_refused(capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path, fmt: str) -> None:
    node = home / "keys" / "node.pub.pem"
    first = _export(capsys, home, fmt, tmp_path / "first")
    second = _export(capsys, home, fmt, tmp_path / "second")
    longer_head = json.loads((Path(second["path"]) / "head.json").read_text()) if fmt == "parquet" else _duckdb_head(Path(second["path"]))
    older_head = json.loads((Path(first["path"]) / "head.json").read_text()) if fmt == "parquet" else _duckdb_head(Path(first["path"]))
    # The head of a longer ledger on the shorter export: rows it signs are missing.
    _tamper(Path(first["path"]), "SELECT 1", head=longer_head)
    code, _, err = _verify(capsys, Path(first["path"]), key=node)
    assert code == 2 and f"ends at seq {first['seq']} but the signed head says {second['seq']}" in err
    # An older head on the longer export: rows after it are not covered by any head.
    _tamper(Path(second["path"]), "SELECT 1", head=older_head)
    code, _, err = _verify(capsys, Path(second["path"]), key=node)
    assert code == 2 and f"events {first['seq'] + 1}..{second['seq']} after its signed head (seq {first['seq']})" in err


def _duckdb_head(path: Path) -> dict[str, Any]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        row = con.execute("SELECT seq, hash, key_id, ts, signature FROM ledger_head").fetchone()
    finally:
        con.close()
    assert row is not None
    return dict(zip(("seq", "hash", "key_id", "ts", "signature"), row, strict=True))


def test_a_wrong_trusted_key_fails_and_a_key_inside_the_export_is_never_enough(
    capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path, fmt: str
) -> None:
    path = Path(_export(capsys, home, fmt, tmp_path / "audit")["path"])
    stranger = create_key(tmp_path / "stranger.key", b"another passphrase")
    (tmp_path / "stranger.pub.pem").write_bytes(stranger.public_pem())
    code, _, err = _verify(capsys, path, key=tmp_path / "stranger.pub.pem")
    assert code == 2
    assert f"event seq 1 is signed by key {_trust(home).popitem()[0][:16]}…, which is not trusted" in err
    # The ledger records its keys (ledger_keys); an auditor must still bring one: no --trusted-key is a usage error.
    with pytest.raises(SystemExit):
        cli(capsys, "ledger", "verify-export", str(path))
    with pytest.raises(LedgerError, match="no key given"):
        verify_export(path, {})


def test_a_file_with_every_node_key_is_accepted(capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path) -> None:
    # `keys export-public --role node --all` writes one PEM block per node key into one file.
    path = Path(_export(capsys, home, "parquet", tmp_path / "audit")["path"])
    stranger = create_key(tmp_path / "stranger.key", b"another passphrase")
    keys = tmp_path / "nodes.pem"
    keys.write_bytes(stranger.public_pem() + (home / "keys" / "node.pub.pem").read_bytes())
    code, _, err = _verify(capsys, path, key=keys)
    assert code == 0, err


def test_something_that_is_not_an_export_is_refused_with_its_name(capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path) -> None:
    node = home / "keys" / "node.pub.pem"
    junk = tmp_path / "junk.duckdb"
    junk.write_text("not a database\n")
    code, _, err = _verify(capsys, junk, key=node)
    assert code == 2 and f"cannot open ledger export {junk}" in err and "Traceback" not in err
    plain = tmp_path / "plain.duckdb"
    duckdb.connect(str(plain)).close()
    code, _, err = _verify(capsys, plain, key=node)
    assert code == 2 and "not a ledger export" in err
    code, _, err = _verify(capsys, tmp_path / "empty-dir-missing", key=node)
    assert code == 2 and "does not exist" in err
    # Redefining a view of the copy would make the auditor's queries lie: refused.
    copy = Path(_export(capsys, home, "duckdb", tmp_path / "audit.duckdb")["path"])
    _tamper(copy, "CREATE OR REPLACE VIEW decisions AS SELECT * FROM signed_events WHERE false")
    with pytest.raises(LedgerIntegrityError, match="view decisions was redefined"):
        verify_export(copy, _trust(home))


def test_export_refuses_an_existing_target_and_an_unknown_format_after_recording_the_decision(
    capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path
) -> None:
    from appliance.service import Caller, Service
    from appliance.service.api import dispatch
    from pipeline.errors import ConfigError
    from tests.conftest import PASSPHRASE

    (tmp_path / "taken.duckdb").write_text("mine\n")
    code, _, err = cli(capsys, "--home", str(home), "ledger", "export", "--duckdb", str(tmp_path / "taken.duckdb"))
    assert code == 2 and "already exists" in err
    assert (tmp_path / "taken.duckdb").read_text() == "mine\n"
    with Service.open(home, PASSPHRASE.encode()) as svc:
        before = svc.ledger.select("SELECT count(*) FROM decisions")[0][0]
        with pytest.raises(ConfigError, match="not one of duckdb, parquet"):
            dispatch(svc, Caller.current(), "ledger.export", {"format": "zip"})
        rows = svc.ledger.select("SELECT action, subject, allowed FROM decisions ORDER BY seq")
    assert len(rows) == before + 1 and rows[-1] == ("ledger.export", "zip", True)
    # Nothing was left behind in the home's work folder, whichever way exports ended.
    assert not list((home / "work").glob("ledger-export-*"))


def test_export_over_the_socket_is_received_with_the_callers_rights(capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path) -> None:
    from tests.test_server import start_serve

    served_home = tmp_path / "served"
    shutil.copytree(home, served_home)
    sock_dir = Path(tempfile.mkdtemp(prefix="aplx", dir="/tmp"))  # a socket path must fit in 108 bytes
    try:
        served = start_serve(served_home, sock_dir / "run" / "appliance.sock")
        try:
            for fmt, target in (("duckdb", tmp_path / "audit.duckdb"), ("parquet", tmp_path / "audit")):
                code, out, err = cli(capsys, "--socket", str(served.socket), "ledger", "export", f"--{fmt}", str(target), "--json")
                assert code == 0, err + served.stderr()
                # Written by this process; private, as a ledger copy should be until its holder shares it.
                received = target if fmt == "duckdb" else target / "events.parquet"
                assert received.stat().st_uid == os.getuid() and received.stat().st_mode & 0o777 == 0o600
                code, _, err = _verify(capsys, target, key=served_home / "keys" / "node.pub.pem")
                assert code == 0, err
        finally:
            served.stop()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_the_service_sends_nothing_when_its_own_copy_does_not_verify(capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(home, broken)
    seq = _note_seq(broken)
    _tamper(broken / "ledger.duckdb", "UPDATE events SET body = replace(body, '\"note 3\"', '\"note 4\"') WHERE seq = ?", [seq])
    code, _, err = cli(capsys, "--home", str(broken), "ledger", "export", "--duckdb", str(tmp_path / "audit.duckdb"))
    assert code == 2
    assert "does not verify, so nothing was sent" in err and f"event seq {seq} does not match its hash" in err
    assert "appliance ledger verify" in err
    assert not (tmp_path / "audit.duckdb").exists() and not list(tmp_path.glob(".audit.duckdb.*"))
    assert not list((broken / "work").glob("ledger-export-*"))
