"""The CLI is the interface: its commands and options change only on purpose.

Regenerate the golden file with ``UPDATE_GOLDEN=1 pytest tests/test_cli_surface.py`` and
review the diff.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from appliance.cli import build_parser

GOLDEN = Path(__file__).with_name("assets") / "cli_surface.txt"


def _surface(parser: argparse.ArgumentParser, prefix: str = "appliance") -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in sorted(action.choices.items()):
                lines += _surface(sub, f"{prefix} {name}")
        elif not isinstance(action, argparse._HelpAction):
            flag = "/".join(action.option_strings) or action.dest
            lines.append(f"{prefix} {flag}")
    return lines


def test_cli_surface_is_frozen() -> None:
    text = "\n".join(_surface(build_parser())) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "CLI changed: review it, then UPDATE_GOLDEN=1 to accept"
