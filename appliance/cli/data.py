"""`appliance data card|dropped|skipped`: what went into a run's data, and what did not."""

from __future__ import annotations

import argparse
import json
from typing import Any

from appliance.cli.common import connect, emit, read_key_pems
from pipeline.errors import ConfigError


def cmd_data_card(args: argparse.Namespace) -> int:
    """Show a run's dataset card: sources, drops per filter, PII counts, duplicates, tokens."""
    with connect(args) as client:
        r = client.call("data.card", run=args.run, trusted_keys=read_key_pems(args.trusted_key) or None)
    emit(args, r["card"], r["markdown"])
    return 0


def cmd_data_dropped(args: argparse.Namespace) -> int:
    """List sample documents a curation filter dropped in a run (e.g. --filter c4)."""
    if args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}", "pass e.g. --limit 5")
    with connect(args) as client:
        r = client.call(
            "data.dropped", run=args.run, filter=args.filter, rule=args.rule, limit=args.limit, trusted_keys=read_key_pems(args.trusted_key) or None
        )
    if args.json:
        print(json.dumps(r, indent=2, ensure_ascii=False, default=str))
        return 0
    lines = [f"run {r['run_id']}: documents dropped by " + (args.filter or "every filter")]
    lines += [f"  {name:<36} {count:>8}" for name, count in r["dropped"].items()]
    if not r["samples"]:
        lines.append("no samples kept for that choice (clean.dropped_samples = 0, or the rule dropped nothing)")
    for row in r["samples"]:
        text = row["text"] if args.full else " ".join(row["text"].split())[:300]
        detail = f" ({row['detail']})" if row.get("detail") else ""
        lines += ["", f"doc {row['doc_id']}  {row['source']}  {row['filter']}.{row['rule']}{detail}", f"  {text}"]
    print("\n".join(lines))
    return 0


def cmd_data_skipped(args: argparse.Namespace) -> int:
    """List the source files a run's ingest skipped (whole or in part), with the reasons."""
    with connect(args) as client:
        r = client.call("data.skipped", run=args.run)
    if args.json:
        print(json.dumps(r, indent=2, default=str))
        return 0
    lines = [f"run {r['run_id']}: {len(r['skipped'])} source files lost documents at ingest"]
    for row in r["skipped"]:
        what = "whole file" if row["whole_file"] else f"{row['records_skipped']} records"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(row["reasons"].items()))
        lines.append(f"  {row['path']}: {what} ({reasons})")
    print("\n".join(lines))
    return 0


def register(sub: Any, add: Any) -> None:
    data = sub.add_parser("data", help="a run's dataset card, dropped documents and skipped files").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND"
    )
    p = add("card", cmd_data_card, data)
    p.add_argument("run", help="run id, unique prefix, or 'latest'")
    p.add_argument("--trusted-key", action="append", default=[], help="public key PEM to trust")
    p = add("dropped", cmd_data_dropped, data)
    p.add_argument("run", help="run id, unique prefix, or 'latest'")
    p.add_argument("--filter", help="only this filter (gopher_repetition, gopher_quality, c4, fineweb, pii, dedup, clean)")
    p.add_argument("--rule", help="only this rule of the filter (e.g. curly_bracket)")
    p.add_argument("--limit", type=int, default=10, help="at most this many samples (default 10)")
    p.add_argument("--full", action="store_true", help="print whole documents, not the first 300 characters")
    p.add_argument("--trusted-key", action="append", default=[], help="public key PEM to trust")
    p = add("skipped", cmd_data_skipped, data)
    p.add_argument("run", help="run id, unique prefix, or 'latest'")
