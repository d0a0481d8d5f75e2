"""The console's Data tab: a run's dataset card, and each filter rule's dropped documents one key away.

Against the real in-process service on a copy of the finished tiny run; what the pane shows is
compared with what the service itself answers (``data.card``, ``data.dropped``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Select, Static

from tests.console_fixtures import console_base, console_home, open_console, run_console, until  # noqa: F401


def text(widget: Any) -> str:
    return str(widget.render())


async def open_card(app: Any, pilot: Any) -> Any:
    from appliance.console.data import DataPane

    await pilot.press("3")
    pane = app.query_one(DataPane)
    await until(pilot, lambda: pane.card is not None, "the dataset card")
    return pane


def test_the_card_of_the_finished_run_shows_its_sources_and_drops_per_filter(console_home: Path) -> None:
    with open_console(console_home) as session:
        latest = max(session.call("run.list"), key=lambda r: r["started_ts"])["run_id"]
        expected = session.call("data.card", run=latest)["card"]

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_card(app, pilot)
            assert app.query_one("#data-run", Select).value == latest  # the latest run, by default
            sources = app.query_one("#data-sources", DataTable)
            assert [str(r.key.value) for r in sources.ordered_rows] == list(expected["curation"]["by_source"])
            for name, row in expected["curation"]["by_source"].items():
                cells = sources.get_row(name)
                assert cells[1] == f"{row['documents_in']:,}" and cells[2] == f"{row['documents_out']:,}"
            drops = app.query_one("#data-drops", DataTable)
            by_rule = expected["curation"]["dropped_by_rule"]
            assert by_rule, "the tiny run drops documents: the table must have rows to show"
            assert drops.row_count == len(by_rule)
            for name, count in by_rule.items():
                flt, _, rule = name.partition(".")
                assert drops.get_row(name) == [flt, rule, f"{count:,}"]
            summary = text(app.query_one("#data-summary", Static))
            assert f"{expected['tokens']['total']:,}" in summary and f"{expected['curation']['documents_out']:,} of" in summary
            assert "Personal data" in text(app.query_one("#data-pii", Static))
            assert "Duplicates" in text(app.query_one("#data-dedup", Static))
            assert f"{expected['tokens']['train']:,} train" in text(app.query_one("#data-tokens", Static))
            # The whole card as the run wrote it, one key away.
            await pilot.press("m")
            await pilot.pause(0.2)
            assert "# Dataset card" in app.screen.markdown
            await pilot.press("escape")
            assert pane.run_id == latest and app.errors == []
            # p opens the list of runs.
            await pilot.press("p")
            await pilot.pause(0.1)
            assert app.query_one("#data-run", Select).expanded
            await pilot.press("escape")
            # A run with no card says so on the pane (and through the one error handler), leaving no stale card.
            pane._load_card("run-with-no-card")
            await until(pilot, lambda: app.errors, "the refusal")
            assert "no card to show" in text(app.query_one("#data-summary", Static))
            assert pane.card is None and app.query_one("#data-drops", DataTable).row_count == 0

        run_console(session, steps)


def test_the_documents_a_filter_dropped_open_with_one_key(console_home: Path) -> None:
    from appliance.console.data_dropped import SAMPLES, DroppedScreen

    with open_console(console_home) as session:
        by_rule = session.call("data.card", run="latest")["card"]["curation"]["dropped_by_rule"]
        wanted = [name for name in by_rule if session.call("data.dropped", run="latest", filter=name.split(".")[0], rule=name.split(".")[1])["samples"]]
        assert len(wanted) >= 2, "the tiny run keeps samples of what it dropped"

        async def steps(app: Any, pilot: Any) -> None:
            await open_card(app, pilot)
            drops = app.query_one("#data-drops", DataTable)
            assert app.focused is drops  # the tab's key gives the pane the focus: its keys work at once
            for key, name in (("d", wanted[0]), ("enter", wanted[1])):
                drops.move_cursor(row=drops.get_row_index(name))
                await pilot.press(key)
                await pilot.pause(0.1)
                screen = app.screen
                assert isinstance(screen, DroppedScreen), f"{key} opened no dropped documents"
                await until(pilot, lambda: screen.samples is not None, f"the documents {name} dropped")
                flt, _, rule = name.partition(".")
                assert screen.samples and len(screen.samples) == min(SAMPLES, by_rule[name])
                assert {(s["filter"], s["rule"]) for s in screen.samples} == {(flt, rule)}
                shown = "\n".join(text(w) for w in screen.query(".dropped-doc"))
                for sample in screen.samples:
                    assert f"doc {sample['doc_id']}" in shown
                await pilot.press("escape")
                await pilot.pause(0.1)
                assert not isinstance(app.screen, DroppedScreen)
            assert app.errors == []

        run_console(session, steps)


@pytest.mark.parametrize("user", ["mel", "ada"])
def test_an_ml_engineer_and_an_auditor_read_the_card(console_home: Path, user: str) -> None:
    with open_console(console_home, user=user) as session:
        assert session.grants.allows("data.read")

        async def steps(app: Any, pilot: Any) -> None:
            await open_card(app, pilot)
            assert app.query_one("#data-drops", DataTable).row_count > 0
            assert app.query_one("#data-sources", DataTable).row_count > 0
            assert app.errors == []

        run_console(session, steps)


def test_a_role_without_data_read_sees_why(console_home: Path) -> None:
    with open_console(console_home, user="rex") as session:
        assert not session.grants.allows("data.read")

        async def steps(app: Any, pilot: Any) -> None:
            await pilot.press("3")
            await pilot.pause(0.2)
            denied = text(app.query_one("#data-denied", Static))
            assert "rex (release-manager) lacks data.read" in denied
            assert not app.query("#data-drops")
            await pilot.press("d")  # the key is bound to nothing here: no error, no call
            assert app.errors == []

        run_console(session, steps)
