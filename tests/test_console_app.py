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
