"""`appliance audit`: the canned questions, against a real finished run's ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from registry import audit_queries as q
from tests.conftest import cli, single_operator


def rows(capsys: pytest.CaptureFixture[str], home: Path, *argv: str) -> list[dict[str, Any]]:
    code, out, err = cli(capsys, "--home", str(home), "audit", *argv, "--json")
    assert code == 0, err
    return list(json.loads(out))


def test_lineage_derived_key_denied_and_exports(home_copy: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, s = home_copy
    lineage = rows(capsys, home, "lineage", s.model_digest[:12])
    assert lineage[0]["depth"] == 0 and lineage[0]["digest"] == s.model_digest
    kinds = {r["kind"] for r in lineage}
    assert {"checkpoint", "tokenizer", "dataset", "token-shards", "source", "recipe"} <= kinds
    source = next(r for r in lineage if r["kind"] == "source")
    # The erasure question, by file name and by digest: the model is reached both ways.
    for key in (source["name"].rsplit("/", 1)[-1], source["digest"][:16]):
        found = rows(capsys, home, "derived", key)
        assert [r["digest"] for r in found] == [s.model_digest], key
    assert rows(capsys, home, "derived", "no-such-file.txt") == []
    # A refused export (two-person rule), then one by a single operator.
    code, _, err = cli(capsys, "--home", str(home), "model", "export", s.model_digest[:16], "--out", str(tmp_path / "x"))
    assert code != 0 and "second person" in err
    denied = rows(capsys, home, "denied")
    assert [(r["action"], r["subject"]) for r in denied] == [("model.export", s.model_digest[:16])]
    single_operator(home)
    code, _, err = cli(capsys, "--home", str(home), "model", "export", s.model_digest[:16], "--out", str(tmp_path / "y"))
    assert code == 0, err
    exported = rows(capsys, home, "exports")
    assert [(r["kind"], r["digest"]) for r in exported] == [("model.exported", s.model_digest)]
    node = (home / "keys" / "node.pub.pem").read_bytes()
    from keys.keystore import key_id_of, public_key_from_pem

    used = rows(capsys, home, "key", key_id_of(public_key_from_pem(node))[:16])
    signed = {r["kind"]: r["events"] for r in used if r["how"] == "signed"}
    assert signed["artifact.recorded"] > 10 and signed["model.exported"] == 1
    who = rows(capsys, home, "who", "--since", "2000-01-01")
    assert any(r["action"] == "model.export" and r["allowed"] for r in who)


def test_values_are_checked_and_quoted_never_pasted(home_copy: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = home_copy
    # A quote in a user name stays inside its literal: no rows, not every row.
    assert rows(capsys, home, "who", "--user", "x' OR TRUE OR '") == []
    assert q.literal("o'brien") == "'o''brien'"
    code, _, err = cli(capsys, "--home", str(home), "audit", "lineage", "zz")
    assert code == 2 and "not a digest or digest prefix" in err
    code, _, err = cli(capsys, "--home", str(home), "audit", "who", "--since", "yesterday")
    assert code == 2 and "--since 'yesterday' is not a date" in err
    code, out, _ = cli(capsys, "--home", str(home), "audit", "exports", "--sql")
    assert code == 0 and out.startswith("SELECT")
