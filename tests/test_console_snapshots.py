"""SVG snapshots of the console's main screens at 120×40 (pytest-textual-snapshot, textual pinned exactly).

What a screen shows must not change between runs, so these run on a frozen home
(tests/assets/console-home.tar.gz, rebuilt by tests/assets/make_console_home.py) with the
ledger's clock, the disk figures and the route table fixed, no clock in the header, and a
caller without a pid. A changed screen fails here; if the change is meant, look at the new
SVG and accept it with `pytest tests/test_console_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import asyncio
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ASSETS, PASSPHRASE

SIZE = (120, 40)
FROZEN_TS = "2026-11-26T12:00:00.000000Z"


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
    svc = Service.open(tmp_path / "home", PASSPHRASE.encode())
    try:
        caller = Caller(uid=0, user="root", gids=(0,), groups=("root",))
        session = Session(CallerClient(svc, caller), where="home /var/lib/appliance (local mode)")
        session.connect()
        yield ConsoleApp(session, keymap=None, clock=False)
    finally:
        svc.close()


def _settled(*keys: str) -> Any:
    """run_before: press ``keys``, then wait until every service call has landed."""

    async def run_before(pilot: Any) -> None:
        for key in keys:
            await pilot.press(key)
        app = pilot.app
        for _ in range(200):
            await pilot.pause(0.05)
            if not [w for w in app.workers if w.is_running and w.group != "follow"]:
                break
        await asyncio.sleep(0.2)
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
    assert snap_compare(frozen_app, terminal_size=SIZE, run_before=_settled("5"))
