"""The console's Ledger pane on a real service: SQL in the sandbox, the canned audit questions, the chain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.widgets import DataTable, Input, Static, TextArea

from registry import audit_queries as q
from tests.console_fixtures import console_base, console_home, open_console, run_console, settle  # noqa: F401


async def _open(app: Any, pilot: Any) -> Any:
    from appliance.console.ledger import LedgerPane

    await pilot.press("5")
    await settle(pilot, app)
    return app.query_one(LedgerPane)


def _text(app: Any, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


def test_a_query_runs_in_the_sandbox_and_fills_the_table(console_home: Path) -> None:
    with open_console(console_home, user="ada") as session:

        async def steps(app: Any, pilot: Any) -> None:
            await _open(app, pilot)
            assert app.query_one("#tabs").active == "ledger"
            # The sandbox's limits are shown before anything runs.
            limits = _text(app, "#ledger-limits")
            assert "read-only SELECT" in limits and "rows" in limits and " s " in limits
            await pilot.press("e")
            editor = app.query_one("#ledger-sql", TextArea)
            assert app.focused is editor
            editor.text = "SELECT kind, count(*) AS n FROM events GROUP BY kind ORDER BY kind"
            await pilot.press("ctrl+r")
            await settle(pilot, app)
            table = app.query_one("#ledger-results", DataTable)
            assert [str(c.label) for c in table.columns.values()] == ["kind", "n"]
            kinds = {str(table.get_row_at(i)[0]) for i in range(table.row_count)}
            assert "run.started" in kinds or "artifact.recorded" in kinds
            status = _text(app, "#ledger-status")
            assert f"{table.row_count} rows in" in status and " s" in status
            assert app.errors == []

        run_console(session, steps)


def test_a_bad_query_shows_the_error_and_its_fix(console_home: Path) -> None:
    with open_console(console_home, user="ada") as session:

        async def steps(app: Any, pilot: Any) -> None:
            await _open(app, pilot)
            app.query_one("#ledger-sql", TextArea).text = "DELETE FROM events"
            await pilot.press("ctrl+r")
            await settle(pilot, app)
            what, fix = app.errors[-1]
            assert "only SELECT is allowed" in what
            assert "exactly one SELECT statement" in fix
            assert "failed" in _text(app, "#ledger-status")
            # Still all there: the sandbox refused before anything ran.
            assert session.call("ledger.query", sql="SELECT count(*) FROM events")["rows"][0][0] > 0

        run_console(session, steps)


def test_a_canned_question_fills_the_editor_and_runs(console_home: Path) -> None:
    with open_console(console_home, user="ada") as session:

        async def steps(app: Any, pilot: Any) -> None:
            await _open(app, pilot)
            await pilot.press("w")  # audit who
            await settle(pilot, app)
            assert app.query_one("#ledger-sql", TextArea).text == q.who()
            table = app.query_one("#ledger-results", DataTable)
            assert table.row_count > 0 and "identity" in [str(c.label) for c in table.columns.values()]
            # lineage MODEL: the newest model by default, its argument shown in the box.
            await pilot.press("l")
            await settle(pilot, app)
            model = app.query_one("#ledger-arg", Input).value
            assert app.query_one("#ledger-sql", TextArea).text == q.lineage(model)
            depth0 = [table.get_row_at(i) for i in range(table.row_count) if str(table.get_row_at(i)[0]) == "0"]
            assert [str(r[1]) for r in depth0] == ["model"]
            assert app.errors == []
            # derived SOURCE has no default: it says what to type, and where.
            await pilot.press("escape")
            app.query_one("#ledger-arg", Input).value = ""
            app.query_one("#ledger-results", DataTable).focus()
            await pilot.press("s")
            await pilot.pause(0.1)
            what, fix = app.errors[-1]
            assert "needs a SOURCE" in what and "argument box" in fix
            # With a source typed in the box, enter on the list runs it.
            app.query_one("#ledger-arg", Input).value = "docstrings.jsonl"
            await pilot.press("enter")
            await settle(pilot, app)
            assert app.query_one("#ledger-sql", TextArea).text == q.derived("docstrings.jsonl")
            assert table.row_count >= 1

        run_console(session, steps)


def test_canned_questions_are_in_the_palette_and_reach_the_tab(console_home: Path) -> None:
    with open_console(console_home, user="ada") as session:

        async def steps(app: Any, pilot: Any) -> None:
            await settle(pilot, app)
            commands = {name: callback for name, _, callback in app.pane_commands()}
            for name in ("Audit: who USER", "Audit: lineage MODEL", "Audit: purged", "Ledger: verify the chain"):
                assert name in commands
            assert app.query_one("#tabs").active == "dashboard"
            commands["Audit: approvals"]()
            await settle(pilot, app)
            assert app.query_one("#tabs").active == "ledger"
            assert app.query_one("#ledger-sql", TextArea).text == q.approvals()

        run_console(session, steps)


def test_ml_engineer_sees_the_editor_disabled_with_the_reason(console_home: Path) -> None:
    with open_console(console_home, user="mel") as session:

        async def steps(app: Any, pilot: Any) -> None:
            await _open(app, pilot)
            assert app.query_one("#ledger-sql", TextArea).disabled
            status = _text(app, "#ledger-status")
            assert "mel (ml-engineer) lacks ledger.query" in status and "auditor" in status
            await pilot.press("ctrl+r")
            await pilot.press("w")
            await settle(pilot, app)
            assert app.query_one("#ledger-results", DataTable).row_count == 0
            # ledger.verify is the ml-engineer's too.
            assert "chain OK" in _text(app, "#ledger-chain")

        run_console(session, steps)


def test_verification_shows_the_chain_and_the_signed_head(console_home: Path) -> None:
    with open_console(console_home) as session:

        async def steps(app: Any, pilot: Any) -> None:
            pane = await _open(app, pilot)
            chain = _text(app, "#ledger-chain")
            assert "chain OK" in chain and "events checked" in chain and "signed head matches" in chain
            assert f"root   {session.call('keys.list')['root_key_id'][:16]}" in chain
            head = _text(app, "#ledger-head")
            assert pane.head is not None and f"seq {pane.head['seq']}" in head
            assert "(this node)" in head and pane.head["key_id"] == session.info["node_key"]
            first = pane.head["seq"]
            await pilot.press("v")
            await settle(pilot, app)
            # Verifying again is itself recorded: the new head is further along.
            assert pane.head["seq"] > first and f"seq {pane.head['seq']}" in _text(app, "#ledger-head")
            assert app.errors == []
            # The pane holds the focus (its keys work), and a tab key still leaves it.
            assert app.focused is not None and pane in app.focused.ancestors
            await pilot.press("1")
            await pilot.pause(0.2)
            assert app.query_one("#tabs").active == "dashboard"

        run_console(session, steps)
