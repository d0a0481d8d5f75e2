"""The console's Registry tab: models and artifacts, search, lineage, verify, tag, and export with its approval.

Against the real in-process service on a copy of the finished tiny run (model ``tiny-test`` v1).
The export tests give the home a release key (`appliance keys release-init`, service stopped, as
an admin would) and, for the two-person flow, a user key for ``rex`` (release-manager) in the
root-signed trust store, made as `appliance keys create` makes it, so rex can sign his approval.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from textual.widgets import DataTable, Input, Static, Tree

from tests.conftest import PASSPHRASE, single_operator
from tests.console_fixtures import caller_named, console_base, console_home, open_console, run_console, until  # noqa: F401

PASS = PASSPHRASE.encode()


def text(widget: Any) -> str:
    return str(widget.render())


def keys(table: DataTable[Any]) -> list[str]:
    return [str(r.key.value) for r in table.ordered_rows]


def labels(node: Any) -> Iterator[str]:
    for child in node.children:
        yield str(child.label)
        yield from labels(child)


async def open_registry(app: Any, pilot: Any) -> Any:
    from appliance.console.registry import RegistryPane

    await pilot.press("4")
    pane = app.query_one(RegistryPane)
    await until(pilot, lambda: pane.models and pane.artifacts and pane.detail is not None, "the registry and the model's detail")
    return pane


def test_the_registry_lists_the_model_and_artifacts_and_search_narrows_both(console_home: Path) -> None:
    with open_console(console_home) as session:
        artifacts = session.call("artifact.list")

        async def steps(app: Any, pilot: Any) -> None:
            await open_registry(app, pilot)
            models, arts = app.query_one("#reg-models", DataTable), app.query_one("#reg-artifacts", DataTable)
            assert keys(models) == ["tiny-test:1"]
            row = models.get_row("tiny-test:1")
            assert row[:3] == ["tiny-test", "1", "model"]
            assert len(keys(arts)) == len(artifacts) > 5
            await pilot.press("slash")
            assert app.focused is app.query_one("#reg-search", Input)
            await pilot.press(*"tokenizer")
            await pilot.pause(0.1)
            assert keys(models) == []
            shown = [a for a in artifacts if a["digest"] in keys(arts)]
            assert shown and all("tokenizer" in f"{a['kind']} {a['name']}".lower() for a in shown)
            assert len(shown) < len(artifacts)
            app.query_one("#reg-search", Input).value = "tiny-test"
            await pilot.pause(0.1)
            assert keys(models) == ["tiny-test:1"]
            app.query_one("#reg-search", Input).value = "no-such-thing"
            await pilot.pause(0.1)
            assert keys(models) == [] and keys(arts) == []
            assert app.errors == []

        run_console(session, steps)


def test_the_lineage_tree_holds_the_dataset_and_tokenizer_ancestors(console_home: Path) -> None:
    with open_console(console_home) as session:

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_registry(app, pilot)
            tree = app.query_one("#reg-lineage", Tree)
            await until(pilot, lambda: str(tree.root.label).startswith("tiny-test:1"), "the lineage tree")
            ancestors = next(n for n in tree.root.children if str(n.label).startswith("ancestors"))
            found = {label.split()[0] for label in labels(ancestors)}
            assert {"dataset", "tokenizer", "checkpoint", "token-shards", "raw-documents", "source", "recipe"} <= found
            detail = text(app.query_one("#reg-detail", Static))
            assert "tiny-test:1" in detail and "recorded by" in detail
            await pilot.press("l")
            assert app.focused is tree
            # The palette's commands work from any tab: they show the Registry first.
            names = [name for name, _, _ in app.pane_commands()]
            assert {"Registry: verify selected", "Registry: export selected model", "Data: dropped documents"} <= set(names)
            await pilot.press("1")
            pane.palette_verify()
            assert app.query_one("#tabs").active == "registry"
            await until(pilot, lambda: pane.verified is not None, "the verification")
            assert pane.verified[1] is True

        run_console(session, steps)


def test_verify_shows_ok_for_the_model_and_an_artifact(console_home: Path) -> None:
    with open_console(console_home, user="ada") as session:

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_registry(app, pilot)
            await pilot.press("v")
            await until(pilot, lambda: pane.verified is not None, "the model's verification")
            assert pane.verified[:2] == ("tiny-test:1", True)
            assert "verified OK" in text(app.query_one("#reg-result", Static)) and "model-signing" in text(app.query_one("#reg-result", Static))
            # An artifact, from the other list.
            await pilot.press("s")
            arts = app.query_one("#reg-artifacts", DataTable)
            tokenizer = next(a for a in pane.artifacts if a["kind"] == "tokenizer")
            arts.move_cursor(row=arts.get_row_index(tokenizer["digest"]))
            await until(pilot, lambda: pane.selected is not None and pane.selected[1]["digest"] == tokenizer["digest"], "the tokenizer selected")
            pane.verified = None
            await pilot.press("v")
            await until(pilot, lambda: pane.verified is not None, "the artifact's verification")
            assert pane.verified[1] is True and pane.verified[0].startswith("tokenizer")
            assert app.errors == []

        run_console(session, steps)


def test_verify_names_what_failed_for_a_tampered_model(console_home: Path) -> None:
    with open_console(console_home) as session:
        digest = session.call("registry.show", ref="tiny-test:1")["digest"]
        stored = session.client.svc.store.path_of(digest)
        victim = stored / "config.json"
        victim.chmod(0o644)
        victim.write_bytes(victim.read_bytes() + b" ")

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_registry(app, pilot)
            await pilot.press("v")
            await until(pilot, lambda: pane.verified is not None, "the model's verification")
            assert pane.verified[1] is False
            assert "FAILED" in text(app.query_one("#reg-result", Static))
            assert app.errors  # and the one error handler showed it, with its fix

        run_console(session, steps)


def test_a_tag_added_through_the_modal_appears_in_the_list(console_home: Path) -> None:
    from appliance.console.registry_tag import TagScreen

    with open_console(console_home, user="mel") as session:

        async def steps(app: Any, pilot: Any) -> None:
            await open_registry(app, pilot)
            await pilot.press("t")
            await pilot.pause(0.1)
            assert isinstance(app.screen, TagScreen)
            await pilot.press(*"production", "enter")
            models = app.query_one("#reg-models", DataTable)
            await until(pilot, lambda: "production" in str(models.get_row("tiny-test:1")[3]), "the tag in the list")
            assert "tag production now points at tiny-test:1" in text(app.query_one("#reg-result", Static))
            assert app.errors == []

        run_console(session, steps)
        assert session.call("registry.show", ref="tiny-test@production")["version"] == 1


def test_an_auditor_sees_export_and_tag_disabled_with_the_reason(console_home: Path) -> None:
    from appliance.console.registry_export import ExportScreen

    with open_console(console_home, user="ada") as session:

        async def steps(app: Any, pilot: Any) -> None:
            await open_registry(app, pilot)
            export, tag = app.query_one("#reg-export"), app.query_one("#reg-tag")
            assert export.disabled and "ada (auditor) lacks model.export" in export.reason
            assert tag.disabled and "lacks model.promote" in tag.reason
            assert app.query_one("#reg-verify").disabled is False
            assert "lacks model.export" in text(app.query_one("#reg-gates", Static))  # visible, not only in a tooltip
            await pilot.press("x")
            await pilot.pause(0.1)
            assert not isinstance(app.screen, ExportScreen)
            assert "model.export" in app.errors[-1][0]

        run_console(session, steps)


# -- export -----------------------------------------------------------------------------------


def _release_key(home: Path) -> None:
    """`appliance keys release-init`, with the service stopped, as the home's admin."""
    from appliance.cli import main

    assert main(["--home", str(home), "keys", "release-init", "--root-key", str(home / "keys" / "root.key")]) == 0


def _user_key(home: Path, user: str, where: Path) -> Any:
    """A user key for ``user`` in the root-signed trust store (service stopped), as `appliance keys create` makes one."""
    from keys.keystore import create_key, load_key
    from keys.truststore import entry_for, read_store, write_store

    root = load_key(home / "keys" / "root.key", PASS)
    store = read_store(home / "keys" / "truststore.json", root.public_key)
    key = create_key(where / f"{user}.key", PASS)
    write_store(home / "keys" / "truststore.json", store.with_entry(entry_for(key, "user", user)), root)
    return key


def _approve(svc: Any, rid: str, user: str, key: Any) -> dict[str, Any]:
    """``user`` approves request ``rid`` with a statement signed by their user key (what `appliance approve` sends)."""
    from appliance.service.api import dispatch
    from keys.approval import sign_statement, statement

    approver = caller_named(user)
    req = dispatch(svc, approver, "approvals.show", {"id": rid})
    body = statement(req, decision="approve", approver=user, key_id=key.key_id, signed_at=dt.datetime.now(dt.UTC).isoformat())
    return dispatch(svc, approver, "approvals.decide", {"id": rid, "statement": body, "signature": sign_statement(body, key)})


def _check_bundle(path: Path, home: Path) -> dict[str, Any]:
    from keys.keystore import load_public_key
    from registry.bundle import verify_bundle

    return verify_bundle(path, load_public_key(home / "keys" / "root.pub.pem"))


def test_export_after_a_second_person_approves(console_home: Path, tmp_path: Path) -> None:
    from appliance.console.registry_export import ExportScreen

    _release_key(console_home)
    rex_key = _user_key(console_home, "rex", tmp_path)
    dest = tmp_path / "out" / "bundle"
    dest.parent.mkdir()
    with open_console(console_home) as session:
        svc = session.client.svc
        assert session.grants.needs_approval("model.export")

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_registry(app, pilot)
            await pilot.press("x")
            await pilot.pause(0.2)
            screen = app.screen
            assert isinstance(screen, ExportScreen)
            # Under the two-person rule, asking comes first: the reason has the focus.
            reason = screen.query_one("#export-reason", Input)
            assert app.focused is reason
            screen.query_one("#export-dest", Input).value = str(dest)
            # No approval yet: refused before any call, with the way forward.
            await pilot.click("#export-go")
            await pilot.pause(0.1)
            assert "two-person" in app.errors[-1][0] and not dest.exists()
            reason.focus()
            reason.value = "ship to site B"
            await pilot.press("enter")  # enter in the reason asks
            await until(pilot, lambda: screen.pending, "the request")
            (req,) = screen.pending
            assert req["subject"] == "tiny-test:1" and req["reason"] == "ship to site B"
            assert "waiting for release-manager or admin" in text(screen.query_one("#export-requests", Static))
            # A second person approves, elsewhere (here: rex, through the service, signed with his key).
            assert _approve(svc, req["id"], "rex", rex_key)["status"] == "approved"
            await pilot.click("#export-reload")
            await until(pilot, lambda: req["id"] in screen.approved, "the approval")
            await pilot.click("#export-go")
            await until(pilot, lambda: screen.report is not None, "the export", timeout=120)
            report = screen.report
            assert report is not None and report["verified"] and report["model"]["name"] == "tiny-test" and report["model"]["version"] == 1
            assert "the bundle verifies" in text(screen.query_one("#export-status", Static))
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert "the bundle verifies" in text(pane.query_one("#reg-result", Static))

        run_console(session, steps)
        assert _check_bundle(dest, console_home)["model"]["version"] == 1
        assert [p.name for p in dest.parent.iterdir()] == ["bundle"]  # no partial tar or staging folder left
        used = session.call("approvals.list")
        assert [r["status"] for r in used if r["action"] == "model.export"] == ["executed"]


def test_export_under_a_single_operator_policy_needs_no_approval(console_home: Path, tmp_path: Path) -> None:
    from appliance.console.registry_export import ExportScreen

    single_operator(console_home)
    _release_key(console_home)
    dest = tmp_path / "bundle"
    with open_console(console_home) as session:
        assert not session.grants.needs_approval("model.export")

        async def steps(app: Any, pilot: Any) -> None:
            await open_registry(app, pilot)
            await pilot.press("x")
            await pilot.pause(0.2)
            screen = app.screen
            assert isinstance(screen, ExportScreen) and not screen.query("#export-approval")
            screen.query_one("#export-dest", Input).value = str(dest)
            await pilot.click("#export-go")
            await until(pilot, lambda: screen.report is not None or len(app.errors) > 0, "the export", timeout=120)
            assert app.errors == [] and screen.report is not None and screen.report["verified"]
            # The same folder again is refused: an export never overwrites.
            await pilot.click("#export-go")
            await until(pilot, lambda: len(app.errors) > 0, "the refusal")
            assert "already exists" in app.errors[-1][0]

        run_console(session, steps)
        assert _check_bundle(dest, console_home)["model"]["name"] == "tiny-test"


def test_a_user_without_a_role_sees_why_the_registry_is_closed(console_home: Path) -> None:
    with open_console(console_home, user="zed") as session:
        assert not session.grants.allows("artifact.read")

        async def steps(app: Any, pilot: Any) -> None:
            await pilot.press("4")
            await pilot.pause(0.2)
            assert "zed (no role) lacks artifact.read" in text(app.query_one("#reg-denied", Static))
            assert not app.query("#reg-models")
            await pilot.press("x")
            # Other tabs may report their own refusals; this one calls nothing it may not.
            assert not [what for what, _ in app.errors if "artifact" in what or "registry" in what or "model" in what]

        run_console(session, steps)
