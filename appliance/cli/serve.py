"""`appliance serve`: run the service of one home behind its Unix socket."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

DEFAULT_SOCKET = "/run/appliance/appliance.sock"


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an octal mode (e.g. 0660)") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"'{text}' is not a permission mode between 0000 and 0777")
    return mode


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the appliance service: own the home (ledger, store, node key) and answer the CLI and
    console over a Unix socket until SIGTERM or Ctrl-C. Callers are identified by the kernel;
    every request is authorized and recorded. On stop, active runs save a checkpoint first."""
    from airgap.attest import force_offline
    from airgap.guard import install

    # Before the server's own libraries load: nothing this process does may leave the machine.
    force_offline()
    install()
    from appliance.cli.common import home_of
    from appliance.server.app import serve
    from appliance.service.core import ServiceConfig
    from keys.keystore import read_passphrase

    home = home_of(args)
    home.require()
    config = ServiceConfig(
        max_jobs=args.max_jobs,
        query_timeout_s=args.query_timeout,
        query_memory_limit=args.query_memory_limit,
        query_max_rows=args.query_max_rows,
    )
    passphrase = read_passphrase(purpose=f"unlock the node key of {home.root}")
    # Jobs are this process's children: the passphrase must not travel in their environment.
    os.environ.pop("APPLIANCE_PASSPHRASE", None)
    socket_path = Path(getattr(args, "socket", None) or os.environ.get("APPLIANCE_SOCKET") or DEFAULT_SOCKET)
    if not socket_path.is_absolute():
        socket_path = Path.cwd() / socket_path

    def ready(facts: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(facts), flush=True)

    return serve(home.root, socket_path, group=args.socket_group, mode=args.socket_mode, config=config, passphrase=passphrase, ready=ready)


def add_serve_parser(sub: Any, add: Any) -> argparse.ArgumentParser:
    """Register `serve` on the CLI's subcommands; ``add(name, fn, parent)`` is the CLI's helper."""
    p: argparse.ArgumentParser = add("serve", cmd_serve, sub)
    socket_help = f"Unix socket to listen on (default: $APPLIANCE_SOCKET or {DEFAULT_SOCKET})"
    shared = p._option_string_actions.get("--socket")
    if shared is not None:
        # The CLI's helper gives every command a hidden --socket (the service to talk to);
        # for serve it is the socket to listen on, so it is shown, with that meaning.
        shared.help = socket_help
    else:
        p.add_argument("--socket", default=argparse.SUPPRESS, help=socket_help)
    p.add_argument("--socket-group", help="group that owns the socket; its members may connect (default: the service user's group)")
    p.add_argument("--socket-mode", type=_octal_mode, default=0o660, help="the socket's permission mode, octal (default 0660: owner and group)")
    p.add_argument("--max-jobs", type=int, default=1, help="stages running at once; more runs wait in a queue (default 1)")
    p.add_argument("--query-timeout", type=float, default=30.0, help="seconds one ledger query may run (default 30)")
    p.add_argument("--query-memory-limit", default="1GB", help="memory one ledger query may use, DuckDB syntax (default 1GB)")
    p.add_argument("--query-max-rows", type=int, default=100_000, help="rows one ledger query may return (default 100000)")
    return p


__all__ = ["add_serve_parser", "cmd_serve"]
