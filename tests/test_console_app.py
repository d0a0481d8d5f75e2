"""The console's frame: it starts on a real service, shows the dashboard, help, palette, errors, key map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.widgets import DataTable, Static

from tests.console_fixtures import console_base, console_home, open_console, run_console, settle  # noqa: F401


def test_dashboard_shows_the_service_and_the_ledger(console_home: Path) -> None:
    with open_console(console_home) as session:

        async def steps(app: Any, pilot: Any) -> None:
            await settle(pilot, app)
            health = str(app.query_one("#dash-health", Static).render())
            assert "free disk in the home" in health and "owner" in health
            you = str(app.query_one("#dash-keys", Static).render())
            assert session.info["node_key"][:16] in you and "policy v2" in you
            events = app.query_one("#dash-events", DataTable)
            assert events.row_count > 0
            assert app.errors == []

        run_console(session, steps)


def test_help_lists_every_binding_with_its_id(console_home: Path) -> None:
    with open_console(console_home) as session:

        async def steps(app: Any, pilot: Any) -> None:
            await pilot.press("question_mark")
            await pilot.pause(0.2)
            text = app.screen.query_one("Markdown").source
            for binding_id in ("console.quit", "console.help", "console.refresh", "console.tab.runs"):
                assert f"`{binding_id}`" in text
            await pilot.press("escape")

        run_console(session, steps)


def test_number_keys_switch_tabs(console_home: Path) -> None:
    with open_console(console_home) as session:

        async def steps(app: Any, pilot: Any) -> None:
            for key, tab in (("2", "runs"), ("5", "ledger"), ("1", "dashboard")):
                await pilot.press(key)
                await pilot.pause(0.1)
                assert app.query_one("#tabs").active == tab

        run_console(session, steps)


def test_key_map_remaps_a_binding_by_id(console_home: Path, tmp_path: Path) -> None:
    from appliance.console.app import ConsoleApp

    keymap = tmp_path / "keys.toml"
    keymap.write_text('"console.tab.ledger" = "l"\n')
    with open_console(console_home) as session:
        app = ConsoleApp(session, keymap=keymap)

        async def main() -> None:
            async with app.run_test(size=(120, 40)) as pilot:
                await pilot.press("l")
                await pilot.pause(0.1)
                assert app.query_one("#tabs").active == "ledger"

        import asyncio

        asyncio.run(main())


def test_errors_show_what_and_the_fix(console_home: Path) -> None:
    from keys.errors import ApplianceError

    with open_console(console_home) as session:

        async def steps(app: Any, pilot: Any) -> None:
            app.report(ApplianceError("artifact abc is not in the store", "run `appliance artifact list`"))
            await pilot.pause(0.1)
            assert app.errors[-1] == ("artifact abc is not in the store", "run `appliance artifact list`")

        run_console(session, steps)


def test_session_core_needs_no_textual() -> None:
    import subprocess
    import sys

    code = "import sys; import appliance.console.session as s; assert 'textual' not in sys.modules; print(s.Grants)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_grants_give_the_reason_and_whom_to_ask(console_home: Path) -> None:
    with open_console(console_home, user="ada") as session:
        grants = session.grants
        assert grants.roles == ("auditor",)
        assert grants.allows("ledger.query") and not grants.allows("model.export")
        reason = grants.reason("model.export")
        assert "ada (auditor) lacks model.export" in reason and "release-manager" in reason


def test_every_style_sheet_is_a_tcss_file_the_app_loads() -> None:
    """Styles live in styles/*.tcss, every one loaded by the app; none in a DEFAULT_CSS, whose rules lose
    to any rule of the app's sheets whatever their selectors (the old panes' workarounds came from that)."""
    from appliance.console import app

    here, loaded = Path(app.__file__).parent, app.ConsoleApp.CSS_PATH
    assert isinstance(loaded, list)
    assert sorted((here / path).resolve() for path in loaded) == sorted(path.resolve() for path in (here / "styles").glob("*.tcss"))
    for module in here.glob("*.py"):
        assert "DEFAULT_CSS" not in module.read_text(encoding="utf-8"), f"{module.name}: put its styles in styles/<tab>.tcss"


def _decisions(session: Any) -> int:
    return int(session.client.svc.ledger.select("SELECT count(*) FROM decisions")[0][0])


def test_a_hidden_dashboard_asks_the_service_nothing(console_home: Path) -> None:
    # Every call is a decision the service signs into the ledger: a tab nobody looks at must not fill it.
    with open_console(console_home) as session:

        async def steps(app: Any, pilot: Any) -> None:
            await settle(pilot, app)
            dash = app.query_one("DashboardPane")
            await pilot.press("5")
            await settle(pilot, app)
            before = _decisions(session)
            dash._poll()
            await settle(pilot, app)
            assert _decisions(session) == before
            await pilot.press("1")  # shown again: it loads again
            await settle(pilot, app)
            shown = _decisions(session)
            assert shown > before
            dash._poll()  # no run is active and it loaded just now: it waits for the idle interval
            await settle(pilot, app)
            assert _decisions(session) == shown

        run_console(session, steps)


def test_a_tab_shown_again_shows_what_changed_meanwhile(console_home: Path) -> None:
    with open_console(console_home) as session, open_console(console_home, user="rex", svc=session.client.svc) as rex:

        async def steps(app: Any, pilot: Any) -> None:
            await pilot.press("6")
            await settle(pilot, app)
            table = app.query_one("#admin-approvals", DataTable)
            assert table.row_count == 0
            await pilot.press("1")
            await settle(pilot, app)
            rid = rex.call("approvals.request", action="model.export", subject="tiny-test", reason="to site B")["id"]
            await pilot.press("6")
            await settle(pilot, app)
            assert table.row_count == 1 and str(table.get_row_at(0)[0]) == rid

        run_console(session, steps)
