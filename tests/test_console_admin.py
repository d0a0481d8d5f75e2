"""The console's Keys & approvals pane on a real service: keys, the policy, and a two-person approval
decided through the console, signed with the approver's user key as `appliance approve` signs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Input, Static

from tests.conftest import PASSPHRASE
from tests.console_fixtures import console_base, console_home, open_console, run_console, settle  # noqa: F401

PASS = PASSPHRASE.encode()


def _admin() -> str:
    from appliance.service.caller import Caller

    return Caller.current().user  # the fixtures' home binds the process's own user to admin


def _user_keys(home: Path, keys_dir: Path, owners: list[str]) -> dict[str, Path]:
    """With the service stopped, as the root key's holder: a user key for each owner, in the trust store
    (what `appliance keys create` and `appliance keys add` do)."""
    from keys.keystore import create_key, load_key
    from keys.truststore import entry_for, read_store, write_store

    root = load_key(home / "keys" / "root.key", PASS)
    store = read_store(home / "keys" / "truststore.json", root.public_key)
    paths = {}
    for owner in owners:
        paths[owner] = keys_dir / f"{owner}.key"
        store = store.with_entry(entry_for(create_key(paths[owner], PASS), "user", owner))
    write_store(home / "keys" / "truststore.json", store, root)
    return paths


async def _open(app: Any, pilot: Any) -> Any:
    from appliance.console.admin import AdminPane

    await pilot.press("6")
    await settle(pilot, app)
    return app.query_one(AdminPane)


def _text(app: Any, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


def _cells(table: DataTable, column: int) -> list[str]:
    return [str(table.get_row_at(i)[column]) for i in range(table.row_count)]


@pytest.fixture
def two_people(console_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """rex (release-manager) and the admin with user keys; one service both talk to; the admin's key is the default."""
    from appliance.cli import main
    from appliance.service import Service

    keys = _user_keys(console_home, tmp_path / "userkeys", ["rex", _admin()])
    # A release key, so an approved export can run (`appliance keys release-init`, service stopped).
    assert main(["--home", str(console_home), "keys", "release-init", "--root-key", str(console_home / "keys" / "root.key")]) == 0
    monkeypatch.setenv("APPLIANCE_USER_KEY", str(keys[_admin()]))
    monkeypatch.delenv("APPLIANCE_USER_PASSPHRASE", raising=False)
    monkeypatch.delenv("APPLIANCE_USER_PASSPHRASE_FILE", raising=False)
    svc = Service.open(console_home, PASS)
    yield svc
    svc.close()


def test_keys_and_the_policy_in_force(console_home: Path) -> None:
    with open_console(console_home) as session:

        async def steps(app: Any, pilot: Any) -> None:
            await _open(app, pilot)
            keys = session.call("keys.list")
            table = app.query_one("#admin-keys", DataTable)
            assert sorted(_cells(table, 0)) == ["node", "root"]
            ids = _cells(table, 2)
            assert f"{keys['node_key_id'][:16]}…" in ids and f"{keys['root_key_id'][:16]}…" in ids
            assert "this node" in _cells(table, 6) and _cells(table, 1) == ["valid", "valid"]
            assert "Policy default v2" in _text(app, "#admin-policy-title")
            policy = app.query_one("#admin-policy", DataTable)
            row = policy.get_row("ledger.query")
            columns = [c.key.value for c in policy.columns.values()]
            assert str(row[columns.index("auditor")]) == "✓" and str(row[columns.index("ml-engineer")]) == "·"
            assert "2p" in str(policy.get_row("model.export")[0])
            bindings = _text(app, "#admin-bindings")
            assert "rex" in bindings and "release-manager" in bindings and "model.export ← release-manager, admin" in bindings
            names = [name for name, _, _ in app.pane_commands()]
            assert "Approvals: approve the selected request" in names and "Policy: read the signed policy file" in names
            await pilot.press("p")
            await pilot.pause(0.2)
            assert "[[two_person]]" in app.screen.query_one("#policy-text").text
            await pilot.press("escape")
            assert app.errors == []

        run_console(session, steps)


def test_an_export_requested_by_rex_is_approved_by_the_admin_through_the_modal(two_people: Any) -> None:
    from appliance.console.admin_decide import DecideScreen

    with open_console(two_people.home.root, user="rex", svc=two_people) as rex, open_console(two_people.home.root, svc=two_people) as admin:
        rid = rex.call("approvals.request", action="model.export", subject="tiny-test", reason="ship to site B")["id"]

        async def steps(app: Any, pilot: Any) -> None:
            pane = await _open(app, pilot)
            table = app.query_one("#admin-approvals", DataTable)
            assert _cells(table, 0) == [rid] and _cells(table, 4) == ["pending"] and _cells(table, 5) == ["yes"]
            assert pane.selected == rid
            assert f"request {rid}: model.export" in _text(app, "#admin-request") and "ship to site B" in _text(app, "#admin-request")
            assert not app.query_one("#admin-approve").disabled
            await pilot.press("a")
            await pilot.pause(0.2)
            assert isinstance(app.screen, DecideScreen)
            assert app.screen.query_one("#decide-passphrase", Input).password
            await pilot.press(*["space" if c == " " else c for c in PASSPHRASE], "enter")
            await settle(pilot, app, timeout=30)
            assert app.errors == []
            assert not isinstance(app.screen, DecideScreen)  # back on the pane
            shown = admin.call("approvals.show", id=rid)
            assert shown["status"] == "approved" and shown["decided_by"] == _admin()
            # Decided here: still in sight, approved, no longer anyone's to decide.
            assert _cells(table, 4) == ["approved"] and app.query_one("#admin-approve").disabled
            assert "is approved" in _text(app, "#admin-decide-reason")
            # The recorded decision is the admin's signature, checked again by ledger verify.
            assert admin.call("ledger.verify")["approvals_checked"] == 1
            # rex uses it and asks again: on refresh the decided one reads as used, and the new one,
            # waiting for the admin, comes first and is selected.
            assert b"".join(rex.stream("bundle.export", model="tiny-test", approval=rid))[:512].strip(b"\0")  # a tar
            again = rex.call("approvals.request", action="model.export", subject="tiny-test", reason="and site C")["id"]
            await pilot.press("r")
            await settle(pilot, app)
            assert _cells(table, 0) == [again, rid] and _cells(table, 4) == ["pending", "executed"]
            assert pane.selected == again and not app.query_one("#admin-approve").disabled

        run_console(admin, steps)


def test_a_wrong_passphrase_is_an_error_with_its_fix_and_a_denial_signs_with_the_env_passphrase(two_people: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.console.admin_decide import DecideScreen

    with open_console(two_people.home.root, user="rex", svc=two_people) as rex, open_console(two_people.home.root, svc=two_people) as admin:
        rid = rex.call("approvals.request", action="model.export", subject="tiny-test")["id"]

        async def steps(app: Any, pilot: Any) -> None:
            await _open(app, pilot)
            await pilot.press("a")
            await pilot.pause(0.2)
            await pilot.press(*"not-the-passphrase", "enter")
            await settle(pilot, app, timeout=30)
            what, fix = app.errors[-1]
            assert "wrong passphrase" in what and "appliance keys create" in fix
            assert admin.call("approvals.show", id=rid)["status"] == "pending"
            # With the passphrase in the environment the dialog only shows what is signed.
            monkeypatch.setenv("APPLIANCE_USER_PASSPHRASE", PASSPHRASE)
            await pilot.press("d")
            await pilot.pause(0.2)
            assert isinstance(app.screen, DecideScreen) and not app.screen.query("#decide-passphrase")
            await pilot.press("enter")
            await settle(pilot, app, timeout=30)
            assert admin.call("approvals.show", id=rid)["status"] == "denied"

        run_console(admin, steps)


def test_nobody_approves_their_own_request(two_people: Any) -> None:
    with open_console(two_people.home.root, user="rex", svc=two_people) as rex:
        rid = rex.call("approvals.request", action="model.export", subject="tiny-test")["id"]

        async def steps(app: Any, pilot: Any) -> None:
            await _open(app, pilot)
            table = app.query_one("#admin-approvals", DataTable)
            assert _cells(table, 0) == [rid] and _cells(table, 5) == [""]
            assert app.query_one("#admin-approve").disabled and app.query_one("#admin-deny").disabled
            assert "nobody approves their own request" in _text(app, "#admin-decide-reason")
            await pilot.press("a")
            await pilot.pause(0.1)
            assert "nobody approves their own request" in app.errors[-1][0]
            assert rex.call("approvals.show", id=rid)["status"] == "pending"

        run_console(rex, steps)


def test_ml_engineer_sees_deciding_keys_and_policy_disabled_with_the_reasons(console_home: Path) -> None:
    with open_console(console_home, user="mel") as session:

        async def steps(app: Any, pilot: Any) -> None:
            await _open(app, pilot)
            approve = app.query_one("#admin-approve")
            assert approve.disabled and "mel (ml-engineer) lacks approvals.decide" in str(approve.tooltip)
            assert "lacks approvals.decide" in _text(app, "#admin-decide-reason")
            assert "mel (ml-engineer) lacks keys.read" in _text(app, "#admin-keys-reason")
            assert "mel (ml-engineer) lacks policy.read" in _text(app, "#admin-policy-reason")
            assert app.query_one("#admin-all").disabled
            assert app.errors == []
            await pilot.press("2")  # the pane holds the focus, and a tab key still leaves it
            await pilot.pause(0.2)
            assert app.query_one("#tabs").active == "runs"

        run_console(session, steps)
