"""`appliance console`: the operator console, a Textual app that is a client of the service."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from appliance.cli.common import connect, local_mode
from keys.errors import ApplianceError


def cmd_console(args: argparse.Namespace) -> int:
    """The operator console: runs, data, registry, ledger, keys and approvals, purge, chat, in one window (a terminal UI)."""
    try:
        from appliance.console.app import KEYMAP, ConsoleApp
        from appliance.console.session import Session
    except ImportError as exc:
        raise ApplianceError(
            f"the console needs textual, which is not installed ({exc.name})", "install the console extra: pip install -c constraints/cpu.txt -e '.[console]'"
        ) from None
    with connect(args) as client:
        where = f"home {args.home} (local mode)" if local_mode(args) else f"socket {getattr(client, 'socket_path', '') or 'the service'}"
        session = Session(client, where=where)
        session.connect()  # who we are decides which controls are live: asked before the window opens
        ConsoleApp(session, keymap=Path(args.keymap) if args.keymap else KEYMAP).run()
    return 0


def register(sub: Any, add: Any) -> None:
    p = add("console", cmd_console, sub)
    p.add_argument("--keymap", help='key map TOML (binding-id = "key"); default ~/.config/appliance/console-keys.toml')
