"""The release key: made by `keys release-init`, trusted only through the root-signed trust store.

Real keys, real files, a real home: a release key file the store does not trust for the
release role now (planted, another role's key, revoked) stops the service, naming the key.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from appliance.service import Caller, Service
from keys.errors import KeyStoreError
from keys.keystore import create_key, load_key
from keys.truststore import UntrustedKeyError
from tests.conftest import PASSPHRASE, cli, new_home

PASS = PASSPHRASE.encode()


def _release_init(capsys: pytest.CaptureFixture[str], home: Path) -> tuple[int, dict[str, Any], str]:
    code, out, err = cli(capsys, "--home", str(home), "keys", "release-init", "--root-key", str(home / "keys" / "root.key"), "--json")
    return code, json.loads(out) if code == 0 else {}, err


def _listed(capsys: pytest.CaptureFixture[str], home: Path) -> list[dict[str, Any]]:
    code, out, err = cli(capsys, "--home", str(home), "keys", "list", "--json")
    assert code == 0, err
    keys: list[dict[str, Any]] = json.loads(out)["keys"]
    return keys


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A stopped home under the default (two-person) policy."""
    new_home(tmp_path / "home").close()
    return tmp_path / "home"


@pytest.fixture
def release_home(home: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """A home with its release key made (home, release key id)."""
    code, made, err = _release_init(capsys, home)
    assert code == 0, err
    return home, str(made["key_id"])


def test_release_init_makes_the_key_trusts_it_and_the_ledger_records_it(release_home: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    home, key_id = release_home
    keys = home / "keys"
    assert stat.S_IMODE(os.stat(keys / "release.key").st_mode) == 0o600 and (keys / "release.pub.pem").is_file()
    assert load_key(keys / "release.key", PASS).key_id == key_id  # under the node key's passphrase
    listed = _listed(capsys, home)
    assert [(k["role"], k["owner"], k["status"]) for k in listed if k["key_id"] == key_id] == [("release", "release", "valid")]
    assert {k["role"] for k in listed} == {"root", "node", "release"}
    with Service.open(home, PASS) as svc:
        assert svc.release_key is not None and svc.release_key.key_id == key_id
        assert [e.key_id for e in svc.trust.current("release")] == [key_id]
        assert svc.require_release_key().key_id == key_id
        registered = [e.data for e in svc.ledger.events("key.registered") if e.data["role"] == "release"]
    assert [r["key_id"] for r in registered] == [key_id] and "root key" in registered[0]["by"]
    code, _, err = cli(capsys, "--home", str(home), "keys", "export-public", "--role", "release")
    assert code == 0, err


def test_a_second_release_init_is_refused(release_home: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    home, key_id = release_home
    before = (home / "keys" / "truststore.json").read_bytes()
    code, _, err = _release_init(capsys, home)
    assert code == 2 and "Traceback" not in err
    assert f"already has a valid release key {key_id[:16]}…" in err and "appliance keys revoke" in err
    assert (home / "keys" / "truststore.json").read_bytes() == before


def test_made_while_the_service_runs_it_is_recorded_at_once_and_signs_after_a_restart(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.service.api import dispatch

    with Service.open(home, PASS) as svc:
        with pytest.raises(KeyStoreError, match="has no release key") as err:
            svc.require_release_key()
        assert "appliance keys release-init" in err.value.hint
        code, made, out = _release_init(capsys, home)
        assert code == 0, out
        dispatch(svc, Caller.current(), "keys.list", {})  # the next request takes the new store
        assert [e.data["key_id"] for e in svc.ledger.events("key.registered") if e.data["role"] == "release"] == [made["key_id"]]
        with pytest.raises(KeyStoreError, match="was made after this service started"):
            svc.require_release_key()
    code, _, err = cli(capsys, "--home", str(home), "keys", "release-init", "--root-key", str(home / "keys" / "root.key"))
    assert code == 2 and "restart" not in err  # refused: the key exists
    with Service.open(home, PASS) as svc:
        assert svc.release_key is not None and svc.release_key.key_id == made["key_id"]


@pytest.mark.parametrize("planted", ["unknown_key", "node_key_as_release"])
def test_a_swapped_release_key_file_stops_the_service_naming_it(release_home: tuple[Path, str], tmp_path: Path, planted: str) -> None:
    home, _ = release_home
    path = home / "keys" / "release.key"
    path.unlink()
    if planted == "unknown_key":
        # An attacker who can write the home drops a key of their own, under the same passphrase.
        forged = create_key(tmp_path / "forged" / "release.key", PASS)
        shutil.copy(tmp_path / "forged" / "release.key", path)
        expected, why = forged.key_id, "is not trusted as a release key"
    else:
        # A genuine, trusted key, but for another role: trusted as node, it proves nothing for release.
        shutil.copy(home / "keys" / "node.key", path)
        expected, why = load_key(path, PASS).key_id, "(it is a node key)"
    with pytest.raises(UntrustedKeyError) as err:
        Service.open(home, PASS)
    assert f"key {expected[:16]}…" in err.value.message and why in err.value.message and str(path) in err.value.message
    # The refused start left the home free: with the planted file moved out, the service opens without a release key.
    path.rename(tmp_path / "planted.key")
    with Service.open(home, PASS) as svc:
        assert svc.release_key is None


def test_a_revoked_release_key_stops_the_service_until_release_init_replaces_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    Service.initialise(home, PASS, Caller.current(), two_person=False).close()  # revocation needs no second person here
    code, made, err = _release_init(capsys, home)
    assert code == 0, err
    old_id = made["key_id"]
    code, out, err = cli(
        capsys, "--home", str(home), "keys", "revoke", old_id[:12], "--reason", "laptop stolen", "--root-key", str(home / "keys" / "root.key"), "--json"
    )
    assert code == 0, err
    assert "the service refuses to start until `appliance keys release-init" in err
    revoked_at = json.loads(out)["revoked_at"]
    with pytest.raises(UntrustedKeyError) as refused:
        Service.open(home, PASS)
    message = refused.value.message
    assert f"release key {old_id[:16]}…" in message and f"revoked at {revoked_at}" in message and "laptop stolen" in message
    assert "appliance keys release-init" in refused.value.hint
    code, _, err = cli(capsys, "--home", str(home), "keys", "list")
    assert code == 2 and "revoked at" in err and "Traceback" not in err

    code, made, err = _release_init(capsys, home)
    assert code == 0, err
    new_id = made["key_id"]
    aside = home / "keys" / f"release-revoked-{old_id[:16]}.key"
    assert new_id != old_id and made["set_aside"] == str(aside)
    assert load_key(aside, PASS).key_id == old_id and (home / "keys" / f"release-revoked-{old_id[:16]}.pub.pem").is_file()
    with Service.open(home, PASS) as svc:
        assert svc.release_key is not None and svc.release_key.key_id == new_id
        assert [e.data["key_id"] for e in svc.ledger.events("key.revoked")] == [old_id]
        assert [e.data["key_id"] for e in svc.ledger.events("key.registered") if e.data["role"] == "release"] == [old_id, new_id]
    statuses = {k["key_id"]: k["status"] for k in _listed(capsys, home) if k["role"] == "release"}
    assert statuses == {old_id: "revoked", new_id: "valid"}  # the old entry stays: what it signed still verifies
    code, _, err = cli(capsys, "--home", str(home), "ledger", "verify")
    assert code == 0, err


def test_a_release_init_stopped_after_writing_the_store_is_finished_by_the_next(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The state a crash between signing the store and moving the staged key into place leaves.
    from keys.truststore import entry_for, read_store, write_store

    root = load_key(home / "keys" / "root.key", PASS)
    staged = create_key(home / "keys" / "release-next.key", PASS)
    store = read_store(home / "keys" / "truststore.json", root.public_key)
    write_store(home / "keys" / "truststore.json", store.with_entry(entry_for(staged, "release", "release")), root)
    code, made, err = _release_init(capsys, home)
    assert code == 0, err
    assert made["key_id"] == staged.key_id and not (home / "keys" / "release-next.key").exists()
    with Service.open(home, PASS) as svc:
        assert svc.release_key is not None and svc.release_key.key_id == staged.key_id
