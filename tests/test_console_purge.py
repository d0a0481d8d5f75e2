"""The console's Purge tab on a real service: the lineage impact of purging the finished run's
dataset, the confirm dialog (wrong text refused, two-person request), a single operator's purge
with its certificate, the data.purge gate, and the list of past purges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.widgets import Button, DataTable, Input, Label, Static

from tests.conftest import single_operator
from tests.console_fixtures import console_base, console_home, open_console, run_console, settle  # noqa: F401

PURGE_S = 120.0  # erase, then a marker scan of every file of the home


def dataset_of(session: Any) -> dict[str, Any]:
    (row,) = [a for a in session.call("artifact.list") if a["kind"] == "dataset"]
    return dict(row)


async def open_purge(app: Any, pilot: Any) -> Any:
    await pilot.press("7")
    await settle(pilot, app)
    return app.query_one("PurgePane")


async def show_impact(app: Any, pilot: Any, target: str) -> None:
    """Pick ``target`` in the targets table and press enter, as an operator does."""
    table = app.query_one("#purge-targets", DataTable)
    table.focus()
    table.move_cursor(row=table.get_row_index(target))
    await pilot.pause()
    await pilot.press("enter")
    await settle(pilot, app)


def impact_rows(app: Any) -> dict[str, list[str]]:
    """kind/name -> the row's cells, as shown."""
    table = app.query_one("#purge-impact-table", DataTable)
    out = {}
    for i in range(table.row_count):
        cells = [str(c) for c in table.get_row_at(i)]
        out[f"{cells[1]}/{cells[2]}"] = cells
    return out


def text_of(app: Any, selector: str) -> str:
    return str(app.screen.query_one(selector).render())


def test_the_impact_of_the_dataset_lists_what_is_erased_and_kept(console_home: Path) -> None:
    with open_console(console_home) as session:
        dataset = dataset_of(session)

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_purge(app, pilot)
            await show_impact(app, pilot, dataset["digest"])
            assert pane.impact is not None and pane.impact["target"] == dataset["digest"]
            rows = impact_rows(app)
            # The data itself goes (the dataset and the shards made from it); what derives from it stays, marked.
            assert "ERASE" in rows["dataset/dataset"][0] and "ERASE" in rows["token-shards/shards"][0]
            assert "crypto-erase" in rows["dataset/dataset"][5]
            assert "keep, marked" in rows["model/model"][0] and "a model cannot be un-trained" in rows["model/model"][5]
            assert "keep, marked" in rows["tokenizer/tokenizer"][0] and "raw-documents/raw" not in rows  # raw came before
            summary = str(app.query_one("#purge-summary", Static).render())
            assert "erase 2 artifact(s)" in summary and "keep 9 marked" in summary
            assert "a model cannot be un-trained" in summary and "runs touched" in summary
            assert "two-person rule" in summary  # the default policy
            # a on the kept model: erase it too (--also); a again: keep it.
            table = app.query_one("#purge-impact-table", DataTable)
            table.focus()
            table.move_cursor(row=table.get_row_index(next(a["digest"] for a in pane.impact["keep"] if a["kind"] == "model")))
            await pilot.press("a")
            await settle(pilot, app)
            assert "ERASE (also)" in impact_rows(app)["model/model"][0] and len(pane.also) == 1
            assert "erase 3 artifact(s)" in str(app.query_one("#purge-summary", Static).render())
            await pilot.press("a")
            await settle(pilot, app)
            assert "keep, marked" in impact_rows(app)["model/model"][0] and pane.also == []
            assert session.call("purge.list") == []  # reading an impact changes nothing
            assert app.errors == []

        run_console(session, steps)


def test_the_confirm_dialog_refuses_a_wrong_text_and_requests_approval(console_home: Path) -> None:
    from appliance.console.purge_confirm import ConfirmPurgeScreen

    with open_console(console_home) as session:
        dataset = dataset_of(session)

        async def steps(app: Any, pilot: Any) -> None:
            await open_purge(app, pilot)
            await show_impact(app, pilot, dataset["digest"])
            assert not app.query_one("#purge-go", Button).disabled
            await pilot.press("p")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmPurgeScreen)
            body = text_of(app, "#purge-dialog-impact")
            assert "this cannot be undone" in body and "Erased irreversibly" in body and "dataset" in body
            assert f"type {dataset['digest'][:12]} to confirm" in text_of(app, "#purge-confirm-label")
            app.screen.query_one("#purge-confirm", Input).value = "dataset"
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmPurgeScreen)  # still asking
            assert f"'dataset' is not '{dataset['digest'][:12]}'" in text_of(app, "#purge-dialog-problem")
            # The right text, but the policy wants a second person: no approved request id, no purge.
            app.screen.query_one("#purge-confirm", Input).value = dataset["digest"][:12]
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmPurgeScreen) and "approved request id" in text_of(app, "#purge-dialog-problem")
            app.screen.query_one("#purge-reason", Input).value = "consent withdrawn"
            await pilot.click("#purge-request")
            await settle(pilot, app)
            assert not isinstance(app.screen, ConfirmPurgeScreen)
            (req,) = [r for r in session.call("approvals.list") if r["action"] == "data.purge"]
            assert req["subject"] == dataset["digest"] and req["status"] == "pending" and req["reason"] == "consent withdrawn"
            assert req["id"] in str(app.query_one("#purge-gate", Label).render())
            assert session.call("purge.list") == []
            assert app.errors == []

        run_console(session, steps)


def test_a_single_operator_purges_and_reads_the_certificate(console_home: Path) -> None:
    from appliance.console.purge_certificate import CertificateScreen

    single_operator(console_home)
    with open_console(console_home) as session:
        dataset = dataset_of(session)

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_purge(app, pilot)
            await show_impact(app, pilot, dataset["digest"])
            assert "two-person" not in str(app.query_one("#purge-summary", Static).render())
            await pilot.press("p")
            await pilot.pause()
            assert not app.screen.query("#purge-approval")  # nothing to approve under this policy
            # While it works: the bar shows and the button waits (seen as it happens: a tiny purge is quick).
            seen: list[tuple[bool, bool, bool]] = []
            bar, go = app.query_one("#purge-running"), app.query_one("#purge-go", Button)
            pane.watch(pane, "running", lambda running: seen.append((running, bar.has_class("busy"), go.disabled)), init=False)
            app.screen.query_one("#purge-confirm", Input).value = dataset["digest"][:12]
            await pilot.press("enter")
            await pilot.pause()
            await settle(pilot, app, timeout=PURGE_S)
            assert seen == [(True, True, True), (False, False, True)]  # disabled after: its target is gone
            assert isinstance(app.screen, CertificateScreen)
            cert = text_of(app, "#purge-certificate-text")
            assert "Certificate of sanitization pg-" in cert and "verification   passed" in cert
            assert f"requested by   {session.grants.user}" in cert and "nobody (no two-person rule)" in cert
            assert "2 artifact(s)" in cert and "cryptographic erase" in cert and f"node key {session.info['node_key']}" in cert
            await pilot.press("escape")
            await pilot.pause()
            assert not pane.running and not app.query_one("#purge-running").has_class("busy")
            # The list shows it, its certificate one key away; the dataset reads "purged" in the targets.
            (done,) = session.call("purge.list")
            history = app.query_one("#purge-history", DataTable)
            assert history.row_count == 1 and str(history.get_row_at(0)[0]) == done["purge_id"]
            assert "completed, passed" in str(history.get_row_at(0)[1])
            targets = app.query_one("#purge-targets", DataTable)
            assert "(purged)" in str(targets.get_row(dataset["digest"])[0])
            history.focus()
            await pilot.press("c")
            await settle(pilot, app)
            assert isinstance(app.screen, CertificateScreen) and done["purge_id"] in text_of(app, "#purge-certificate-text")
            await pilot.press("escape")
            assert app.errors == []

        run_console(session, steps)

    with open_console(console_home) as session:
        (done,) = session.call("purge.list")
        assert done["requester"] == session.grants.user and done["status"] == "completed"
        assert session.call("purge.show", id=done["purge_id"])["certificate"]["verification"]["result"] == "passed"


def test_a_role_without_data_purge_sees_purge_disabled_with_the_reason(console_home: Path) -> None:
    from appliance.console.purge_confirm import ConfirmPurgeScreen

    with open_console(console_home, user="mel") as session:
        dataset = dataset_of(session)

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_purge(app, pilot)
            assert all(callable(getattr(pane, method)) for _, _, method in pane.PALETTE)
            go = app.query_one("#purge-go", Button)
            gate = str(app.query_one("#purge-gate", Label).render())
            assert go.disabled and "mel (ml-engineer) lacks data.purge" in gate and "data-steward" in gate
            await show_impact(app, pilot, dataset["digest"])  # reading the impact is artifact.read: allowed
            assert app.query_one("#purge-impact-table", DataTable).row_count == 11
            assert go.disabled and "lacks data.purge" in str(go.tooltip)
            await pilot.press("p")
            await pilot.pause()
            assert not isinstance(app.screen, ConfirmPurgeScreen) and "data.purge" in app.errors[-1][0]
            assert session.call("purge.list") == []

        run_console(session, steps)


def test_run_targets_confirm_with_the_word_and_data_kinds_match_the_service() -> None:
    from appliance.console.purge_text import DATA_KINDS, confirm_text
    from appliance.service.datakeys import SEALED_KINDS

    assert DATA_KINDS == SEALED_KINDS
    digest = "ab" * 32
    assert confirm_text({"target": "run:run-1", "purge": [{"digest": digest}]}) == "purge"
    assert confirm_text({"target": "source:topics/a.txt", "purge": [{"digest": digest}]}) == "purge"
    assert confirm_text({"target": digest[:10], "purge": [{"digest": "cd" * 32}, {"digest": digest}]}) == digest[:12]
