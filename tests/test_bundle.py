"""Export bundles: written by the service, checked offline against a pinned root key, and a tamper matrix.

Each tamper case changes a copy of one good bundle and expects its own error. Edits to any
file are caught by the signed manifest first; the cases marked "re-signed" also re-sign the
manifest with the genuine release key (a signer that went wrong), to show the deeper checks
— provenance, ledger chain, model digest — stand on their own.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keys.digest import dir_manifest
from keys.errors import ApplianceError
from keys.keystore import NodeKey, create_key, load_key, load_public_key
from keys.truststore import TrustStoreError
from registry.bundle import BUNDLE_TYPE, SIGNED, verify_bundle, write_tar
from registry.canonical import canonical_json
from registry.dsse import sign_envelope
from tests.conftest import PASSPHRASE, cli, single_operator

PASS = PASSPHRASE.encode()
MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, finished_run: tuple[Path, Any]) -> dict[str, Any]:
    """One home (single operator) with a release key, and two bundles of its model."""
    import pytest as _pytest

    base = tmp_path_factory.mktemp("bundle")
    home = base / "home"
    shutil.copytree(finished_run[0], home, symlinks=True)
    single_operator(home)
    mp = _pytest.MonkeyPatch()
    mp.setenv("APPLIANCE_PASSPHRASE", PASSPHRASE)
    try:
        _cli_ok("--home", str(home), "keys", "release-init", "--root-key", str(home / "keys" / "root.key"))
        _cli_ok("--home", str(home), "registry", "tag", finished_run[1].model_digest[:16], "production")
        _cli_ok("--home", str(home), "export", "tiny-test@production", "--to", str(base / "one"))
        _cli_ok("--home", str(home), "export", finished_run[1].model_digest[:16], "--tar", str(base / "two.tar"))
        _second_model(home, finished_run[1].model_digest, base / "work")
        _cli_ok("--home", str(home), "export", "tiny-test:2", "--to", str(base / "other"))
    finally:
        mp.undo()
    return {
        "home": home,
        "one": base / "one",
        "two": base / "two.tar",
        "other": base / "other",
        "root": home / "keys" / "root.pub.pem",
        "digest": finished_run[1].model_digest,
    }


def _second_model(home: Path, first: str, work: Path) -> None:
    """A second model of the same run (another config), signed and recorded as packaging records one: tiny-test:2."""
    from appliance.service import Service
    from registry.modelsig import sign_model_dir

    with Service.open(home, PASS) as svc:
        src = svc.store.path_of(first)
        shutil.copytree(src, work / "model2", copy_function=shutil.copyfile)
        (work / "model2" / "model.sig").unlink()
        config = json.loads((work / "model2" / "config.json").read_text())
        (work / "model2" / "config.json").write_text(json.dumps({**config, "note": "second model"}))
        sign_model_dir(work / "model2", svc.key)
        stored = svc.store.import_path(work / "model2", kind="model", name="second", signer=svc.key, move=True)
        (event,) = [e for e in svc.ledger.events("artifact.recorded") if e.data["digest"] == first]
        data = {**event.data, "digest": stored.digest, "name": event.data["name"] + "2", "store_path": str(stored.path.relative_to(svc.home.store_dir))}
        svc.ledger.append("artifact.recorded", "root", data)


def _cli_ok(*argv: str) -> str:
    import contextlib
    import io

    from appliance.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    assert code == 0, err.getvalue()
    return out.getvalue()


def verify(path: Path, root: Path, **kw: Any) -> dict[str, Any]:
    return verify_bundle(path, load_public_key(root), **kw)


def test_a_bundle_verifies_offline_and_with_model_signing(exported: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bundle in (exported["one"], exported["two"]):
        r = verify(bundle, exported["root"])
        assert r["model"]["digest"] == exported["digest"] and r["model"]["name"] == "tiny-test" and r["model"]["version"] == 1
        assert r["dependencies"] > 5 and r["head_seq"] > 0
    # The CLI, with no home: a fresh folder and only the pinned root key.
    code, out, err = cli(capsys, "verify", str(exported["one"]), "--root-key", str(exported["root"]))
    assert code == 0 and "bundle OK: tiny-test:1" in out, err
    # model_signing's own tool accepts the model part with the release key.
    release_pem = tmp_path / "release.pub.pem"
    store = json.loads((exported["one"] / "keys" / "truststore.json").read_text())
    release_pem.write_text(next(e["public_key_pem"] for e in store["entries"] if e["role"] == "release"))
    model = exported["one"] / "model"
    proc = subprocess.run(
        [MODEL_SIGNING, "verify", "key", str(model), "--signature", str(model / "release.sig"), "--public_key", str(release_pem)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The export was recorded, with the manifest's digest.
    with __import__("appliance.service", fromlist=["Service"]).Service.open(exported["home"], PASS) as svc:
        events = svc.ledger.events("model.exported")
    assert [(e.data["name"], e.data["version"]) for e in events] == [("tiny-test", 1), ("tiny-test", 1), ("tiny-test", 2)] and all(
        len(e.data["bundle_manifest_sha256"]) == 64 for e in events
    )


def _copy(exported: dict[str, Any], tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(exported["one"], dest)
    return dest


def _resign(bundle: Path, home: Path) -> None:
    """Recompute the manifest and sign it with the genuine release key (a signer gone wrong)."""
    release = load_key(home / "keys" / "release.key", PASS)
    manifest = json.loads((bundle / "bundle.json").read_bytes())
    manifest["files"] = {rel: d for rel, d, _ in dir_manifest(bundle) if rel not in SIGNED}
    body = canonical_json(manifest)
    (bundle / "bundle.json").write_bytes(body)
    (bundle / "bundle.dsse.json").write_text(json.dumps(sign_envelope(body, release, BUNDLE_TYPE)))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _weights(b: Path) -> Path:
    return max((p for p in (b / "model").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _edit_jsonl(path: Path, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_bytes(b"".join(canonical_json(r) + b"\n" for r in edit(rows)))


def _stranger(b: Path, tmp: Path) -> None:
    key = create_key(tmp / "stranger.key", PASS)
    (b / "bundle.dsse.json").write_text(json.dumps(sign_envelope((b / "bundle.json").read_bytes(), key, BUNDLE_TYPE)))


def _swap_signature(b: Path, tmp: Path, other: Path) -> None:
    shutil.unpack_archive(other, tmp / "other", format="tar")
    shutil.copyfile(tmp / "other" / "model" / "release.sig", b / "model" / "release.sig")


def _swap_from_other_model(b: Path, e: dict[str, Any]) -> None:
    """The release signature of another model (tiny-test:2) put on this one."""
    shutil.copyfile(e["other"] / "model" / "release.sig", b / "model" / "release.sig")


def _edit_statement(b: Path, home: Path) -> None:
    env = json.loads((b / "provenance.dsse.json").read_text())
    st = json.loads(base64.b64decode(env["payload"]))
    st["predicate"]["buildDefinition"]["externalParameters"]["recipe_digest"] = "0" * 64
    env["payload"] = base64.b64encode(canonical_json(st)).decode()
    (b / "provenance.dsse.json").write_text(json.dumps(env))
    _resign(b, home)


def _edit_excerpt(b: Path, home: Path) -> None:
    def edit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows[0]["data"]["name"] = "something-else"
        return rows

    _edit_jsonl(b / "ledger" / "excerpt.jsonl", edit)
    _resign(b, home)


def _truncate(b: Path, home: Path) -> None:
    _edit_jsonl(b / "ledger" / "chain.jsonl", lambda rows: rows[:-3])
    _resign(b, home)


def _rename(b: Path, home: Path) -> None:
    (b / "model").rename(b / "tiny-v1")
    _resign(b, home)


def _edit_store(b: Path) -> None:
    store = json.loads((b / "keys" / "truststore.json").read_text())
    store["entries"][-1]["owner"] = "mallory"
    (b / "keys" / "truststore.json").write_text(json.dumps(store))


CASES: dict[str, tuple[Callable[[Path, Path, dict[str, Any]], None], type[Exception], str]] = {
    "model-byte-flip": (lambda b, t, e: _flip(_weights(b)), ApplianceError, "changed: model/"),
    "extra-file": (lambda b, t, e: (b / "model" / "notes.txt").write_text("hi"), ApplianceError, "extra: model/notes.txt"),
    "missing-file": (lambda b, t, e: (b / "model" / "config.json").unlink(), ApplianceError, "missing: model/config.json"),
    "renamed-model-dir": (lambda b, t, e: (b / "model").rename(b / "tiny-v1"), ApplianceError, "missing: model/"),
    "renamed-model-dir-resigned": (lambda b, t, e: _rename(b, e["home"]), ApplianceError, "does not match the model digest"),
    "unknown-key": (lambda b, t, e: _stranger(b, t), ApplianceError, "signed by no key this verifier trusts"),
    "signatures-swapped": (lambda b, t, e: _swap_from_other_model(b, e), ApplianceError, "changed: model/release.sig"),
    "signatures-swapped-resigned": (lambda b, t, e: (_swap_from_other_model(b, e), _resign(b, e["home"])), ApplianceError, "config.json differs"),
    "bundles-swapped-parts": (lambda b, t, e: _swap_signature(b, t, e["two"]), ApplianceError, "changed: model/release.sig"),
    "provenance-edited": (lambda b, t, e: _edit_statement(b, e["home"]), ApplianceError, "provenance.dsse.json by key .* does not verify"),
    "excerpt-edited": (lambda b, t, e: _edit_excerpt(b, e["home"]), ApplianceError, "does not match its link in the chain"),
    "ledger-truncated": (lambda b, t, e: _truncate(b, e["home"]), ApplianceError, "not at the signed head's seq"),
    "trust-store-edited": (lambda b, t, e: _edit_store(b), TrustStoreError, "truststore.json"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tamper_matrix(case: str, exported: dict[str, Any], tmp_path: Path) -> None:
    change, error, message = CASES[case]
    bundle = _copy(exported, tmp_path)
    change(bundle, tmp_path, exported)
    with pytest.raises(error, match=message) as caught:
        verify(bundle, exported["root"])
    print(f"{case}: {caught.value}")  # the note's table of cases and messages (pytest -s)
    # The same as one tar file: refused the same way.
    tar = write_tar(bundle, tmp_path / "bundle.tar")
    with pytest.raises(error, match=message):
        verify(tar, exported["root"])


def test_a_release_key_revoked_since_the_export_is_refused_with_the_newer_trust_store(exported: dict[str, Any], tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(exported["home"], home, symlinks=True)
    release = json.loads((exported["one"] / "bundle.json").read_text())["exporter"]["release_key_id"]
    code = _cli_ok("--home", str(home), "keys", "revoke", release[:16], "--reason", "laptop lost", "--root-key", str(home / "keys" / "root.key"))
    assert code
    assert verify(exported["one"], exported["root"])["release_key_id"] == release  # on its own trust store, it still passes
    with pytest.raises(ApplianceError, match="revoked at .*laptop lost"):
        verify(exported["one"], exported["root"], trust_store=home / "keys" / "truststore.json")


def test_a_bundle_against_another_root_and_a_bundle_with_a_link_are_refused(exported: dict[str, Any], tmp_path: Path) -> None:
    other = create_key(tmp_path / "other-root.key", PASS)
    with pytest.raises(TrustStoreError):
        verify_bundle(exported["one"], other.public_key)
    bundle = _copy(exported, tmp_path)
    (bundle / "model" / "link").symlink_to("/etc/passwd")
    with pytest.raises(ApplianceError):
        verify(bundle, exported["root"])
    assert isinstance(other, NodeKey)


def test_import_into_a_second_home_then_fine_tune_from_it(exported: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.service import Service
    from tests.conftest import new_home, run_to_end
    from tests.test_finetune_run import _recipe

    site_b = tmp_path / "site-b"
    new_home(site_b).close()
    # A tampered bundle is refused and leaves nothing behind.
    bad = _copy(exported, tmp_path)
    _flip(_weights(bad))
    code, _, err = cli(capsys, "--home", str(site_b), "import", str(bad), "--root-key", str(exported["root"]))
    assert code == 2 and "changed: model/" in err
    # Against another root key than the origin's: refused.
    stranger = create_key(tmp_path / "stranger-root.key", PASS)
    code, _, err = cli(capsys, "--home", str(site_b), "import", str(exported["two"]), "--root-key", str(tmp_path / "stranger-root.pub.pem"))
    assert code == 2 and "truststore.json" in err and stranger.key_id
    code, out, err = cli(capsys, "--home", str(site_b), "import", str(exported["two"]), "--root-key", str(exported["root"]), "--json")
    assert code == 0, err
    imported = json.loads(out)
    assert imported["digest"] == exported["digest"] and imported["origin_version"] == 1
    # The same version again is a replay; so is an older one once a newer is in.
    code, _, err = cli(capsys, "--home", str(site_b), "import", str(exported["one"]), "--root-key", str(exported["root"]))
    assert code == 2 and "not newer than version 1" in err and "is a replay" in err
    code, _, err = cli(capsys, "--home", str(site_b), "import", str(exported["other"]), "--root-key", str(exported["root"]))
    assert code == 0, err
    code, _, err = cli(capsys, "--home", str(site_b), "import", str(exported["one"]), "--root-key", str(exported["root"]))
    assert code == 2 and "tiny-test version 1 from this origin is not newer than version 2" in err
    code, out, err = cli(capsys, "--home", str(site_b), "registry", "verify", "tiny-test", "--json")
    assert code == 0 and json.loads(out)["kind"] == "imported-model", err
    with Service.open(site_b, PASS) as svc:
        event = svc.ledger.events("model.imported")[0]
        assert event.data["origin_root_key_id"] == json.loads((exported["one"] / "bundle.json").read_text())["exporter"]["root_key_id"]
        origin_pem = tmp_path / "origin-node.pub.pem"
        origin_pem.write_text(event.data["origin_node_key_pem"])
        # A fine-tune from the imported model, its signature checked with the origin's node key.
        recipe = _recipe(tmp_path / "ft", Path(imported["store_path"]), unsigned_ok=False)
        recipe.write_text(recipe.read_text().replace("allow_unsigned_base = false", f'allow_unsigned_base = false\nbase_public_key = "{origin_pem}"'))
        final = run_to_end(svc, recipe)
    assert final["status"] == "succeeded", final
    assert final["summary"]["stats"]["base"]["verification"] != "unsigned-allowed"


def test_verify_needs_no_home_and_no_service(exported: dict[str, Any], tmp_path: Path) -> None:
    """`appliance verify` in a clean environment: an empty HOME, no appliance variables, another folder."""
    empty = tmp_path / "nobody-home"
    empty.mkdir()
    shutil.copyfile(exported["root"], tmp_path / "site-a-root.pub.pem")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(empty), "LANG": "C.UTF-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "verify", str(exported["two"]), "--root-key", "site-a-root.pub.pem"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0 and "bundle OK: tiny-test:1" in proc.stdout, proc.stderr
    assert not any(empty.iterdir())  # nothing was made in the verifier's home
