"""The signed policy in the service: it starts only under a root-signed policy, takes signed
updates from callers allowed to make them, never one that grants the updater more, and records it all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.service import Service
from keys.keystore import load_key
from policies.errors import PolicyError, PolicySignatureError
from policies.policy import default_policy
from policies.signature import sign_policy
from tests.conftest import PASSPHRASE, cli, new_home
from tests.test_server import short_dir  # noqa: F401  (a fixture)

PASS = PASSPHRASE.encode()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A single-operator home: its policy updates need no second person (test_approvals has those)."""
    from appliance.service import Caller

    Service.initialise(tmp_path / "home", PASS, Caller.current(), two_person=False).close()
    return tmp_path / "home"


def _owner(home: Path) -> str:
    with Service.open(home, PASS) as svc:
        return str(svc.owner)


def _signed(home: Path, text: str, out: Path) -> Path:
    out.write_text(text)
    root = load_key(home / "keys" / "root.key", PASS)
    out.with_name(out.name + ".sig").write_bytes(sign_policy(text.encode(), root))
    return out


@pytest.mark.parametrize("damage", ["tamper", "unsign", "node-signed"])
def test_the_service_starts_only_under_a_root_signed_policy(home: Path, damage: str) -> None:
    policy, sig = home / "policy.toml", home / "policy.toml.sig"
    if damage == "tamper":
        policy.write_text(policy.read_text().replace('permissions = ["service.info", "approvals.read"]', 'permissions = ["service.info", "ledger.query"]'))
    elif damage == "unsign":
        sig.unlink()
    else:
        node = load_key(home / "keys" / "node.key", PASS)
        sig.write_bytes(sign_policy(policy.read_bytes(), node))
    with pytest.raises(PolicySignatureError) as err:
        Service.open(home, PASS)
    assert str(policy) in err.value.message
    if damage == "node-signed":
        assert "not a root key of the trust store" in err.value.message


def test_a_new_home_enforces_the_five_two_person_rules_and_a_single_operator_home_none(tmp_path: Path) -> None:
    with new_home(tmp_path / "two") as svc:
        assert sorted(svc.policy.rules) == ["data.purge", "keys.revoke", "keys.rotate", "model.export", "policy.update"]
        assert svc.ledger.events("home.initialised")[0].data["two_person"] is True
    with Service.open(tmp_path / "two", PASS) as svc:
        assert svc.policy.two_person("model.export").approvers == ("release-manager", "admin")  # type: ignore[union-attr]


def test_check_sign_diff_update_show_through_the_cli(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    owner = _owner(home)
    text = (
        default_policy(owner, two_person=False)
        .replace("version = 1", "version = 2")
        .replace("[bindings.groups]\n", '[bindings.groups]\n"appliance-audit" = ["auditor"]\n')
    )
    draft = tmp_path / "policy.toml"
    draft.write_text(text.replace('"ledger.query"', '"ledger.qeury"'))
    code, _, err = cli(capsys, "policy", "check", str(draft))
    assert code == 2 and "ledger.qeury" in err and "did you mean 'ledger.query'" in err
    draft.write_text(text)
    code, out, _ = cli(capsys, "policy", "check", str(draft))
    assert code == 0 and "no problems" in out
    code, _, err = cli(capsys, "policy", "sign", str(draft), "--root-key", str(home / "keys" / "root.key"))
    assert code == 0, err
    assert json.loads((tmp_path / "policy.toml.sig").read_text())["key_id"]
    code, out, _ = cli(capsys, "--home", str(home), "policy", "diff", str(draft))
    assert code == 0 and "appliance-audit" in out and "version: 1 → 2" in out
    code, out, err = cli(capsys, "--home", str(home), "policy", "update", str(draft))
    assert code == 0, err
    code, out, _ = cli(capsys, "--home", str(home), "policy", "show", "--json")
    shown = json.loads(out)
    assert shown["version"] == 2 and shown["groups"] == {"appliance-audit": ["auditor"]} and "admin" in shown["your_roles"]
    with Service.open(home, PASS) as svc:
        updated = svc.ledger.events("policy.updated")
        loaded = svc.ledger.events("policy.loaded")
    assert len(updated) == 1 and updated[0].data["version"] == 2 and any("appliance-audit" in c for c in updated[0].data["changes"])
    assert loaded[-1].data["digest"] == shown["digest"]


def test_an_update_is_refused_unsigned_older_or_granting_the_updater_more(home: Path, tmp_path: Path) -> None:
    owner = _owner(home)
    base = default_policy(owner, two_person=False)
    # v2: the owner keeps only a policy editor's role (policy.update, policy.read).
    editor = (
        base.replace("version = 1", "version = 2")
        .replace(f'"{owner}" = ["admin"]', f'"{owner}" = ["policy-editor"]')
        .replace("[roles.auditor]", '[roles.policy-editor]\npermissions = ["policy.update", "policy.read"]\n\n[roles.auditor]')
    )
    with Service.open(home, PASS) as svc:
        from appliance.service import Caller
        from appliance.service.api import dispatch

        me = Caller.current()
        with pytest.raises(PolicySignatureError, match="is unsigned"):
            dispatch(svc, me, "policy.update", {"text": editor})
        root = load_key(home / "keys" / "root.key", PASS)
        dispatch(svc, me, "policy.update", {"text": editor, "signature": sign_policy(editor.encode(), root).decode()})
        assert svc.policy.version == 2
        # v3 would make the editor admin again: the editor may not grant that to themself.
        escalate = editor.replace("version = 2", "version = 3").replace(f'"{owner}" = ["policy-editor"]', f'"{owner}" = ["admin"]')
        with pytest.raises(PolicyError, match=f"{owner} may not install a policy that gives {owner} .*role admin"):
            dispatch(svc, me, "policy.update", {"text": escalate, "signature": sign_policy(escalate.encode(), root).decode()})
        older = editor.replace("version = 2", "version = 1").replace("policy.read", "policy.read")
        with pytest.raises(PolicyError, match="not newer than version 2"):
            dispatch(svc, me, "policy.update", {"text": older, "signature": sign_policy(older.encode(), root).decode()})
        assert svc.policy.version == 2
        # Every one of these was decided and recorded.
        rows = svc.ledger.select("SELECT count(*) FROM decisions WHERE action = 'policy.update'")
    assert rows[0][0] == 4


def test_over_the_socket_a_bad_policy_file_is_bad_input_and_a_refusal_is_403(short_dir: Path) -> None:
    from tests.test_server import new_home as served_home
    from tests.test_server import start_serve

    served = start_serve(served_home(short_dir / "home"), short_dir / "run" / "appliance.sock")
    try:
        client = served.client()
        try:
            with pytest.raises(PolicyError, match="is unsigned"):
                client.call("policy.update", text="[policy]\nname = 'x'\nversion = 9\n")
        finally:
            client.close()
        import httpx

        transport = httpx.HTTPTransport(uds=str(served.socket))
        with httpx.Client(transport=transport, base_url="http://appliance") as http:
            r = http.post("/v1/policy", json={"text": "[policy]\nname = 'x'\nversion = 9\n"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "PolicySignatureError"
    finally:
        served.stop()


def test_a_home_initialised_for_another_owner_binds_owner_and_service_user_to_admin(tmp_path: Path) -> None:
    import pwd

    from appliance.service import Caller

    other = pwd.getpwnam("nobody")
    with Service.initialise(tmp_path / "home", PASS, Caller.from_uid(other.pw_uid)) as svc:
        users = dict(svc.policy.users)
        me = Caller.current().user
    assert users == {"nobody": ("admin",), me: ("admin",)}
    assert "# the service user" in (tmp_path / "home" / "policy.toml").read_text()


def test_an_older_policy_put_back_in_the_home_is_refused(home: Path, tmp_path: Path) -> None:
    owner = _owner(home)
    first = (home / "policy.toml").read_bytes(), (home / "policy.toml.sig").read_bytes()
    _signed(home, default_policy(owner, two_person=False).replace("version = 1", "version = 2"), home / "policy.toml")
    with Service.open(home, PASS) as svc:
        assert svc.policy.version == 2
    (home / "policy.toml").write_bytes(first[0])
    (home / "policy.toml.sig").write_bytes(first[1])
    with pytest.raises(PolicyError, match="is version 1 .* has been under version 2"):
        Service.open(home, PASS)
    # Another policy signed under a version already used is refused too.
    _signed(
        home,
        default_policy(owner, two_person=False).replace("version = 1", "version = 2").replace("[bindings.groups]\n", '[bindings.groups]\n"x" = ["auditor"]\n'),
        home / "policy.toml",
    )
    with pytest.raises(PolicyError, match="is version 2 .* has been under version 2"):
        Service.open(home, PASS)
