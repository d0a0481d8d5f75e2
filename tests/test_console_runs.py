"""The console's Runs tab on a real service: the list, one run's detail, the filter, starting (with
every recipe problem shown at once), cancelling and resuming, and what an auditor may not do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from textual.widgets import Button, DataTable, Input, Log, Static

from tests.console_fixtures import console_base, console_home, open_console, run_console, settle, until  # noqa: F401

ASSETS = Path(__file__).parent / "assets"


async def open_runs(app: Any, pilot: Any) -> Any:
    await pilot.press("2")
    await settle(pilot, app)
    return app.query_one("RunsPane")


def table_ids(app: Any) -> list[str]:
    table = app.query_one("#runs-table", DataTable)
    return [str(table.get_row_at(i)[0]) for i in range(table.row_count)]


async def open_start_dialog(app: Any, pilot: Any) -> tuple[Any, Any]:
    """(the Runs pane, the start dialog), opened with its key as an operator would."""
    pane = await open_runs(app, pilot)
    await pilot.press("s")
    await until(pilot, lambda: type(app.screen).__name__ == "StartRunScreen", "the start dialog")
    return pane, app.screen


def test_the_list_shows_the_finished_run_and_its_detail(console_home: Path) -> None:
    with open_console(console_home) as session:
        (run,) = session.call("run.list")

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_runs(app, pilot)
            # The list has the focus (its keys work at once; the filter would take them as text).
            assert app.focused is app.query_one("#runs-table", DataTable)
            assert table_ids(app) == [run["run_id"]]
            assert "succeeded" in str(app.query_one("#runs-table", DataTable).get_row_at(0)[2])
            await until(pilot, lambda: pane.detail and pane.metrics and pane.times, "the run's detail, metrics and stage times")
            stages = app.query_one("#runs-stages", DataTable)
            rows = [stages.get_row_at(i) for i in range(stages.row_count)]
            assert [str(r[0]) for r in rows][:2] == ["ingest", "curate"] and "train" in [str(r[0]) for r in rows]
            assert all(str(r[1]) == "finished" for r in rows)
            assert all(str(r[3]).endswith("s") for r in rows)  # a time per stage, from the ledger's stages view
            assert pane.plotted.get("loss", 0) > 1 and pane.plotted.get("val_loss", 0) > 0
            summary = str(app.query_one("#runs-summary", Static).render())
            assert run["run_id"] in summary and "took" in summary
            assert pane.log_stage == "train"
            assert "train" in str(app.query_one("#runs-log-title").render())
            assert app.query_one("#runs-log", Log).line_count > 0
            # The other charts: the m key steps through them.
            await pilot.press("m")
            await pilot.pause(0.2)
            assert set(pane.plotted) == {"lr"}
            assert app.errors == []

        run_console(session, steps)


def test_the_filter_narrows_the_list_as_you_type(console_home: Path) -> None:
    with open_console(console_home) as session:
        (run,) = session.call("run.list")

        async def steps(app: Any, pilot: Any) -> None:
            await open_runs(app, pilot)
            await pilot.press("slash")
            assert app.focused is app.query_one("#runs-filter", Input)
            for text, expected in (("zzz", []), ("", [run["run_id"]]), ("tiny succ", [run["run_id"]]), ("failed", []), (run["run_id"][-6:], [run["run_id"]])):
                app.query_one("#runs-filter", Input).value = text
                await pilot.pause(0.1)
                assert table_ids(app) == expected, text
            assert "Runs (1)" in str(app.query_one("#runs-count").render())
            # From another tab, the palette's entry shows the tab and puts the cursor in the filter.
            await pilot.press("escape", "1")
            await pilot.pause(0.2)
            assert app.query_one("#tabs").active == "dashboard"
            commands = {name: callback for name, _, callback in app.pane_commands()}
            assert {"Runs: start a run", "Runs: cancel the selected run", "Runs: resume the selected run"} <= set(commands)
            commands["Runs: filter"]()
            await pilot.pause(0.3)
            assert app.query_one("#tabs").active == "runs" and app.focused is app.query_one("#runs-filter", Input)

        run_console(session, steps)


def broken_recipe(folder: Path) -> Path:
    """The tiny recipe with two problems: a misspelt key and a value out of range."""
    text = (ASSETS / "tiny.toml").read_text().replace("steps = 12\n", "steps = -3\nstepz = 5\n", 1)
    path = folder / "broken.toml"
    path.write_text(text)
    return path


def test_a_broken_recipe_shows_every_problem_and_starts_nothing(console_home: Path, tmp_path: Path) -> None:
    recipe = broken_recipe(tmp_path)
    with open_console(console_home) as session:
        before = session.call("run.list")

        async def steps(app: Any, pilot: Any) -> None:
            _, screen = await open_start_dialog(app, pilot)
            screen.query_one("#start-recipe", Input).value = str(recipe)
            await pilot.click("#start-go")
            await until(pilot, lambda: screen.last is not None, "the recipe check")
            await settle(pilot, app)
            assert app.screen is screen  # still open: nothing was started
            shown = str(screen.query_one("#start-problems", Static).render())
            assert "2 problems" in shown and "stepz" in shown and "train.steps must be positive" in shown
            assert len(screen.last.problems) == 2
            await pilot.press("escape")

        run_console(session, steps)
        assert session.call("run.list") == before


def test_a_missing_corpus_is_a_problem_too(console_home: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.toml"
    shutil.copyfile(ASSETS / "tiny.toml", recipe)  # its corpus folder is not beside it
    with open_console(console_home) as session:

        async def steps(app: Any, pilot: Any) -> None:
            await open_runs(app, pilot)
            await pilot.click("#runs-start")
            await pilot.pause(0.2)
            screen = app.screen
            screen.query_one("#start-recipe", Input).value = str(recipe)
            await pilot.click("#start-check")
            await until(pilot, lambda: screen.last is not None, "the recipe check")
            assert any("corpus folder" in p for p in screen.last.problems)
            await pilot.press("escape")

        run_console(session, steps)


def test_a_valid_recipe_starts_a_run_that_can_be_cancelled_and_resumed(console_home: Path, tiny_recipe: Path, monkeypatch: Any) -> None:
    # A relative path: the console resolves it before the service, in another folder, reads it.
    monkeypatch.chdir(tiny_recipe.parent)
    with open_console(console_home) as session:
        before = {r["run_id"] for r in session.call("run.list")}

        async def steps(app: Any, pilot: Any) -> None:
            pane, screen = await open_start_dialog(app, pilot)
            screen.query_one("#start-recipe", Input).value = tiny_recipe.name
            await pilot.press("enter")
            await until(pilot, lambda: pane.selected not in before and pane.selected is not None, "the new run selected")
            new = pane.selected
            await until(pilot, lambda: new in table_ids(app), "the new run in the list")
            assert pane._row(new)["status"] in ("queued", "running")
            # The UI answers keys while the run streams: switch tabs away and back.
            await pilot.press("1")
            await pilot.pause(0.1)
            assert app.query_one("#tabs").active == "dashboard"
            await pilot.press("2")
            await pilot.pause(0.1)
            assert app.query_one("#tabs").active == "runs"
            cancel = app.query_one("#runs-cancel", Button)
            assert not cancel.disabled
            await pilot.press("c")
            await pilot.pause(0.2)
            assert type(app.screen).__name__ == "ConfirmCancelScreen"
            await pilot.press("y")
            await until(pilot, lambda: (pane._row(new) or {}).get("status") == "stopped", "the run stopped")
            await until(pilot, lambda: not app.query_one("#runs-resume", Button).disabled, "Resume enabled")
            assert app.query_one("#runs-cancel", Button).disabled
            assert "run is stopped" in str(app.query_one("#runs-why", Static).render())
            # Resume it, then stop it again to keep the test short.
            await pilot.press("u")
            await until(pilot, lambda: (pane._row(new) or {}).get("status") in ("running", "queued"), "the run resumed")
            await until(pilot, lambda: not app.query_one("#runs-cancel", Button).disabled, "Cancel enabled")
            await pilot.press("c")
            await pilot.pause(0.2)
            await pilot.click("#cancel-yes")
            await until(pilot, lambda: (pane._row(new) or {}).get("status") == "stopped", "the run stopped")
            # The selection stays where the operator put it when the list is read again.
            await pilot.press("down")
            await until(pilot, lambda: pane.selected != new and bool(pane.detail), "another run selected")
            older = pane.selected
            await pilot.press("r")
            await settle(pilot, app)
            assert pane.selected == older and table_ids(app) == [new, older]
            assert app.query_one("#runs-table", DataTable).cursor_row == 1
            assert app.errors == []

        run_console(session, steps)
        after = {r["run_id"]: r for r in session.call("run.list")}
        (new,) = set(after) - before
        assert after[new]["status"] == "stopped" and after[new]["actor"] == "root"


def test_an_auditor_sees_start_cancel_and_resume_disabled_with_the_reason(console_home: Path) -> None:
    with open_console(console_home, user="ada") as session:

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_runs(app, pilot)
            for action in ("start", "cancel", "resume"):
                button = app.query_one(f"#runs-{action}", Button)
                assert button.disabled
                assert f"lacks run.{action}" in str(button.tooltip)
            why = str(app.query_one("#runs-why", Static).render())
            assert "ada (auditor) lacks run.start" in why and "lacks run.cancel" in why and "lacks run.resume" in why
            # The key too is refused with the reason, and no dialog opens.
            await pilot.press("s")
            await pilot.pause(0.2)
            assert app.screen.__class__.__name__ != "StartRunScreen"
            assert "lacks run.start" in app.errors[-1][0]
            assert table_ids(app) and pane.detail  # reading is allowed

        run_console(session, steps)


def test_an_ml_engineer_sees_stage_times_without_ledger_query(console_home: Path) -> None:
    with open_console(console_home, user="mel") as session:
        assert not session.grants.allows("ledger.query")

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_runs(app, pilot)
            await until(pilot, lambda: bool(pane.detail), "the run's detail")
            stages = app.query_one("#runs-stages", DataTable)
            # run.show carries each stage's time (run.read is enough).
            assert stages.row_count >= 8 and set(pane.times) >= {"ingest", "curate", "train"}
            assert all(seconds is not None for _, seconds in pane.times.values())
            assert not app.query_one("#runs-start", Button).disabled  # an ml-engineer may start runs
            assert app.errors == []

        run_console(session, steps)


def test_the_demo_recipe_is_one_button_away(console_home: Path, tmp_path: Path, monkeypatch: Any) -> None:
    # What `appliance demo` does, from the start dialog: the stdlib-docs corpus built where the
    # caller writes, the packaged recipe, and the corpus's provenance recorded with the run.
    from appliance.recipe import packaged_recipe

    monkeypatch.chdir(tmp_path)
    with open_console(console_home) as session:
        before = {r["run_id"] for r in session.call("run.list")}

        async def steps(app: Any, pilot: Any) -> None:
            pane, screen = await open_start_dialog(app, pilot)
            await pilot.click("#start-demo")
            await until(pilot, lambda: screen.demo is not None, "the demo corpus", timeout=180)
            assert screen.query_one("#start-recipe", Input).value == str(packaged_recipe("demo"))
            source = Path(screen.query_one("#start-source", Input).value)
            assert source.parent == tmp_path / ".appliance-demo" and (source / "docstrings.jsonl").is_file()
            assert app.focused is screen.query_one("#start-go", Button)
            await pilot.press("enter")
            await until(pilot, lambda: pane.selected not in before and pane.selected is not None, "the demo run selected")
            # Not trained here: stopped at once (the Runs tests above show the rest).
            session.call("run.cancel", run=pane.selected)

        run_console(session, steps)
        (new,) = {r["run_id"] for r in session.call("run.list")} - before
        svc = session.client.svc
        svc.runs.wait(new, timeout=300)
        (body,) = svc.ledger.select("SELECT body FROM events WHERE kind = 'run.started' AND body ->> '$.data.run_id' = ?", [new])
        corpus = json.loads(body[0])["data"]["context"]["corpus"]
        assert corpus["name"] == "python-stdlib-docs" and len(corpus["sha256"]) == 64 and corpus["documents"] > 100
