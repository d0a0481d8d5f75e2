"""The auditor's SQL sandbox: one SELECT, read-only, no file access — by path and in-process."""

from __future__ import annotations

import pytest

from keys.keystore import create_key
from registry.errors import LedgerError
from registry.ledger import Ledger
from registry.query import query

REFUSED = [
    pytest.param("COPY events TO '{out}/x.csv'", id="copy"),
    pytest.param("SELECT * FROM read_csv('/etc/passwd')", id="read_csv"),
    pytest.param("SELECT * FROM read_text('/etc/hostname')", id="read_text"),
    pytest.param("SELECT * FROM glob('/etc/*')", id="glob"),
    pytest.param("INSTALL httpfs", id="install"),
    pytest.param("LOAD json", id="load"),
    pytest.param("ATTACH '{out}/other.duckdb' AS other", id="attach"),
    pytest.param("SET enable_external_access = true", id="set"),
    pytest.param("SELECT 1; SELECT 2", id="two-statements"),
    pytest.param("SELECT 1; DELETE FROM events", id="select-then-delete"),
    pytest.param("DELETE FROM events", id="delete"),
    pytest.param("UPDATE events SET actor = 'x'", id="update"),
    pytest.param("DROP VIEW artifacts", id="drop"),
    pytest.param("CREATE TABLE t AS SELECT 1", id="create"),
    pytest.param("PRAGMA version", id="pragma"),
    pytest.param("CALL checkpoint()", id="call"),
    pytest.param("EXPLAIN SELECT 1", id="explain"),
    pytest.param("SELECT * FROM query('DELETE FROM events')", id="query-function"),
    pytest.param("SELECT * FROM query('SELECT 1')", id="query-function-select"),
    pytest.param("WITH d AS (DELETE FROM events RETURNING *) SELECT * FROM d", id="delete-cte"),
    pytest.param("WITH d AS (UPDATE events SET actor = 'x' RETURNING *) SELECT count(*) FROM d", id="update-cte"),
    pytest.param("WITH a AS (SELECT 1), d AS (INSERT INTO events SELECT * FROM events RETURNING seq) SELECT * FROM d", id="insert-cte"),
    pytest.param("SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))", id="execute-serialized"),
    pytest.param("SELECT * FROM checkpoint()", id="checkpoint-function"),
    pytest.param("SELECT * FROM duckdb_settings()", id="settings-function"),
    pytest.param("SELECT * FROM read_blob('/etc/hostname')", id="read_blob"),
    pytest.param("SELECT * FROM '/etc/passwd'", id="replacement-scan"),
    pytest.param("SELECT * FROM 'ledger.duckdb'", id="replacement-scan-relative"),
    pytest.param('SELECT * FROM events e JOIN "~/.ssh/id_rsa" k ON true', id="replacement-scan-quoted"),
    pytest.param("SELECT * FROM (PIVOT events ON kind USING count(*))", id="pivot"),
    pytest.param("", id="empty"),
    pytest.param("SELEC 1", id="parse-error"),
]


@pytest.fixture(scope="module")
def ledger_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sandbox")
    key = create_key(tmp / "node.key", b"sandbox passphrase")
    path = tmp / "ledger.duckdb"
    with Ledger.open(path, key) as ledger:
        ledger.append_many(
            [
                (
                    "artifact.recorded",
                    "svc",
                    {
                        "digest": d,
                        "kind": k,
                        "name": k,
                        "size_bytes": 1,
                        "files": 1,
                        "store_path": None,
                        "run_id": "r1",
                        "stage": "s",
                        "parents": p,
                        "meta": {},
                    },
                )
                for d, k, p in [("a" * 64, "source", []), ("b" * 64, "dataset", ["a" * 64]), ("c" * 64, "model", ["b" * 64])]
            ]
        )
    return path, key


def test_select_and_macros_work_by_path(ledger_file):
    path, _ = ledger_file
    cols, rows = query(path, f"SELECT * FROM ancestors('{'c' * 64}')")
    assert cols == ["digest", "depth", "kind", "name"]
    assert [(r[0][0], r[1]) for r in rows] == [("b", 1), ("a", 2)]
    assert query(path, "WITH x AS (SELECT count(*) AS n FROM events) SELECT n FROM x")[1] == [(3,)]
    assert query(path, "FROM artifacts SELECT kind ORDER BY seq")[1] == [("source",), ("dataset",), ("model",)]


@pytest.mark.parametrize("sql", REFUSED)
def test_refused_by_path(ledger_file, tmp_path, sql):
    path, _ = ledger_file
    with pytest.raises(LedgerError):
        query(path, sql.format(out=tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert query(path, "SELECT count(*) FROM events")[1] == [(3,)]


def test_refusal_explains(ledger_file):
    path, _ = ledger_file
    with pytest.raises(LedgerError) as err:
        query(path, "DELETE FROM events")
    assert "only SELECT" in err.value.message
    assert "exactly one SELECT" in err.value.hint
    with pytest.raises(LedgerError, match="read_csv.. is not allowed") as err:
        query(path, "SELECT * FROM read_csv('/etc/passwd')")
    assert "allowed table functions: ancestors" in err.value.hint
    with pytest.raises(LedgerError, match="data-changing part .DELETE") as err:
        query(path, "WITH d AS (DELETE FROM events RETURNING *) SELECT * FROM d")
    assert "exactly one SELECT" in err.value.hint


@pytest.mark.parametrize("sql", REFUSED)
def test_refused_on_open_writer(ledger_file, tmp_path, sql):
    path, key = ledger_file
    with Ledger.open(path, key) as ledger:
        with pytest.raises(LedgerError):
            query(ledger, sql.format(out=tmp_path))
        assert ledger.query("SELECT count(*) FROM events")[1] == [(3,)]
        assert ledger.verify({key.key_id: key.public_key}).last_seq == 3
    assert list(tmp_path.iterdir()) == []


def test_writer_answers_queries_in_process(ledger_file):
    path, key = ledger_file
    with Ledger.open(path, key) as ledger:
        rows = query(ledger, f"SELECT digest FROM descendants('{'a' * 64}')")[1]
        assert rows == [("b" * 64,), ("c" * 64,)]
        # While this process holds the file read-write, opening it by path cannot work.
        with pytest.raises(LedgerError) as err:
            query(path, "SELECT 1")
        assert "pass the open Ledger" in err.value.hint


def test_row_and_time_limits(ledger_file):
    path, _ = ledger_file
    with pytest.raises(LedgerError, match="more than 5 rows"):
        query(path, "SELECT * FROM range(10)", max_rows=5)
    assert len(query(path, "SELECT * FROM range(5)", max_rows=5)[1]) == 5
    with pytest.raises(LedgerError, match="longer than"):
        query(path, "SELECT count(*) FROM range(100000000000)", timeout_s=0.2)
