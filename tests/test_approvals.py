"""Two-person approvals in the service: request, decide with a signed statement, use once.

In-process, with callers built as the kernel would name them (the socket test with real Unix
users is in test_rbac_users). The people: alice and bob are release managers, carol an ML
engineer (no approver role), dave a second admin; each has a user key in the root-signed
trust store, made the way `appliance keys create` makes it.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from appliance.service import Caller, Service
from appliance.service.api import dispatch
from keys.approval import sign_statement, statement
from keys.errors import ApplianceError
from keys.keystore import NodeKey, create_key, load_key
from keys.truststore import entry_for, read_store, write_store
from policies.errors import ApprovalError, PolicyError
from policies.policy import default_policy
from policies.signature import sign_policy
from tests.conftest import PASSPHRASE

PASS = PASSPHRASE.encode()
PEOPLE = {"alice": ["release-manager"], "bob": ["release-manager"], "carol": ["ml-engineer"], "dave": ["admin"]}


def who(name: str) -> Caller:
    if name not in PEOPLE:
        return Caller.current()
    return Caller(uid=60000 + sorted(PEOPLE).index(name), user=name, gids=(), groups=(), pid=None)


def _install(home: Path, keys_dir: Path, *, version: int = 2) -> dict[str, NodeKey]:
    """With the service stopped, as the root key's holder: a policy binding the people, and their user keys."""
    with Service.open(home, PASS) as svc:
        owner = svc.owner
    text = default_policy(owner).replace("version = 1", f"version = {version}", 1)
    text = text.replace("[bindings.users]\n", "[bindings.users]\n" + "".join(f"{n} = {json.dumps(r)}\n" for n, r in PEOPLE.items()))
    root = load_key(home / "keys" / "root.key", PASS)
    (home / "policy.toml").write_text(text)
    (home / "policy.toml.sig").write_bytes(sign_policy(text.encode(), root))
    store = read_store(home / "keys" / "truststore.json", root.public_key)
    keys = {}
    for name in PEOPLE:
        keys[name] = create_key(keys_dir / f"{name}.key", PASS)
        store = store.with_entry(entry_for(keys[name], "user", name))
    write_store(home / "keys" / "truststore.json", store, root)
    return keys


@pytest.fixture
def setup(home_copy: tuple[Path, Any], tmp_path: Path) -> Any:
    home, summary = home_copy
    keys = _install(home, tmp_path / "userkeys")
    svc = Service.open(home, PASS)
    yield svc, keys, summary.model_digest
    svc.close()


def call(svc: Service, caller: Caller, op: str, **params: Any) -> Any:
    return dispatch(svc, caller, op, params)


def decide(svc: Service, caller: Caller, rid: str, key: NodeKey, decision: str = "approve", **changes: Any) -> Any:
    # Read as the owner (an admin sees every request): a refused caller still gets to send a decision.
    req = call(svc, who(svc.owner), "approvals.show", id=rid)
    body = statement(req, decision=decision, approver=caller.user, key_id=key.key_id, signed_at=dt.datetime.now(dt.UTC).isoformat())
    body.update(changes)
    return call(svc, caller, "approvals.decide", id=rid, statement=body, signature=sign_statement(body, key))


def export(svc: Service, caller: Caller, model: str, approval: str | None) -> bytes:
    return b"".join(call(svc, caller, "model.export", model=model, approval=approval))


def kinds(svc: Service, rid: str) -> list[str]:
    rows = svc.ledger.select("SELECT kind FROM events WHERE kind LIKE 'approval.%' AND body ->> '$.data.id' = ? ORDER BY seq", [rid])
    return [r[0] for r in rows]


def test_request_then_own_then_roleless_then_right_approver_executes_once(setup: Any) -> None:
    svc, keys, model = setup
    alice, bob, carol = who("alice"), who("bob"), who("carol")
    with pytest.raises(PolicyError, match="only once a second person"):
        export(svc, alice, model[:16], None)
    req = call(svc, alice, "approvals.request", action="model.export", subject=model[:16], reason="ship to site B")
    rid = req["id"]
    assert req["status"] == "pending" and req["model_digest"] == model and req["approvers"] == ["release-manager", "admin"]
    # Bob sees it waiting for him; carol (no approver role) does not.
    assert [r["id"] for r in call(svc, bob, "approvals.list") if r["you_may_decide"]] == [rid]
    assert call(svc, carol, "approvals.list") == []
    with pytest.raises(PolicyError, match="only once a second person"):
        export(svc, alice, model[:16], None)
    with pytest.raises(ApprovalError, match="nobody approves their own request"):
        decide(svc, alice, rid, keys["alice"])
    with pytest.raises(PolicyError, match="carol may not approvals.decide"):
        decide(svc, carol, rid, keys["carol"])
    with pytest.raises(PolicyError, match="still waiting"):
        export(svc, alice, model[:16], rid)
    done = decide(svc, bob, rid, keys["bob"])
    assert done["status"] == "approved" and done["decided_by"] == "bob"
    with pytest.raises(ApprovalError, match="not waiting for a decision"):
        decide(svc, who("dave"), rid, keys["dave"])
    # Only alice may use it, only for this model.
    with pytest.raises(PolicyError, match="only they may use it"):
        export(svc, bob, model[:16], rid)
    with pytest.raises(PolicyError, match="not model.export on"):
        export(svc, alice, model[:12], rid)
    tar = export(svc, alice, model[:16], rid)
    assert len(tar) > 10_000
    with pytest.raises(PolicyError, match="already used"):
        export(svc, alice, model[:16], rid)
    assert kinds(svc, rid) == ["approval.requested", "approval.refused", "approval.approved", "approval.refused", "approval.executed"]
    assert call(svc, alice, "approvals.show", id=rid)["status"] == "executed"
    # The decision that allowed it names the approval and its approver.
    rules = [r for (r,) in svc.ledger.select("SELECT rule FROM decisions WHERE allowed AND action = 'model.export' ORDER BY seq")]
    assert rules[0].endswith("asks for a second person's approval") and rules[-1].endswith(f"request {rid} approved by bob")
    # ledger verify checks the recorded decision's signature again.
    assert call(svc, who(svc.owner), "ledger.verify")["approvals_checked"] == 1


def test_wrong_key_expired_and_replayed_decisions_are_refused(setup: Any, tmp_path: Path) -> None:
    svc, keys, model = setup
    alice, bob = who("alice"), who("bob")
    rid = call(svc, alice, "approvals.request", action="model.export", subject=model[:16])["id"]
    # Another person's key, and a key the trust store does not hold.
    with pytest.raises(ApplianceError, match="is dave's user key, but bob sent"):
        decide(svc, bob, rid, keys["dave"])
    stray = create_key(tmp_path / "stray.key", PASS)
    with pytest.raises(ApplianceError, match="not trusted as a user key"):
        decide(svc, bob, rid, stray)
    # A statement changed after signing.
    req = call(svc, bob, "approvals.show", id=rid)
    body = statement(req, decision="approve", approver="bob", key_id=keys["bob"].key_id, signed_at="now")
    sig = sign_statement(body, keys["bob"])
    with pytest.raises(ApplianceError, match="does not verify"):
        call(svc, bob, "approvals.decide", id=rid, statement={**body, "signed_at": "later"}, signature=sig)
    # A decision signed for another request (another subject) replayed on this one.
    other = call(svc, who("dave"), "approvals.request", action="keys.rotate", subject="node")
    replay = statement(other, decision="approve", approver="bob", key_id=keys["bob"].key_id, signed_at="now")
    with pytest.raises(ApplianceError, match="signed decision is for request"):
        call(svc, bob, "approvals.decide", id=rid, statement=replay, signature=sign_statement(replay, keys["bob"]))
    # One signed for exporting another model.
    body = {**statement(req, decision="approve", approver="bob", key_id=keys["bob"].key_id, signed_at="now"), "subject": "0123456789abcdef"}
    with pytest.raises(ApplianceError, match="is for subject '0123456789abcdef'"):
        call(svc, bob, "approvals.decide", id=rid, statement=body, signature=sign_statement(body, keys["bob"]))
    assert call(svc, alice, "approvals.show", id=rid)["status"] == "pending"
    assert kinds(svc, rid).count("approval.refused") == 5
    # Expired: a short request, its end moved past (the clock is the service's).
    short = call(svc, alice, "approvals.request", action="model.export", subject=model[:16], ttl_s=60)
    import appliance.service.approvals as approvals

    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
    real_now = approvals._now
    approvals._now = lambda: later  # type: ignore[assignment]
    try:
        with pytest.raises(ApprovalError, match="is expired"):
            decide(svc, bob, short["id"], keys["bob"])
    finally:
        approvals._now = real_now  # type: ignore[assignment]
    # A denial is signed too, and ends the request.
    assert decide(svc, bob, rid, keys["bob"], "deny")["status"] == "denied"
    with pytest.raises(PolicyError, match="was denied by bob"):
        export(svc, alice, model[:16], rid)


def test_a_policy_update_is_installed_when_a_second_admin_approves(setup: Any) -> None:
    svc, keys, _ = setup
    owner = who(svc.owner)
    text = svc.home.policy_file.read_text().replace("version = 2", "version = 3", 1).replace('carol = ["ml-engineer"]', 'carol = ["auditor"]')
    root = load_key(svc.home.root_key_file, PASS)
    r = call(svc, owner, "policy.update", text=text, signature=sign_policy(text.encode(), root).decode())
    assert r["requested"] and svc.policy.version == 2
    rid = r["request"]["id"]
    assert 'carol = ["auditor"]' in call(svc, who("dave"), "approvals.show", id=rid)["policy_text"]
    with pytest.raises(ApprovalError, match="holds release-manager"):
        decide(svc, who("alice"), rid, keys["alice"])
    done = decide(svc, who("dave"), rid, keys["dave"])
    assert done["outcome"]["executed"] and done["status"] == "executed"
    assert svc.policy.version == 3 and svc.policy.roles_of("carol", []) == ("auditor", "everyone")
    assert kinds(svc, rid) == ["approval.requested", "approval.refused", "approval.approved", "approval.executed"]


def test_nothing_is_requested_for_nothing(setup: Any) -> None:
    svc, _, _ = setup
    alice = who("alice")
    with pytest.raises(ApplianceError, match="not an action that is requested"):
        call(svc, alice, "approvals.request", action="run.start", subject="x")
    with pytest.raises(ApplianceError, match="no model has a digest starting"):
        call(svc, alice, "approvals.request", action="model.export", subject="deadbeefdeadbeef")
    with pytest.raises(PolicyError, match="carol may not model.export"):
        call(svc, who("carol"), "approvals.request", action="model.export", subject="deadbeefdeadbeef")
    with pytest.raises(ApplianceError, match="outside"):
        call(svc, alice, "approvals.request", action="model.export", subject="x", ttl_s=30 * 86400)


def test_a_user_key_added_while_the_service_runs_is_taken_and_recorded(setup: Any, tmp_path: Path) -> None:
    svc, keys, _ = setup
    from appliance.service.rotation import add_key

    eve = create_key(tmp_path / "eve.key", PASS)
    r = add_key(svc.home.root, svc.home.root_key_file, PASS, tmp_path / "eve.pub.pem", "user", "root")
    assert r["key_id"] == eve.key_id
    listed = call(svc, who(svc.owner), "keys.list")
    assert eve.key_id in [k["key_id"] for k in listed["keys"]]
    rows = svc.ledger.select("SELECT body ->> '$.data.owner' FROM events WHERE kind = 'key.registered' AND body ->> '$.data.key_id' = ?", [eve.key_id])
    assert rows == [("root",)]
    with pytest.raises(ApplianceError, match="root already has a valid user key"):
        add_key(svc.home.root, svc.home.root_key_file, PASS, tmp_path / "eve.pub.pem", "user", "root")
    with pytest.raises(ApplianceError, match="no Unix user"):
        add_key(svc.home.root, svc.home.root_key_file, PASS, tmp_path / "eve.pub.pem", "user", "no-such-user-here")


def test_single_operator_home_has_no_two_person_rules(tmp_path: Path) -> None:
    with Service.initialise(tmp_path / "home", PASS, Caller.current(), two_person=False) as svc:
        assert not svc.policy.rules
        assert svc.ledger.events("home.initialised")[0].data["two_person"] is False
    shutil.rmtree(tmp_path / "home")


def test_an_export_that_cannot_run_keeps_its_approval(setup: Any) -> None:
    svc, keys, model = setup
    alice, bob = who("alice"), who("bob")
    rid = call(svc, alice, "approvals.request", action="model.export", subject=model[:16], reason="to site B")["id"]
    decide(svc, bob, rid, keys["bob"])
    # This home has no release key: the bundle cannot be signed, and the approval is not spent on it.
    assert not svc.home.release_key_file.exists()
    with pytest.raises(ApplianceError, match="no release key"):
        b"".join(call(svc, alice, "bundle.export", model=model[:16], approval=rid))
    assert call(svc, alice, "approvals.show", id=rid)["status"] == "approved"
    assert "approval.executed" not in kinds(svc, rid)
    (rule,) = [r for (r,) in svc.ledger.select("SELECT rule FROM decisions WHERE allowed AND action = 'model.export' AND rule LIKE ?", [f"%{rid}%"])]
    assert "kept unused" in rule and "no release key" in rule
    # Used for what can run, it is used once.
    assert len(export(svc, alice, model[:16], rid)) > 10_000
    assert kinds(svc, rid)[-1] == "approval.executed"
    with pytest.raises(PolicyError, match="already used"):
        export(svc, alice, model[:16], rid)
