"""`appliance ledger verify|query|head|export|verify-export`: the auditor's commands."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from appliance.cli.common import connect, emit, note, read_key_pems
from keys.errors import ApplianceError

_PEM_BLOCK = re.compile(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


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


def cmd_ledger_export(args: argparse.Namespace) -> int:
    """Copy the ledger for an auditor, up to a signed head the service checks it against first:
    a DuckDB file the standalone duckdb CLI (1.5) opens, or a folder with events.parquet and head.json."""
    from appliance.server.client import unpack_export

    fmt, target = ("duckdb", Path(args.duckdb)) if args.duckdb else ("parquet", Path(args.parquet))
    target = target.expanduser().absolute()
    if target.exists():
        raise ApplianceError(f"ledger export target {target} already exists", "choose a new path: an export never overwrites one")
    if not target.parent.is_dir():
        raise ApplianceError(f"folder {target.parent} does not exist", "create it first, or export to a path in an existing folder")
    # Received beside the target, then renamed into place: an interrupted export leaves nothing
    # that looks whole. Written with this user's rights, not the service's.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        with connect(args) as client:
            received = unpack_export(client.stream("ledger.export", format=fmt), staging / "export")
        wanted = {"ledger.duckdb", "head.json"} if fmt == "duckdb" else {"events.parquet", "head.json"}
        found = {p.name for p in received.iterdir()}
        if found != wanted:
            raise ApplianceError(f"the service sent {sorted(found)}, not {sorted(wanted)}", "the client and service versions may differ: update them together")
        head = json.loads((received / "head.json").read_text(encoding="utf-8"))
        # The DuckDB copy carries its head inside (table ledger_head); the Parquet folder keeps head.json.
        os.replace(received / "ledger.duckdb" if fmt == "duckdb" else received, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    check = f"appliance ledger verify-export {target} --trusted-key NODE.pub.pem"
    emit(
        args,
        {"format": fmt, "path": str(target), "seq": head["seq"], "hash": head["hash"], "key_id": head["key_id"], "verify": check},
        f"ledger exported to {target}: events 1..{head['seq']}, signed head {head['hash'][:16]}… by key {head['key_id'][:16]}…\n"
        f"check it anywhere (the node public keys: appliance keys export-public --role node) with:\n  {check}",
    )
    return 0


def cmd_ledger_verify_export(args: argparse.Namespace) -> int:
    """Check an exported ledger (DuckDB file or Parquet folder) offline: chain, every signature, the
    head, against the public keys you trust (no service or home needed)."""
    from keys.keystore import key_id_of, public_key_from_pem
    from registry.ledger_export import verify_export
    from registry.ledger_verify import read_head_file

    trusted = {}
    for name, text in zip(args.trusted_key, read_key_pems(args.trusted_key), strict=True):
        # `keys export-public --role node --all` writes every node key into one file, one PEM block each.
        blocks = _PEM_BLOCK.findall(text) or [text]
        for i, pem in enumerate(blocks):
            public_key = public_key_from_pem(pem.encode(), source=f"trusted key {name}" + (f" (block {i + 1})" if len(blocks) > 1 else ""))
            trusted[key_id_of(public_key)] = public_key
    checkpoint = read_head_file(Path(args.head)) if args.head else None
    r = verify_export(Path(args.path), trusted, checkpoint)
    against = f"; it holds the earlier signed head {args.head} (seq {r.checkpoint_seq})" if checkpoint is not None else ""
    emit(
        args,
        {
            "ok": True,
            "path": str(r.path),
            "format": r.format,
            "events": r.events,
            "last_seq": r.last_seq,
            "last_hash": r.last_hash,
            "head_key_id": r.head_key_id,
            "checkpoint_seq": r.checkpoint_seq,
        },
        f"ledger export {r.path} OK ({r.format}): {r.events} events, chain and signatures verified, "
        f"signed head seq {r.last_seq} {r.last_hash[:16]}… by key {r.head_key_id[:16]}…{against}",
    )
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
    p = add("export", cmd_ledger_export, ledger)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--duckdb", metavar="FILE", help="new DuckDB file (opens in the duckdb CLI 1.5): events, the audit views, ledger_head")
    where.add_argument("--parquet", metavar="DIR", help="new folder: events.parquet (signed head in its metadata) and head.json")
    p = add("verify-export", cmd_ledger_verify_export, ledger)
    p.add_argument("path", help="the exported DuckDB file, or Parquet folder (or its events.parquet)")
    p.add_argument("--trusted-key", action="append", required=True, help="node public key PEM to trust (repeatable: pass earlier node keys after a rotation)")
    p.add_argument("--head", help="an earlier signed head (`appliance ledger head --out FILE`): the export must hold its row with its hash")
