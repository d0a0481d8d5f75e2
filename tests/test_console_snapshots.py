"""SVG snapshots of the console's main screens at 120×40 (pytest-textual-snapshot, textual pinned exactly).

What a screen shows must not change between runs, so these run on a frozen home
(tests/assets/console-home.tar.gz, rebuilt by tests/assets/make_console_home.py) with the
ledger's clock, the disk figures, the route table and the root key's path (the home is
unpacked in a new temporary folder each run) fixed, no clock in the header, a caller without
a pid, blinking cursors frozen (shown, not blinking), and tables drawn afresh before the shot
(Textual may keep a header drawn before its rows were measured). A changed screen fails here;
if the change is meant, look at the new SVG and accept it with
`pytest tests/test_console_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ASSETS, PASSPHRASE
from tests.console_fixtures import settle

SIZE = (120, 40)
FROZEN_TS = "2026-11-26T14:00:00.000000Z"  # after the frozen home was made: its node key is valid then
SHOWN_HOME = "/var/lib/appliance"  # where the header says the home is, and where its root key is said to be


@pytest.fixture
def frozen_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from appliance.console.app import ConsoleApp
    from appliance.console.session import Session
    from appliance.service import Service
    from appliance.service.caller import Caller
    from tests.console_fixtures import CallerClient

    with tarfile.open(ASSETS / "console-home.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    monkeypatch.setattr("registry.ledger._now", lambda: FROZEN_TS)
    monkeypatch.setattr(
        "appliance.service.console_ops.shutil.disk_usage", lambda _: shutil._ntuple_diskusage(500_000_000_000, 120_000_000_000, 380_000_000_000)
    )  # type: ignore[attr-defined]
    monkeypatch.setattr("airgap.netinfo.default_routes", lambda *a, **k: [])
    # Keys & approvals names the root key's file, which lies in this run's temporary folder.
    monkeypatch.setattr("appliance.home.Home.root_anchor", lambda home: (home.root_public_key_file, f"{SHOWN_HOME}/keys/root.pub.pem, the home's own copy"))
    svc = Service.open(tmp_path / "home", PASSPHRASE.encode())
    try:
        caller = Caller(uid=0, user="root", gids=(0,), groups=("root",))
        session = Session(CallerClient(svc, caller), where=f"home {SHOWN_HOME} (local mode)")
        session.connect()
        yield ConsoleApp(session, keymap=None, clock=False)
    finally:
        svc.close()


def _settled(*keys: str) -> Any:
    """run_before: press ``keys``, then wait until every service call has landed."""

    async def run_before(pilot: Any) -> None:
        app = pilot.app
        for key in keys:  # each key's service calls land before the next key
            await pilot.press(key)
            await settle(pilot, app)
        await asyncio.sleep(0.2)
        # A focused field's cursor blinks: shown or not depends on the moment of the shot.
        for field in app.screen.query("Input, TextArea"):
            field.cursor_blink = False
        # A DataTable filled while shown may keep its header drawn at the widths it had before its
        # new rows were measured (when the screen refreshes between add_row and the table's idle):
        # drop its drawn cells, so every table shows its measured widths.
        for table in app.screen.query("DataTable"):
            table.notify_style_update()
        await pilot.pause()

    return run_before


def test_dashboard(snap_compare: Any, frozen_app: Any) -> None:
    assert snap_compare(frozen_app, terminal_size=SIZE, run_before=_settled())


def test_help(snap_compare: Any, frozen_app: Any) -> None:
    assert snap_compare(frozen_app, terminal_size=SIZE, run_before=_settled("question_mark"))


def test_runs(snap_compare: Any, frozen_app: Any) -> None:
    assert snap_compare(frozen_app, terminal_size=SIZE, run_before=_settled("2"))


def test_data(snap_compare: Any, frozen_app: Any) -> None:
    assert snap_compare(frozen_app, terminal_size=SIZE, run_before=_settled("3"))


def test_registry(snap_compare: Any, frozen_app: Any) -> None:
    assert snap_compare(frozen_app, terminal_size=SIZE, run_before=_settled("4"))


def test_chat(snap_compare: Any, frozen_app: Any) -> None:
    assert snap_compare(frozen_app, terminal_size=SIZE, run_before=_settled("8"))


def test_ledger(snap_compare: Any, frozen_app: Any) -> None:
    settled = _settled("5")

    async def run_before(pilot: Any) -> None:
        await settled(pilot)
        # The tab's calls run side by side, so how many of their own decisions the verify counted,
        # and so the last seq and the head's hash, vary from run to run: those figures are masked.
        for which in ("#ledger-chain", "#ledger-head"):
            card = pilot.app.query_one(which)
            text = card.render().markup if hasattr(card.render(), "markup") else str(card.render())
            text = re.sub(r"\d+ events checked", "N events checked", text)
            text = re.sub(r"seq \d+", "seq N", text)
            card.update(re.sub(r"\b[0-9a-f]{12,}…", "…", text))
        await pilot.pause()

    assert snap_compare(frozen_app, terminal_size=SIZE, run_before=run_before)


def test_admin(snap_compare: Any, frozen_app: Any) -> None:
    assert snap_compare(frozen_app, terminal_size=SIZE, run_before=_settled("6"))


def test_purge(snap_compare: Any, frozen_app: Any) -> None:
    assert snap_compare(frozen_app, terminal_size=SIZE, run_before=_settled("7"))
