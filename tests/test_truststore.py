"""The root-signed trust store, and verification anchored in it rather than in whatever key a home holds."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import shutil
from pathlib import Path

import duckdb
import pytest

from appliance.service import Service
from keys.keystore import create_key, load_key
from keys.truststore import TrustStoreError, UntrustedKeyError, entry_for, new_store, read_store, write_store
from registry.ledger_verify import head_message
from tests.conftest import PASSPHRASE, cli, new_home

PASS = PASSPHRASE.encode()
OTHER = b"an attacker's own long passphrase"


def _root_and_node(tmp_path: Path) -> tuple[object, object, Path]:
    root = create_key(tmp_path / "root.key", PASS)
    node = create_key(tmp_path / "node.key", PASS)
    store = new_store(root, "alice").with_entry(entry_for(node, "node", "node"))
    path = tmp_path / "truststore.json"
    write_store(path, store, root)
    return root, node, path


def test_a_signed_store_reads_back_with_its_root(tmp_path: Path) -> None:
    root, node, path = _root_and_node(tmp_path)
    store = read_store(path, root.public_key)  # type: ignore[attr-defined]
    assert store.version == 2 and store.root_key_id == root.key_id  # type: ignore[attr-defined]
    assert store.require(node.key_id, "node").owner == "node"  # type: ignore[attr-defined]
    assert set(store.keys_for("node")) == {node.key_id}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d["entries"][1].update(role="release"), "changed after it was signed"),
        (lambda d: d["entries"].append({**d["entries"][1], "key_id": "0" * 64}), "changed after it was signed"),
        (lambda d: d.pop("signature"), "is unsigned"),
        (lambda d: d.update(signature=base64.b64encode(b"junk").decode()), "changed after it was signed"),
        (lambda d: d.update(version=d["version"] + 1), "changed after it was signed"),
    ],
)
def test_a_tampered_or_unsigned_store_is_refused_naming_the_file(tmp_path: Path, change: object, reason: str) -> None:
    root, _, path = _root_and_node(tmp_path)
    document = json.loads(path.read_text())
    change(document)  # type: ignore[operator]
    path.write_text(json.dumps(document))
    with pytest.raises(TrustStoreError, match=reason) as err:
        read_store(path, root.public_key)  # type: ignore[attr-defined]
    assert str(path) in err.value.message


def test_a_store_signed_by_another_root_is_refused(tmp_path: Path) -> None:
    _, _, path = _root_and_node(tmp_path)
    other = create_key(tmp_path / "other.key", PASS)
    with pytest.raises(TrustStoreError, match="signed for root key .* but the trusted root is"):
        read_store(path, other.public_key, anchor_source="/etc/appliance/root.pub.pem")


def test_revocation_and_rotation_bound_when_a_key_may_be_used(tmp_path: Path) -> None:
    root, node, path = _root_and_node(tmp_path)
    store = read_store(path, root.public_key)  # type: ignore[attr-defined]
    t0 = dt.datetime.now(dt.UTC)
    revoked = store.with_change(node.key_id, revoked_at=(t0 + dt.timedelta(hours=1)).isoformat(), revoked_reason="laptop stolen")  # type: ignore[attr-defined]
    assert revoked.require(node.key_id, "node", at=t0 + dt.timedelta(minutes=5))  # type: ignore[attr-defined]
    with pytest.raises(UntrustedKeyError, match=r"revoked at .*laptop stolen") as err:
        revoked.require(node.key_id, "node", at=t0 + dt.timedelta(hours=2))  # type: ignore[attr-defined]
    assert node.key_id[:16] in err.value.message  # type: ignore[attr-defined]
    rotated = store.with_change(node.key_id, not_after=(t0 + dt.timedelta(hours=1)).isoformat())  # type: ignore[attr-defined]
    assert rotated.require(node.key_id, "node", at=t0)  # type: ignore[attr-defined]  # what it signed while valid still verifies
    with pytest.raises(UntrustedKeyError, match="was expired"):
        rotated.require(node.key_id, "node", at=t0 + dt.timedelta(days=1))  # type: ignore[attr-defined]
    with pytest.raises(UntrustedKeyError, match="not trusted as a release key"):
        store.require(node.key_id, "release")  # type: ignore[attr-defined]


# -- the service ----------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A single-operator home: rotation and revocation need no second person here (see the approval test below)."""
    from appliance.service import Caller

    Service.initialise(tmp_path / "home", PASS, Caller.current(), two_person=False).close()
    return tmp_path / "home"


def test_init_writes_a_root_signed_store_and_keys_list_shows_it(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "--home", str(home), "keys", "list", "--json")
    assert code == 0
    listed = json.loads(out)
    assert {k["role"] for k in listed["keys"]} == {"root", "node"} and all(k["status"] == "valid" for k in listed["keys"])
    assert "the home's own copy" in listed["anchor"]
    code, out, _ = cli(capsys, "--home", str(home), "keys", "export-public", "--role", "root")
    assert code == 0 and out == (home / "keys" / "root.pub.pem").read_text()


@pytest.mark.parametrize("damage", ["tamper", "unsign", "delete"])
def test_the_service_refuses_to_start_on_a_bad_trust_store(home: Path, damage: str) -> None:
    path = home / "keys" / "truststore.json"
    document = json.loads(path.read_text())
    if damage == "tamper":
        document["entries"][0]["owner"] = "mallory"
        path.write_text(json.dumps(document))
    elif damage == "unsign":
        del document["signature"]
        path.write_text(json.dumps(document))
    else:
        path.unlink()
    with pytest.raises(TrustStoreError) as err:
        Service.open(home, PASS)
    assert str(path) in err.value.message


def test_a_store_signed_by_a_root_other_than_the_installed_anchor_is_refused(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = create_key(tmp_path / "elsewhere" / "root.key", PASS)
    monkeypatch.setenv("APPLIANCE_ROOT_KEY", str(tmp_path / "elsewhere" / "root.pub.pem"))
    with pytest.raises(TrustStoreError, match=f"but the trusted root is {other.key_id[:16]}.*APPLIANCE_ROOT_KEY"):
        Service.open(home, PASS)


def _resign_ledger(home: Path, key: object) -> None:
    """The forgery: every event and the head signed again with another key, its public half swapped in."""
    con = duckdb.connect(str(home / "ledger.duckdb"))
    for seq, hash_hex in con.execute("SELECT seq, hash FROM events ORDER BY seq").fetchall():
        sig = base64.b64encode(key.sign(bytes.fromhex(hash_hex))).decode()  # type: ignore[attr-defined]
        con.execute("UPDATE events SET key_id = ?, signature = ? WHERE seq = ?", [key.key_id, sig, seq])  # type: ignore[attr-defined]
    con.close()
    head = json.loads((home / "ledger.head.json").read_text())
    head.update(key_id=key.key_id, signature=base64.b64encode(key.sign(head_message(head["seq"], head["hash"]))).decode())  # type: ignore[attr-defined]
    (home / "ledger.head.json").write_text(json.dumps(head))


def test_a_re_signed_ledger_with_a_swapped_node_key_does_not_start_naming_the_untrusted_key(home: Path, tmp_path: Path) -> None:
    forger = create_key(tmp_path / "forger" / "node.key", OTHER)
    _resign_ledger(home, forger)
    for name in ("node.key", "node.pub.pem"):
        shutil.copy(tmp_path / "forger" / name, home / "keys" / name)
    with pytest.raises(UntrustedKeyError, match=f"key {forger.key_id[:16]}… is not trusted as a node key"):
        Service.open(home, OTHER)


def test_a_re_signed_ledger_fails_default_verification_naming_the_untrusted_key(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    forger = create_key(tmp_path / "forger" / "node.key", OTHER)
    _resign_ledger(home, forger)
    code, _, err = cli(capsys, "--home", str(home), "ledger", "verify")
    assert code != 0 and "Traceback" not in err
    assert f"signed by key {forger.key_id[:16]}…, which is not trusted" in err and "trust store" in err


def test_a_revoked_node_key_cannot_start_the_service(home: Path) -> None:
    # Revoke the node key (as of an hour ago) in a store re-signed by the genuine root: the service
    # refuses to sign anything more with it, naming the key and when it was revoked.
    root = load_key(home / "keys" / "root.key", PASS)
    node = load_key(home / "keys" / "node.key", PASS)
    store = read_store(home / "keys" / "truststore.json", root.public_key)
    when = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat(timespec="seconds")
    write_store(home / "keys" / "truststore.json", store.with_change(node.key_id, revoked_at=when, revoked_reason="test"), root)
    with pytest.raises(UntrustedKeyError, match=f"node key {node.key_id[:16]}… .* was revoked at {re.escape(when)}"):
        Service.open(home, PASS)


def test_an_older_trust_store_put_back_is_refused_as_a_rollback(home: Path) -> None:
    root = load_key(home / "keys" / "root.key", PASS)
    path = home / "keys" / "truststore.json"
    old = path.read_bytes()
    store = read_store(path, root.public_key)
    newer = store.with_entry(entry_for(create_key(home.parent / "release.key", PASS), "release", "alice"))
    write_store(path, newer, root)
    with Service.open(home, PASS) as svc:  # the newer version is recorded
        assert svc.trust.version == store.version + 1
    path.write_bytes(old)
    with pytest.raises(TrustStoreError, match=f"is version {store.version}, older than version {store.version + 1}"):
        Service.open(home, PASS)


def test_a_home_made_before_trust_stores_adopts_one_with_keys_init(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("truststore.json", "root.key", "root.pub.pem"):
        (home / "keys" / name).unlink()
    for name in ("policy.toml", "policy.toml.sig"):  # nor had it a signed policy
        (home / name).unlink()
    code, _, err = cli(capsys, "--home", str(home), "runs", "list")
    assert code != 0 and "does not exist" in err and "appliance keys init" in err
    code, out, err = cli(capsys, "--home", str(home), "keys", "init")
    assert code == 0, err
    assert "root key" in out and (home / "keys" / "root.key").is_file()
    code, out, _ = cli(capsys, "--home", str(home), "keys", "list", "--json")
    assert code == 0 and {k["role"] for k in json.loads(out)["keys"]} == {"root", "node"}
    code, _, err = cli(capsys, "--home", str(home), "keys", "init")
    assert code != 0 and "already has a trust store" in err
    code, _, err = cli(capsys, "--home", str(home), "ledger", "verify")
    assert code == 0, err


def test_rotation_keeps_old_signatures_and_refuses_the_old_key_afterwards(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from registry.ledger import Ledger

    old_copy = tmp_path / "old-node.key"
    shutil.copy(home / "keys" / "node.key", old_copy)
    old = load_key(old_copy, PASS)
    code, out, err = cli(capsys, "--home", str(home), "keys", "rotate", "--root-key", str(home / "keys" / "root.key"))
    assert code == 0, err
    new = load_key(home / "keys" / "node.key", PASS)
    assert new.key_id != old.key_id and (home / "keys" / "node.pub.pem").read_bytes() == new.public_pem()
    code, out, _ = cli(capsys, "--home", str(home), "ledger", "verify")
    assert code == 0, out  # the old key's events verify as signed while it was valid
    with Service.open(home, PASS) as svc:
        kinds = [(e.kind, e.data.get("key_id")) for e in svc.ledger.events("key.rotated")]
        signers = svc.ledger.select("SELECT key_id, count(*) FROM events GROUP BY key_id ORDER BY min(seq)")
    assert kinds == [("key.rotated", old.key_id)] and [k for k, _ in signers] == [old.key_id, new.key_id]
    # A verifier elsewhere gets both node keys in one file; every key in it counts.
    code, _, err = cli(capsys, "--home", str(home), "keys", "export-public", "--role", "node", "--all", "--out", str(tmp_path / "nodes.pem"))
    assert code == 0, err
    code, _, err = cli(capsys, "--home", str(home), "ledger", "verify", "--trusted-key", str(tmp_path / "nodes.pem"))
    assert code == 0, err
    # The old key signing after its rotation (someone kept a copy) fails verification, naming it.
    with Ledger.open(home / "ledger.duckdb", old, head_path=home / "ledger.head.json") as ledger:
        ledger.append("note", "mallory", {"text": "signed with a rotated-out key"})
    code, _, err = cli(capsys, "--home", str(home), "ledger", "verify")
    assert code != 0 and f"node key {old.key_id[:16]}… (node) was expired at" in err


def test_revocation_is_recorded_and_refuses_the_current_key_and_the_root(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root_key = str(home / "keys" / "root.key")
    node = load_key(home / "keys" / "node.key", PASS)
    code, _, err = cli(capsys, "--home", str(home), "keys", "revoke", node.key_id[:12], "--reason", "test", "--root-key", root_key)
    assert code != 0 and "rotate it first" in err
    code, _, err = cli(capsys, "--home", str(home), "keys", "rotate", "--root-key", root_key)
    assert code == 0, err
    code, out, err = cli(capsys, "--home", str(home), "keys", "revoke", node.key_id[:12], "--reason", "disk sold", "--root-key", root_key)
    assert code == 0, err
    code, out, _ = cli(capsys, "--home", str(home), "keys", "list", "--json")
    entry = next(k for k in json.loads(out)["keys"] if k["key_id"] == node.key_id)
    assert entry["status"] == "revoked" and entry["revoked_reason"] == "disk sold"
    code, _, err = cli(capsys, "--home", str(home), "ledger", "verify")
    assert code == 0, err  # everything it signed predates the revocation
    with Service.open(home, PASS) as svc:
        revoked = svc.ledger.events("key.revoked")
        decisions = svc.ledger.select("SELECT action, allowed FROM decisions WHERE action LIKE 'keys.%' ORDER BY seq")
    assert revoked[0].data["key_id"] == node.key_id and revoked[0].data["reason"] == "disk sold"
    assert decisions == [("keys.revoke", True), ("keys.rotate", True), ("keys.revoke", True), ("keys.list", True)]
    root_id = load_key(home / "keys" / "root.key", PASS).key_id
    code, _, err = cli(capsys, "--home", str(home), "keys", "revoke", root_id[:12], "--reason", "x", "--root-key", root_key)
    assert code != 0 and "is the root key" in err


def test_under_the_two_person_rule_rotation_needs_an_approved_request_used_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default policy: `keys rotate` is refused without an approval, then runs with one a second admin signed."""
    from appliance.service import Caller
    from appliance.service.api import dispatch
    from tests.test_approvals import PEOPLE, _install, decide, who

    home = tmp_path / "home"
    new_home(home).close()
    keys = _install(home, tmp_path / "userkeys")
    root_key = str(home / "keys" / "root.key")
    code, _, err = cli(capsys, "--home", str(home), "keys", "rotate", "--root-key", root_key)
    assert code != 0 and "only once a second person (admin) approves it" in err and "appliance request keys.rotate node" in err
    code, out, err = cli(capsys, "--home", str(home), "request", "keys.rotate", "node", "--reason", "yearly rotation", "--json")
    assert code == 0, err
    rid = json.loads(out)["id"]
    with Service.open(home, PASS) as svc:
        assert "dave" in PEOPLE and decide(svc, who("dave"), rid, keys["dave"])["status"] == "approved"
        assert dispatch(svc, Caller.current(), "approvals.show", {"id": rid})["use"].startswith("appliance keys rotate")
    code, _, err = cli(capsys, "--home", str(home), "keys", "rotate", "--root-key", root_key, "--approval", rid)
    assert code == 0, err
    code, _, err = cli(capsys, "--home", str(home), "keys", "rotate", "--root-key", root_key, "--approval", rid)
    assert code != 0 and "already used" in err
    code, _, err = cli(capsys, "--home", str(home), "ledger", "verify")
    assert code == 0, err
