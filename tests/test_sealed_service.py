"""The data key table in the service: custody, rotation, damage, and homes made before sealing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from appliance.service import Caller, Service
from appliance.service.api import dispatch
from keys import sealed
from keys.errors import ApplianceError
from keys.keystore import load_key
from tests.conftest import ASSETS, PASSPHRASE, cli, new_home, run_to_end, single_operator, summary_of

PASS = PASSPHRASE.encode()


def _sealed_rows(svc: Service) -> list[tuple[str, str, str]]:
    return svc.ledger.select("SELECT digest, kind, data_key_id FROM artifacts WHERE data_key_id IS NOT NULL ORDER BY seq")


def test_key_material_is_nowhere_in_the_home_but_wrapped(home_copy: tuple[Path, Any]) -> None:
    home, _ = home_copy
    with Service.open(home, PASS) as svc:
        rows = _sealed_rows(svc)
        assert {k for _, k, _ in rows} >= {"raw-documents", "dataset", "dropped-samples", "token-shards"}
        keys = {kid: sealed.get_key(kid) for _, _, kid in rows}
        assert all(keys.values())
        entries = sorted(p.name for p in (home / "keys" / "data").iterdir())
        assert entries == sorted(f"{kid}.json" for kid in keys)
        assert oct((home / "keys" / "data").stat().st_mode & 0o777) == "0o700"
        # Each entry is bound to its artifact: moved to another artifact's row, it does not open.
        entry = json.loads((home / "keys" / "data" / entries[0]).read_text())
        assert entry["binding"] in {d for d, _, _ in rows}
    needles = [k for k in keys.values() if k] + [k.hex().encode() for k in keys.values() if k]
    for dirpath, _dirs, files in os.walk(home):
        for f in files:
            data = (Path(dirpath) / f).read_bytes()
            assert not any(n in data for n in needles), f"a data key in the clear in {f}"


def test_rotation_rewraps_the_data_keys(home_copy: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    home, summary = home_copy
    single_operator(home)
    code, _, err = cli(capsys, "--home", str(home), "keys", "rotate", "--root-key", str(home / "keys" / "root.key"))
    assert code == 0, err
    new = load_key(home / "keys" / "node.key", PASS)
    for entry in (home / "keys" / "data").iterdir():
        assert list(json.loads(entry.read_text())["wraps"]) == [new.key_id]  # the retired wrap dropped at start
    code, out, err = cli(capsys, "--home", str(home), "data", "dropped", summary.run_id, "--json", "--limit", "2")
    assert code == 0, err
    assert json.loads(out)["samples"]


def test_a_changed_key_table_entry_stops_the_service_naming_it(home_copy: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = home_copy
    entry = sorted((home / "keys" / "data").iterdir())[0]
    record = json.loads(entry.read_text())
    (wrap,) = record["wraps"].values()
    wrap["binding"] = "0" * 64
    entry.write_text(json.dumps(record))
    code, _, err = cli(capsys, "--home", str(home), "ledger", "verify")
    assert code != 0
    assert record["key_id"] in err and "does not unwrap" in err and "Traceback" not in err


def test_a_job_without_the_key_cannot_read_a_sealed_artifact(home_copy: tuple[Path, Any]) -> None:
    home, _ = home_copy
    with Service.open(home, PASS) as svc:
        digest, _, kid = next(r for r in _sealed_rows(svc) if r[1] == "dataset")
        path = svc.store.path_of(digest)
        key = sealed.get_key(kid)
    sealed.forget_key(kid)
    try:
        with pytest.raises(sealed.SealedDataError, match=kid):
            sealed.open_read(path)
    finally:
        sealed.add_key(kid, key)  # type: ignore[arg-type]


@pytest.fixture
def plain_home(tmp_path: Path, stdlib_corpus: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Any]:
    """A home whose run was recorded the way every run before sealing was: artifacts in the clear."""
    import appliance.service.runs as runs

    monkeypatch.setattr(runs, "SEALED_OUTPUTS", ())
    shutil.copytree(stdlib_corpus, tmp_path / "corpus")
    shutil.copyfile(ASSETS / "tiny.toml", tmp_path / "tiny.toml")
    with new_home(tmp_path / "home") as svc:
        summary = summary_of(run_to_end(svc, tmp_path / "tiny.toml"))
    return tmp_path / "home", summary


def test_a_home_from_before_sealing_works_and_its_purge_says_it_could_only_overwrite(plain_home: tuple[Path, Any]) -> None:
    home, summary = plain_home
    assert not (home / "keys" / "data").exists() or not any((home / "keys" / "data").iterdir())
    single_operator(home)
    with Service.open(home, PASS) as svc:
        me = Caller.current()
        assert dispatch(svc, me, "data.dropped", {"run": summary.run_id, "limit": 1})["samples"]
        impact = dispatch(svc, me, "purge.impact", {"target": f"run:{summary.run_id}"})
        assert impact["crypto_erasable"] is False
        assert any("not crypto-erasable" in w for w in impact["warnings"])
        r = dispatch(svc, me, "purge.run", {"target": f"run:{summary.run_id}"})
        cert = r["certificate"]
        assert "not crypto-erasable" in cert["sanitization"]["technique"]
        assert cert["sanitization"]["data_keys_destroyed"] == []
        assert cert["verification"]["result"] == "passed", cert["verification"]
        for a in cert["media"]["artifacts"]:
            assert a["sealed"] is False
            assert not svc.store.path_of(a["digest"]).exists()
        with pytest.raises(ApplianceError, match="purged on"):
            dispatch(svc, me, "data.dropped", {"run": summary.run_id})
