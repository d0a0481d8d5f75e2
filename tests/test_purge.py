"""Encryption at rest and purge by cryptographic erase, end to end on real runs.

One source file carries a marker; two runs ingest it (different tokenizers, so their shards
differ). The tests check the marker is nowhere in the home in the clear after the runs, the
lineage impact of the source, the two-person rule with real signed decisions, the certificate
and what a read of a purged artifact says, and a kill -9 at the worst moment of a purge.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.service import Caller, Service
from appliance.service.api import dispatch
from keys import sealed
from keys.errors import ApplianceError
from keys.keystore import load_public_key
from registry.purge_cert import verify_certificate
from tests.conftest import ASSETS, PASSPHRASE, cli, new_home, run_to_end, single_operator, summary_of
from tests.test_approvals import PEOPLE, decide, who

PASS = PASSPHRASE.encode()
MARKER = b"ZQXJ-PURGE-MARKER-7731"


def _scan(root: Path, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink():
                continue
            if needle in p.read_bytes():
                hits.append(str(p.relative_to(root)))
    return hits


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, stdlib_corpus: Path) -> tuple[Path, dict[str, Any]]:
    """A home where two runs ingested the same marked source file; (home, facts)."""
    base = tmp_path_factory.mktemp("purge")
    shutil.copytree(stdlib_corpus, base / "corpus")
    # The marker inside ordinary prose, so the filters keep the document.
    donor = sorted((base / "corpus").rglob("*.txt"))[0]
    text = donor.read_text(encoding="utf-8")
    cut = len(text) // 2
    secret = base / "corpus" / "zz-secret.txt"
    secret.write_text(text[:cut] + f" The customer reference is {MARKER.decode()} for this account. " + text[cut:], encoding="utf-8")
    recipe = (ASSETS / "tiny.toml").read_text()
    (base / "a.toml").write_text(recipe)
    (base / "b.toml").write_text(recipe.replace("vocab_size = 400", "vocab_size = 420").replace('name = "tiny-test"', 'name = "tiny-b"'))
    with new_home(base / "home") as svc:
        a = summary_of(run_to_end(svc, base / "a.toml"))
        b = summary_of(run_to_end(svc, base / "b.toml"))
    return base / "home", {"a": a, "b": b, "secret": str(secret), "base": base}


@pytest.fixture
def home(tmp_path: Path, two_runs: tuple[Path, dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    src, facts = two_runs
    shutil.copytree(src, tmp_path / "home", symlinks=True)
    return tmp_path / "home", facts


def _source_digest(svc: Service, path: str) -> str:
    rows = svc.ledger.select("SELECT DISTINCT digest FROM artifacts WHERE name = ? AND store_path IS NULL", [path])
    assert len(rows) == 1, rows
    return rows[0][0]


def test_the_marker_is_only_ever_stored_sealed(home: tuple[Path, dict[str, Any]]) -> None:
    root, facts = home
    assert _scan(root, MARKER) == []
    with Service.open(root, PASS) as svc:
        rows = svc.ledger.select("SELECT kind, data_key_id FROM artifacts WHERE kind IN ('raw-documents', 'dataset', 'dropped-samples', 'token-shards')")
        assert {k for k, _ in rows} >= {"raw-documents", "dataset", "token-shards"}
        assert all(key for _, key in rows), rows
        # Each sealed artifact its own key, in the table, and the data opens through the service.
        assert len({key for _, key in rows}) == len(rows)
        for _, key in rows:
            assert (root / "keys" / "data" / f"{key}.json").is_file()
        raw = svc.ledger.select("SELECT store_path FROM artifacts WHERE kind = 'raw-documents' LIMIT 1")[0][0]
        path = root / "store" / raw
        assert sealed.is_sealed(path)
        assert MARKER in _plain_text(path)


def _plain_text(path: Path) -> bytes:
    import pyarrow.parquet as pq

    with sealed.open_read(path) as f:
        return "\n".join(pq.ParquetFile(f).read(columns=["text"]).column("text").to_pylist()).encode()


def test_impact_of_a_source_used_by_two_runs(home: tuple[Path, dict[str, Any]]) -> None:
    root, facts = home
    with Service.open(root, PASS) as svc:
        owner = Caller.current()
        r = dispatch(svc, owner, "purge.impact", {"target": f"source:{facts['secret']}"})
        purged = {(a["kind"], a["run_id"]) for a in r["purge"]}
        kept = {(a["kind"], a["run_id"]) for a in r["keep"]}
        runs = {facts["a"].run_id, facts["b"].run_id}
        assert set(r["runs"]) == runs
        # Raw documents and dataset are the same bytes in both runs (one stored object each);
        # the shards differ (two tokenizers): both are erased, both models kept and marked.
        assert {k for k, _ in purged} == {"raw-documents", "dataset", "dropped-samples", "token-shards"} or {k for k, _ in purged} >= {
            "raw-documents",
            "dataset",
            "token-shards",
        }
        assert {run for k, run in purged if k == "token-shards"} == runs
        assert {run for k, run in kept if k == "model"} == runs
        assert any(k == "tokenizer" for k, _ in kept)
        assert all(a["sealed"] for a in r["purge"])
        assert any("cannot be un-trained" in w for w in r["warnings"])
        assert r["two_person"] is True
        # Nothing changed.
        assert svc.ledger.select("SELECT count(*) FROM events WHERE kind LIKE 'purge.%'")[0][0] == 0


def _people(root: Path, keys_dir: Path) -> dict[str, Any]:
    from tests.test_approvals import _install

    PEOPLE.setdefault("erin", ["data-steward"])
    PEOPLE.setdefault("frank", ["data-steward"])
    return _install(root, keys_dir)


def test_purge_needs_a_second_person_then_erases_verifies_and_certifies(home: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, facts = home
    keys = _people(root, tmp_path / "userkeys")
    erin, frank = who("erin"), who("frank")
    target = f"source:{facts['secret']}"
    with Service.open(root, PASS) as svc:
        with pytest.raises(ApplianceError, match="second person|approval"):
            dispatch(svc, erin, "purge.run", {"target": target})
        assert svc.ledger.select("SELECT count(*) FROM events WHERE kind LIKE 'purge.%'")[0][0] == 0
        plan = dispatch(svc, erin, "purge.impact", {"target": target})
        keys_before = {a["key_id"] for a in plan["purge"]}
        rid = dispatch(svc, erin, "approvals.request", {"action": "data.purge", "subject": target, "reason": "erasure request #12"})["id"]
        decide(svc, frank, rid, keys["frank"])
        r = dispatch(svc, erin, "purge.run", {"target": target, "approval": rid, "markers": [MARKER.decode()]})
        cert = r["certificate"]
        assert cert["verification"]["result"] == "passed", json.dumps(cert["verification"], indent=1)
        assert cert["verification"]["marker_scan"]["files_with_markers"] == {}
        assert cert["verification"]["markers"] > 10
        assert cert["person_performing"]["requested_by"]["user"] == "erin"
        assert cert["person_performing"]["approved_by"]["user"] == "frank"
        assert cert["sanitization"]["method_type"] == "purge"
        assert "cryptographic erase" in cert["sanitization"]["technique"]
        # The certificate file verifies with the node's public key, offline.
        doc = json.loads(Path(r["file"]).read_text())
        assert verify_certificate(doc, load_public_key(root / "keys" / "node.pub.pem"))["purge_id"] == r["purge_id"]
        doc["certificate"]["person_performing"]["approved_by"]["user"] = "mallory"
        with pytest.raises(ApplianceError, match="changed"):
            verify_certificate(doc, load_public_key(root / "keys" / "node.pub.pem"))
        # Keys gone from the table and from memory; a read says purged, not missing.
        for key in keys_before:
            assert not (root / "keys" / "data" / f"{key}.json").exists()
            assert not sealed.has_key(key)
        dataset = next(a["digest"] for a in plan["purge"] if a["kind"] == "dataset")
        v = dispatch(svc, erin, "artifact.verify", {"digest": dataset})
        assert v["purged"] and "purged on" in v["message"] and r["purge_id"] in v["message"]
        with pytest.raises(ApplianceError, match="purged on .* by certificate"):
            dispatch(svc, erin, "data.dropped", {"run": facts["a"].run_id})
        card = dispatch(svc, erin, "data.card", {"run": facts["b"].run_id}) if _card_kept(svc, facts["b"].run_id) else None
        if card is not None:
            assert "Derived from purged data" in card["markdown"]
        show = dispatch(svc, erin, "registry.show", {"ref": facts["a"].model_digest[:16]})
        assert "Derived from purged data" in (show["purge_notice"] or "")
        statuses = dict(svc.ledger.select("SELECT digest, status FROM artifacts"))
        assert statuses[dataset] == "purged"
        assert statuses[facts["a"].model_digest] == "derived-from-purged"
        # The ledger's rows stay, and the chain still verifies.
        dispatch(svc, who(svc.owner), "ledger.verify", {})
    assert _scan(root, MARKER) == []


def _card_kept(svc: Service, run_id: str) -> bool:
    rows = svc.ledger.select("SELECT status FROM artifacts WHERE run_id = ? AND kind = 'dataset-card'", [run_id])
    return bool(rows) and rows[0][0] != "purged"


def test_run_intermediates_single_operator_and_resume_after_kill_9(home: tuple[Path, dict[str, Any]]) -> None:
    root, facts = home
    single_operator(root)
    run_id = facts["b"].run_id
    # A purge killed (SIGKILL) right after its first data key is destroyed, before any file is touched.
    script = (
        "import os, signal, sys\n"
        "from appliance.service import Caller, Service\n"
        "from appliance.service.api import dispatch\n"
        "from appliance.service import datakeys\n"
        "real = datakeys.DataKeys.destroy\n"
        "def destroy(self, key_id):\n"
        "    real(self, key_id)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "datakeys.DataKeys.destroy = destroy\n"
        f"svc = Service.open({str(root)!r}, {PASSPHRASE!r}.encode())\n"
        f"dispatch(svc, Caller.current(), 'purge.run', {{'target': 'run:{run_id}'}})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    with Service.open(root, PASS) as svc:
        assert len(svc.purges_recovered) == 1
        (row,) = svc.ledger.select("SELECT purge_id, status, verification FROM purges")
        assert row[1] == "completed" and row[2] == "passed"
        data = json.loads(svc.ledger.select("SELECT data FROM signed_events WHERE kind = 'purge.completed'")[0][0])
        assert data["resumed"] is True
        assert "not repeated" in data["certificate"]["verification"]["marker_scan"]
        for key in data["keys_destroyed"]:
            assert not (root / "keys" / "data" / f"{key}.json").exists()
        for digest in data["purged"]:
            assert not svc.store.path_of(digest).exists()
        # Run b shares its raw documents and dataset with run a (the same bytes, stored once), so
        # run a's shards went too; the models stay, marked, and still verify.
        for model in (facts["a"].model_digest, facts["b"].model_digest):
            v = dispatch(svc, Caller.current(), "artifact.verify", {"digest": model})
            assert v["ok"] and not v.get("purged")
    assert _scan(root, MARKER) == []


def test_an_export_after_a_purge_carries_the_notice(home: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, facts = home
    single_operator(root)
    with Service.open(root, PASS) as svc:
        dispatch(svc, Caller.current(), "purge.run", {"target": f"run:{facts['a'].run_id}"})
    for args in (
        ("keys", "release-init", "--root-key", str(root / "keys" / "root.key")),
        ("export", facts["b"].model_digest[:16], "--to", str(tmp_path / "bundle")),
    ):
        code, _, err = cli(capsys, "--home", str(root), *args)
        assert code == 0, err
    code, out, err = cli(capsys, "verify", str(tmp_path / "bundle"), "--root-key", str(root / "keys" / "root.pub.pem"))
    assert code == 0, err
    assert "notice from the exporting site: Derived from purged data" in out
