"""`appliance audit …`: the auditor's questions, answered from the ledger.

Each subcommand is one canned query (registry/audit_queries.py) run through the service's
sandboxed `ledger.query`, so it needs what an auditor's own SQL needs (ledger.query) and
obeys the same limits. Tables on the terminal; ``--json`` for a list of objects; ``--sql``
prints the query instead, to adapt it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from appliance.cli.common import connect
from registry import audit_queries as q


def show_result(args: argparse.Namespace, result: dict[str, Any], *, empty: str = "no rows") -> None:
    """A query's result: a table, or --json objects."""
    columns, rows = result["columns"], result["rows"]
    if getattr(args, "json", False):
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], indent=2, default=str, ensure_ascii=False))
        return
    if not rows:
        print(empty)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    Console().print(table)


def _run(args: argparse.Namespace, sql: str, empty: str) -> int:
    if args.sql:
        print(sql)
        return 0
    with connect(args) as client:
        show_result(args, client.call("ledger.query", sql=sql), empty=empty)
    return 0


def cmd_audit_who(args: argparse.Namespace) -> int:
    """Who did what and when: every decision the service took, allowed or denied."""
    return _run(args, q.who(args.user, args.since), "no decisions recorded")


def cmd_audit_denied(args: argparse.Namespace) -> int:
    """Every action the policy refused, with the reason."""
    return _run(args, q.denied(args.user, args.since), "nothing was refused")


def cmd_audit_lineage(args: argparse.Namespace) -> int:
    """A model's full lineage: every artifact it derives from, back to the source files and the base model."""
    return _run(args, q.lineage(args.model), f"no model recorded with a digest starting {args.model}")


def cmd_audit_derived(args: argparse.Namespace) -> int:
    """Every model derived from a source file (by file name or digest): what an erasure request reaches."""
    return _run(args, q.derived(args.source), f"no model derives from a source matching {args.source}")


def cmd_audit_key(args: argparse.Namespace) -> int:
    """Every use of a key: what it signed, and every event naming it (registration, rotation, revocation, approvals)."""
    return _run(args, q.key_use(args.key_id), f"no event signed by or naming key {args.key_id}")


def cmd_audit_exports(args: argparse.Namespace) -> int:
    """Every export and import of a model, with its approval."""
    return _run(args, q.exports(), "no model was exported or imported")


def cmd_audit_approvals(args: argparse.Namespace) -> int:
    """Every step of every two-person request."""
    return _run(args, q.approvals(), "no requests")


def cmd_audit_purges(args: argparse.Namespace) -> int:
    """Every purge, with who requested and approved it, its verification and its certificate."""
    return _run(args, q.purges(), "nothing was purged")


def cmd_audit_purged(args: argparse.Namespace) -> int:
    """Purged artifacts, and the artifacts kept that derive from purged data (models cannot be un-trained)."""
    return _run(args, q.purge_derived(), "no artifact is purged or derived from purged data")


def register(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="the auditor's canned questions, answered from the ledger").add_subparsers(
        dest="audit_command", required=True, metavar="COMMAND"
    )

    def command(name: str, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = add(name, fn, audit)
        p.add_argument("--sql", action="store_true", help="print the query instead of running it")
        return p

    for name, fn in (("who", cmd_audit_who), ("denied", cmd_audit_denied)):
        p = command(name, fn)
        p.add_argument("--user", help="only this user")
        p.add_argument("--since", help="only from this date or time (e.g. 2026-11-01)")
    p = command("lineage", cmd_audit_lineage)
    p.add_argument("model", help="model digest or prefix")
    p = command("derived", cmd_audit_derived)
    p.add_argument("source", help="source file name (as ingested) or its digest prefix")
    p = command("key", cmd_audit_key)
    p.add_argument("key_id", help="key id or prefix (`appliance keys list`)")
    command("exports", cmd_audit_exports)
    command("approvals", cmd_audit_approvals)
    command("purges", cmd_audit_purges)
    command("purged", cmd_audit_purged)
