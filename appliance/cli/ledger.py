"""`appliance ledger verify|query|head`: the auditor's commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from appliance.cli.common import connect, emit, note, read_key_pems
from keys.errors import ApplianceError


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    """Recompute the ledger's hash chain and signatures and check the signed head."""
    head = None
    if args.head:
        try:
            head = Path(args.head).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ApplianceError(f"cannot read the signed head {args.head}: {exc}", "pass the file written by `appliance ledger head --out FILE`") from None
    with connect(args) as client:
        report = client.call("ledger.verify", head=head, trusted_keys=read_key_pems(args.trusted_key) or None)
    checked = "" if report["head_checked"] else " (no signed head checked)"
    if report.get("approvals_checked"):
        checked += f"; {report['approvals_checked']} approval decision(s) re-checked against their user keys"
    emit(
        args,
        report,
        f"ledger OK: {report['events']} events, chain and signatures verified, head seq {report['last_seq']} {report['last_hash'][:16]}…{checked}",
    )
    return 0


def cmd_ledger_query(args: argparse.Namespace) -> int:
    """Run one read-only SELECT over the ledger (views: events, artifacts, lineage, runs, …)."""
    with connect(args) as client:
        result = client.call("ledger.query", sql=args.sql)
    columns, rows = result["columns"], result["rows"]
    if args.json:
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    Console().print(table)
    return 0


def cmd_ledger_head(args: argparse.Namespace) -> int:
    """Print (or write to --out) the signed ledger head, to keep outside the appliance."""
    with connect(args) as client:
        head = client.call("ledger.head")
    text = json.dumps(head, sort_keys=True, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        note(f"signed head written to {args.out}")
    else:
        print(text, end="")
    return 0


def register(sub: Any, add: Any) -> None:
    ledger = sub.add_parser("ledger", help="verify and query the provenance ledger").add_subparsers(dest="ledger_command", required=True, metavar="COMMAND")
    p = add("verify", cmd_ledger_verify, ledger)
    p.add_argument("--head", help="signed head file kept outside the appliance (default: the home's)")
    p.add_argument("--trusted-key", action="append", default=[], help="public key PEM to trust (repeatable; default: the home's node key)")
    p = add("query", cmd_ledger_query, ledger)
    p.add_argument("sql", help="one SELECT statement")
    p = add("head", cmd_ledger_head, ledger)
    p.add_argument("--out", help="write the head to this file")
