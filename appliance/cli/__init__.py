"""`appliance`: the command line. One function per subcommand; its docstring is the help.

Every command is a client of the service: over its Unix socket (``--socket``,
``APPLIANCE_SOCKET``, or the default socket when a service listens there), or in local mode
(``--home DIR``), where the same `Service` runs in this process. Machine output (``--json``)
goes to stdout, progress and diagnostics to stderr. Errors the appliance raises on purpose
become a short message and exit code 2; a traceback is a bug, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from keys.errors import ApplianceError


def _version() -> str:
    """The installed distribution's version."""
    from importlib import metadata

    try:
        version = metadata.version("sovereign-appliance")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    return f"{version} (Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    from appliance.cli import (
        airgap,
        approvals,
        audit,
        bundle,
        console,
        data,
        finetune,
        generate,
        keys,
        ledger,
        policy,
        purge,
        recipe,
        registry,
        runs,
        serve,
        slurm,
        store,
    )

    parser = argparse.ArgumentParser(prog="appliance", description="Sovereign LLM training appliance: dataset to signed model, proven in a ledger.")
    parser.add_argument("--home", help="local mode: run the service in-process on this home (default: $APPLIANCE_HOME or ~/.local/share/appliance)")
    parser.add_argument("--socket", help="talk to the service on this Unix socket (default: $APPLIANCE_SOCKET, else /run/appliance/appliance.sock if present)")
    parser.add_argument("--version", action="version", version=f"appliance {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], parent: Any = sub) -> argparse.ArgumentParser:
        # "resolve": a command may define --socket itself (serve listens on it) over the shared one.
        p = parent.add_parser(name, help=fn.__doc__, description=fn.__doc__, conflict_handler="resolve")
        p.set_defaults(fn=fn)
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        # Accept --home and --socket after the subcommand too; SUPPRESS keeps top-level ones intact.
        p.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("--socket", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return p

    runs.register(sub, add)
    ledger.register(sub, add)
    keys.register(sub, add)
    policy.register(sub, add)
    approvals.register(sub, add)
    audit.register(sub, add)
    store.register(sub, add)
    registry.register(sub, add)
    bundle.register(sub, add)
    purge.register(sub, add)
    airgap.register(sub, add)
    console.register(sub, add)
    data.register(sub, add)
    generate.register(sub, add)
    recipe.register(sub, add)
    finetune.register(sub, add)
    slurm.register(sub, add)
    serve.add_serve_parser(sub, add)
    return parser


def _cancel(signum: int, frame: Any) -> None:
    # SIGTERM is how operators and job managers cancel; unwind like Ctrl-C so a followed run
    # is cancelled and recorded instead of left behind.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()
    # Restored on return: a caller running the CLI in-process (a test runner) keeps its own.
    previous = signal.signal(signal.SIGTERM, _cancel) if in_main_thread else None
    try:
        args = build_parser().parse_args(argv)
        return int(args.fn(args))
    except ApplianceError as exc:
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `appliance … | head`: the reader left; nothing to say to it.
        return 0
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
