"""The model registry: names and versions from the ledger, tags that move under model.promote, lineage, verify."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from appliance.service import Caller, Service
from appliance.service.api import dispatch
from keys.errors import ApplianceError
from policies.errors import PolicyError
from tests.conftest import PASSPHRASE, cli
from tests.test_approvals import _install, who

PASS = PASSPHRASE.encode()


def run(capsys: pytest.CaptureFixture[str], home: Path, *argv: str) -> Any:
    code, out, err = cli(capsys, "--home", str(home), "registry", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_names_versions_tags_and_their_history(home_copy: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    home, s = home_copy
    (model,) = run(capsys, home, "list")
    name = model["name"]
    assert model["version"] == 1 and model["digest"] == s.model_digest and model["tags"] == [] and model["kind"] == "model"
    assert run(capsys, home, "show", s.model_digest[:12])["digest"] == s.model_digest
    assert run(capsys, home, "show", f"{name}:1")["digest"] == s.model_digest
    moved = run(capsys, home, "tag", f"{name}:1", "candidate")
    assert moved["version"] == 1 and moved["previous_version"] is None
    assert run(capsys, home, "tag", name, "candidate")["unchanged"]
    run(capsys, home, "tag", f"{name}@candidate", "production")
    shown = run(capsys, home, "show", f"{name}@production")
    assert sorted(shown["tags"]) == ["candidate", "production"] and [h["tag"] for h in shown["tag_history"]] == ["candidate", "production"]
    run(capsys, home, "tag", name, "candidate", "--remove")
    assert run(capsys, home, "show", name)["tags"] == ["production"]
    code, _, err = cli(capsys, "--home", str(home), "registry", "show", f"{name}@candidate")
    assert code == 2 and "is tagged 'candidate'" in err
    code, _, err = cli(capsys, "--home", str(home), "registry", "show", f"{name}:7")
    assert code == 2 and "has no version 7" in err
    with Service.open(home, PASS) as svc:
        moves = svc.ledger.events("registry.tagged")
    assert [(m.data["tag"], m.data["version"]) for m in moves] == [("candidate", 1), ("production", 1), ("candidate", None)]
    code, out, _ = cli(capsys, "--home", str(home), "registry", "lineage", name)
    assert code == 0 and "made from:" in out and "source " in out and "token-shards" in out


def test_a_tag_moves_only_for_model_promote(home_copy: tuple[Path, Any], tmp_path: Path) -> None:
    home, s = home_copy
    _install(home, tmp_path / "keys")  # alice, bob: release-manager; carol: ml-engineer; dave: admin
    with Service.open(home, PASS) as svc:
        name = dispatch(svc, Caller.current(), "registry.list", {})[0]["name"]
        assert dispatch(svc, who("carol"), "registry.tag", {"ref": name, "tag": "candidate"})["version"] == 1
        with pytest.raises(PolicyError, match="may not model.promote"):
            dispatch(svc, Caller(uid=61000, user="mallory", gids=(), groups=(), pid=None), "registry.tag", {"ref": name, "tag": "production"})
        rows = svc.ledger.select("SELECT identity, allowed FROM decisions WHERE action = 'model.promote' ORDER BY seq")
    assert rows == [("carol", True), ("mallory", False)]


def test_verify_checks_bytes_signature_and_the_signer_then(home_copy: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    home, s = home_copy
    r = run(capsys, home, "verify", s.model_digest[:16])
    assert "model-signing" in r["checked"] and "signer trusted then" in r["checked"]
    # A byte flipped in a stored weight file: the error names the file.
    model_dir = home / "store" / "sha256" / s.model_digest[:2] / s.model_digest
    weights = next(p for p in sorted(model_dir.rglob("*")) if p.is_file() and p.stat().st_size > 10_000)
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    code, _, err = cli(capsys, "--home", str(home), "registry", "verify", s.model_digest[:16])
    assert code == 2 and weights.name in err, err


def test_a_model_signed_before_a_rotation_still_verifies(home_copy: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import single_operator

    home, s = home_copy
    single_operator(home)
    code, _, err = cli(capsys, "--home", str(home), "keys", "rotate", "--root-key", str(home / "keys" / "root.key"))
    assert code == 0, err
    r = run(capsys, home, "verify", s.model_digest[:16])
    with Service.open(home, PASS) as svc:
        assert r["signer"] != svc.key.key_id
    with pytest.raises(ApplianceError):
        with Service.open(home, PASS) as svc:
            dispatch(svc, Caller.current(), "registry.verify", {"ref": "0000000000000000"})
