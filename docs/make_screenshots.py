"""Write docs/console-*.png: the console's main screens at 120×40, on the snapshot tests' frozen home.

.venv/bin/python docs/make_screenshots.py      # needs rsvg-convert (librsvg2-bin)
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))

SCREENS = {"dashboard": "1", "runs": "2", "data": "3", "registry": "4", "ledger": "5", "keys": "6", "purge": "7", "chat": "8"}


def preserve_spaces(svg: str) -> str:
    """The SVG with its spaces kept by rsvg-convert: Textual writes them as no-break spaces, which
    rsvg's monospace font draws with no width ("w  who" became "wwho"); plain spaces under
    xml:space="preserve" keep every column where the terminal has it."""
    return svg.replace("&#160;", " ").replace("<text ", '<text xml:space="preserve" ')


def main() -> None:
    from appliance.console.app import ConsoleApp
    from appliance.console.session import Session
    from appliance.service import Service
    from appliance.service.caller import Caller
    from tests.conftest import ASSETS, PASSPHRASE
    from tests.console_fixtures import CallerClient

    tmp = Path(tempfile.mkdtemp(prefix="console-shots-"))
    try:
        with tarfile.open(ASSETS / "console-home.tar.gz") as tar:
            tar.extractall(tmp, filter="data")
        with Service.open(tmp / "home", PASSPHRASE.encode()) as svc:
            session = Session(CallerClient(svc, Caller(uid=0, user="root", gids=(0,), groups=("root",))), where="home /var/lib/appliance (local mode)")
            session.connect()
            for name, key in SCREENS.items():
                app = ConsoleApp(session, keymap=None, clock=False)

                async def shoot(app: ConsoleApp = app, key: str = key, name: str = name) -> None:
                    async with app.run_test(size=(120, 40)) as pilot:
                        await pilot.press(key)
                        await pilot.pause(3.0)
                        app.save_screenshot(f"console-{name}.svg", path=str(tmp))

                asyncio.run(shoot())
                svg = tmp / f"console-{name}.svg"
                svg.write_text(preserve_spaces(svg.read_text(encoding="utf-8")), encoding="utf-8")
                subprocess.run(["rsvg-convert", str(svg), "-o", str(DOCS / f"console-{name}.png")], check=True)
                print(DOCS / f"console-{name}.png")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
