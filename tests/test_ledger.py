"""The ledger: hash chain, signatures, signed head, atomic batches, audit views and macros."""

from __future__ import annotations

import json

import duckdb
import pytest

from keys.keystore import create_key, key_id_of
from registry.errors import LedgerError, LedgerIntegrityError
from registry.ledger import GENESIS_HASH, Ledger, chain_hash

PASS = b"ledger test passphrase"


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return create_key(tmp_path_factory.mktemp("k") / "node.key", PASS)


@pytest.fixture(scope="module")
def other_key(tmp_path_factory):
    return create_key(tmp_path_factory.mktemp("k2") / "other.key", PASS)


@pytest.fixture
def trusted(key):
    return {key.key_id: key.public_key}


def _fill(path, key, n=5):
    with Ledger.open(path, key) as ledger:
        for i in range(n):
            ledger.append("note", "alice", {"i": i})


def _raw(path, sql, params=()):
    """Tamper with the file the way an attacker with shell access would."""
    con = duckdb.connect(str(path))
    try:
        con.execute(sql, list(params))
    finally:
        con.close()


def test_chain_links_and_verifies(tmp_path, key, trusted):
    path = tmp_path / "ledger.duckdb"
    with Ledger.open(path, key) as ledger:
        first = ledger.append("note", "alice", {"text": "hello"})
        second = ledger.append("note", "bob", {"n": 2, "nested": {"z": 1, "a": [1, 2]}})
        assert first.seq == 1 and first.prev_hash == GENESIS_HASH
        assert second.prev_hash == first.hash
        assert second.hash == chain_hash(first.hash, second.body)
        stored = ledger.events()
        assert [e.seq for e in stored] == [1, 2]
        assert stored[1].data == {"n": 2, "nested": {"z": 1, "a": [1, 2]}}
        assert [e.kind for e in ledger.events("note")] == ["note", "note"]
        report = ledger.verify(trusted)
        assert (report.events, report.last_seq, report.last_hash) == (2, 2, second.hash)
        assert report.head_checked is False
        head = json.loads((tmp_path / "ledger.head.json").read_text())
        assert head["seq"] == 2 and head["hash"] == second.hash
        assert ledger.verify(trusted, tmp_path / "ledger.head.json").head_checked is True
    with Ledger.open(path, None, read_only=True) as ro:
        assert ro.verify(trusted, head).last_seq == 2
        with pytest.raises(LedgerError, match="read-only"):
            ro.append("note", "x", {})


def test_append_many_is_all_or_nothing(tmp_path, key, trusted):
    path = tmp_path / "ledger.duckdb"
    with Ledger.open(path, key) as ledger:
        ledger.append("note", "alice", {"i": 0})
        head_before = (tmp_path / "ledger.head.json").read_text()
        with pytest.raises(LedgerError, match="cannot be recorded"):
            # The first item is inserted before the second fails to encode.
            ledger.append_many([("note", "alice", {"i": 1}), ("note", "alice", {"x": float("nan")})])
        assert [e.seq for e in ledger.events()] == [1]
        assert (tmp_path / "ledger.head.json").read_text() == head_before
        batch = ledger.append_many([("note", "a", {"i": 1}), ("note", "a", {"i": 2})])
        assert [e.seq for e in batch] == [2, 3]
        assert ledger.verify(trusted).last_seq == 3


def test_writes_need_a_signer(tmp_path, key):
    path = tmp_path / "ledger.duckdb"
    _fill(path, key, 1)
    with Ledger.open(path, None) as ledger:
        with pytest.raises(LedgerError, match="without the node key"):
            ledger.append("note", "x", {})


def test_known_kinds_are_checked(tmp_path, key):
    with Ledger.open(tmp_path / "l.duckdb", key) as ledger:
        with pytest.raises(LedgerError, match="missing field"):
            ledger.append("run.started", "alice", {"run_id": "r1"})
        with pytest.raises(LedgerError, match="allowed"):
            ledger.append("authz.decision", "alice", {"identity": "a", "action": "x", "subject": "s", "allowed": "yes", "reason": ""})
        assert ledger.events() == []


def test_edited_body_is_named(tmp_path, key, trusted):
    path = tmp_path / "ledger.duckdb"
    _fill(path, key)
    _raw(path, "UPDATE events SET body = replace(body, '\"i\":2', '\"i\":7') WHERE seq = 3")
    with Ledger.open(path, None, read_only=True) as ledger:
        with pytest.raises(LedgerIntegrityError) as err:
            ledger.verify(trusted)
    assert err.value.seq == 3
    assert "event seq 3" in err.value.message and "body was changed" in err.value.message


def test_edited_column_is_named(tmp_path, key, trusted):
    path = tmp_path / "ledger.duckdb"
    _fill(path, key)
    _raw(path, "UPDATE events SET actor = 'mallory' WHERE seq = 4")
    with Ledger.open(path, None, read_only=True) as ledger:
        with pytest.raises(LedgerIntegrityError, match="actor") as err:
            ledger.verify(trusted)
    assert err.value.seq == 4


def test_deleted_middle_row_is_named(tmp_path, key, trusted):
    path = tmp_path / "ledger.duckdb"
    _fill(path, key)
    _raw(path, "DELETE FROM events WHERE seq = 2")
    with Ledger.open(path, None, read_only=True) as ledger:
        with pytest.raises(LedgerIntegrityError, match="event seq 2 is missing") as err:
            ledger.verify(trusted)
    assert err.value.seq == 2


def test_rows_cut_off_the_end_are_caught_by_the_head(tmp_path, key, trusted):
    path = tmp_path / "ledger.duckdb"
    _fill(path, key, 9)
    exported = tmp_path / "elsewhere.head.json"
    with Ledger.open(path, key) as ledger:
        ledger.export_head(exported)
    _raw(path, "DELETE FROM events WHERE seq > 7")
    with Ledger.open(path, None, read_only=True) as ledger:
        assert ledger.verify(trusted).last_seq == 7  # the chain alone cannot tell
        with pytest.raises(LedgerIntegrityError) as err:
            ledger.verify(trusted, exported)
    assert "ends at seq 7 but the signed head says 9" in err.value.message
    assert err.value.seq == 8
    # Nor can the service reopen it and launder the cut by writing a fresh head.
    with pytest.raises(LedgerIntegrityError, match="ends at seq 7"):
        Ledger.open(path, key)
    assert json.loads((tmp_path / "ledger.head.json").read_text())["seq"] == 9


def test_rewritten_tail_is_caught_by_the_head(tmp_path, key, other_key, trusted):
    path = tmp_path / "ledger.duckdb"
    _fill(path, key, 3)
    head = json.loads((tmp_path / "ledger.head.json").read_text())
    # Cut the last event and append a different one, signed with the real key.
    _raw(path, "DELETE FROM events WHERE seq = 3")
    with Ledger.open(path, key, head_path=None) as ledger:
        ledger.append("note", "mallory", {"i": 99})
        with pytest.raises(LedgerIntegrityError, match="rewritten") as err:
            ledger.verify(trusted, head)
    assert err.value.seq == 3


def test_forged_head_is_refused(tmp_path, key, other_key, trusted):
    path = tmp_path / "ledger.duckdb"
    _fill(path, key, 3)
    head = json.loads((tmp_path / "ledger.head.json").read_text())
    with Ledger.open(path, None, read_only=True) as ledger:
        with pytest.raises(LedgerIntegrityError, match="does not verify"):
            ledger.verify(trusted, dict(head, seq=2))
        with pytest.raises(LedgerIntegrityError, match="not trusted"):
            ledger.verify(trusted, dict(head, key_id=other_key.key_id))


def test_missing_head_file_refused_on_reopen(tmp_path, key):
    path = tmp_path / "ledger.duckdb"
    _fill(path, key, 2)
    (tmp_path / "ledger.head.json").unlink()
    with pytest.raises(LedgerIntegrityError, match="head file .* is missing"):
        Ledger.open(path, key)
    with Ledger.open(path, key, adopt_head=True) as ledger:
        assert ledger.head()["seq"] == 2
    assert (tmp_path / "ledger.head.json").exists()


def test_deleted_ledger_with_head_left_is_refused(tmp_path, key):
    path = tmp_path / "ledger.duckdb"
    _fill(path, key, 2)
    path.unlink()
    with pytest.raises(LedgerIntegrityError, match="cut off"):
        Ledger.open(path, key)


def test_wrong_key(tmp_path, key, other_key):
    path = tmp_path / "ledger.duckdb"
    _fill(path, key, 2)
    with Ledger.open(path, None, read_only=True) as ledger:
        with pytest.raises(LedgerIntegrityError, match="not trusted") as err:
            ledger.verify({other_key.key_id: other_key.public_key})
        assert err.value.seq == 1
        with pytest.raises(LedgerError, match="really"):
            ledger.verify({other_key.key_id: key.public_key})


def test_resigned_with_attacker_key_is_untrusted(tmp_path, key, other_key, trusted):
    path = tmp_path / "ledger.duckdb"
    with Ledger.open(path, other_key) as ledger:
        ledger.append("note", "mallory", {"i": 0})
    with Ledger.open(path, None, read_only=True) as ledger:
        with pytest.raises(LedgerIntegrityError, match="not trusted"):
            ledger.verify(trusted)


def test_bad_signature_is_named(tmp_path, key, trusted):
    path = tmp_path / "ledger.duckdb"
    _fill(path, key, 3)
    with Ledger.open(path, None, read_only=True) as ledger:
        sig1 = ledger.events()[0].signature
    _raw(path, "UPDATE events SET signature = ? WHERE seq = 2", [sig1])
    with Ledger.open(path, None, read_only=True) as ledger:
        with pytest.raises(LedgerIntegrityError, match="signature") as err:
            ledger.verify(trusted)
    assert err.value.seq == 2


def test_redefined_view_is_caught_and_repaired(tmp_path, key, trusted):
    path = tmp_path / "ledger.duckdb"
    _fill(path, key, 1)
    _raw(path, "CREATE OR REPLACE VIEW artifacts AS SELECT 'x' AS digest")
    with Ledger.open(path, None, read_only=True) as ledger:
        with pytest.raises(LedgerIntegrityError, match="view artifacts was redefined"):
            ledger.verify(trusted)
    with Ledger.open(path, key) as ledger:  # the service rewrites derived views on open
        assert ledger.verify(trusted).last_seq == 1


def _artifact(digest, kind, parents, run_id="r1", stage="s"):
    return (
        "artifact.recorded",
        "svc",
        {
            "digest": digest,
            "kind": kind,
            "name": f"{kind}-{digest}",
            "size_bytes": 10,
            "files": 1,
            "store_path": None,
            "run_id": run_id,
            "stage": stage,
            "parents": parents,
            "meta": {},
        },
    )


def test_views_and_lineage_macros(tmp_path, key, trusted):
    path = tmp_path / "ledger.duckdb"
    # raw a -> dataset b -> tokenizer c; (b, c) -> shards d -> model e
    with Ledger.open(path, key) as ledger:
        ledger.append_many(
            [
                ("key.registered", "root", {"key_id": key.key_id, "public_key_pem": key.public_pem().decode(), "role": "node"}),
                ("authz.decision", "alice", {"identity": "alice", "action": "run.start", "subject": "r1", "allowed": True, "reason": "role"}),
                ("authz.decision", "eve", {"identity": "eve", "action": "purge", "subject": "a", "allowed": False, "reason": "no role"}),
                ("run.started", "alice", {"run_id": "r1", "recipe_name": "tiny", "recipe_digest": "f" * 64, "recipe": {"x": 1}, "environment": {}}),
                ("run.started", "alice", {"run_id": "r2", "recipe_name": "tiny", "recipe_digest": "f" * 64, "recipe": {}, "environment": {}}),
                _artifact("a", "source", []),
                _artifact("b", "dataset", ["a"]),
                _artifact("c", "tokenizer", ["b"]),
                _artifact("d", "shards", ["b", "c"]),
                _artifact("e", "model", ["d"]),
                _artifact("e", "model", ["d"], run_id="r2"),  # recorded again by another run
                ("stage.finished", "svc", {"run_id": "r1", "stage": "train", "stats": {}}),
                ("stage.failed", "svc", {"run_id": "r2", "stage": "train", "error": "oom"}),
                (
                    "metrics.recorded",
                    "svc",
                    {"run_id": "r1", "stage": "train", "points": [{"step": 1, "name": "loss", "value": 3.5}, {"step": 2, "name": "loss", "value": 3}]},
                ),
                ("run.finished", "svc", {"run_id": "r1", "status": "succeeded", "error": None, "summary": {}}),
                ("model.signed", "svc", {"digest": "e", "key_id": key.key_id, "signature_file": "model.sig"}),
            ]
        )
        q = ledger.query
        assert q("SELECT * FROM ancestors('e')")[1] == [
            ("d", 1, "shards", "shards-d"),
            ("b", 2, "dataset", "dataset-b"),
            ("c", 2, "tokenizer", "tokenizer-c"),
            ("a", 3, "source", "source-a"),
        ]
        cols, rows = q("SELECT * FROM descendants('a')")
        assert cols == ["digest", "depth", "kind", "name"]
        assert [(r[0], r[1]) for r in rows] == [("b", 1), ("c", 2), ("d", 2), ("e", 3)]
        assert q("SELECT digest, run_id FROM artifacts WHERE digest = 'e'")[1] == [("e", "r1")]
        assert q("SELECT count(*) FROM lineage WHERE child = 'e'")[1] == [(2,)]
        assert q("SELECT child, parent FROM lineage WHERE child = 'd' ORDER BY parent")[1] == [("d", "b"), ("d", "c")]
        assert q("SELECT run_id, recipe_name, actor, status, error FROM runs ORDER BY run_id")[1] == [
            ("r1", "tiny", "alice", "succeeded", None),
            ("r2", "tiny", "alice", "running", None),
        ]
        assert q("SELECT run_id, stage, status FROM stages ORDER BY run_id")[1] == [("r1", "train", "finished"), ("r2", "train", "failed")]
        assert q("SELECT step, name, value FROM metrics ORDER BY step")[1] == [(1, "loss", 3.5), (2, "loss", 3.0)]
        assert q("SELECT identity, allowed FROM decisions ORDER BY seq")[1] == [("alice", True), ("eve", False)]
        assert q("SELECT key_id, role FROM ledger_keys")[1] == [(key.key_id, "node")]
        assert ledger.verify(trusted).events == 16
    # The macros are stored in the file: they work for a read-only reader too.
    with Ledger.open(path, None, read_only=True) as ro:
        assert [r[0] for r in ro.query("SELECT * FROM ancestors('c')")[1]] == ["b", "a"]


def test_read_only_open_of_missing_file(tmp_path):
    with pytest.raises(LedgerError, match="does not exist"):
        Ledger.open(tmp_path / "none.duckdb", None, read_only=True)


def test_key_id_helper(key):
    assert key_id_of(key.public_key) == key.key_id
