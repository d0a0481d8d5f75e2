"""`appliance purge TARGET` (impact, then with --confirm the purge) and `appliance purges list|show|verify`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from appliance.cli.common import connect, emit
from keys.errors import ApplianceError


def _rows(title: str, rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = [title]
    for a in rows:
        how = (
            "sealed: crypto-erase"
            if a.get("sealed")
            else ("not crypto-erasable (stored before encryption at rest)" if a.get("stored") else "recorded, not stored")
        )
        out.append(f"  {a['digest'][:16]}…  {a['kind']:<18} {a['name']}  [{how}]")
    return out


def impact_text(r: dict[str, Any]) -> str:
    lines = [f"purge of {r['label']} ({r['subject']}):"]
    lines += _rows(f"erased ({len(r['purge'])}: these hold the data itself, or you named them with --also):", r["purge"])
    lines += [
        f"  {a['digest'][:16]}…  {a['kind']:<18} {a['name']}  [kept, marked 'derived from purged data'; --also {a['digest'][:16]} to erase it too]"
        for a in r["keep"]
    ]
    if r["keep"]:
        lines.insert(len(lines) - len(r["keep"]), f"kept and marked ({len(r['keep'])}):")
    for s in r["sources"]:
        where = "in the home: overwritten and unlinked" if s["in_home"] else "outside the home: remove it there yourself"
        lines.append(f"source file {s['path']} ({s['digest'][:16]}…): {where}")
    for e in r["exports"]:
        lines.append(f"exported beyond reach: {e['digest'][:16]}… to {e['destination']} at {e['ts']}")
    if r["runs"]:
        lines.append(f"runs touched: {', '.join(r['runs'])}")
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


def cmd_purge(args: argparse.Namespace) -> int:
    """Erase data from the home: shows the impact (lineage); with --confirm, crypto-erases, verifies and signs a certificate."""
    also = list(args.also or [])
    with connect(args) as client:
        if not args.confirm:
            r = client.call("purge.impact", target=args.target, also=also)
            how = (
                f"\nthe policy needs a second person: `appliance request data.purge '{r['subject']}'`, then, once approved,\n"
                f"`appliance purge {args.target}{''.join(' --also ' + a for a in also)} --approval ID --confirm`"
                if r["two_person"]
                else f"\nto purge: `appliance purge {args.target}{''.join(' --also ' + a for a in also)} --confirm`"
            )
            emit(args, r, impact_text(r) + "\nnothing was changed." + how)
            return 0
        r = client.call("purge.run", target=args.target, also=also, markers=list(args.marker or []), approval=args.approval)
    c = r["certificate"]
    v = c["verification"]
    scan = v["marker_scan"]
    scanned = (
        scan
        if isinstance(scan, str)
        else f"{v['markers']} markers searched in {scan['files']} files ({scan['bytes']} bytes): found in {len(scan['files_with_markers'])}"
    )
    emit(
        args,
        r,
        f"purged {len(c['media']['artifacts'])} artifact(s) ({c['media']['total_bytes']} bytes) of {c['media']['description']}: {c['sanitization']['technique']}\n"
        f"data keys destroyed: {len(c['sanitization']['data_keys_destroyed'])}; verification {v['result']}: {scanned}\n"
        f"certificate {r['purge_id']} signed by node key {r['key_id'][:16]}…: {r['file']}\n"
        f"read it with `appliance purges show {r['purge_id']}`",
    )
    return 0 if v["result"] == "passed" else 1


def cmd_purges_list(args: argparse.Namespace) -> int:
    """Every purge: target, status, who requested and approved it, its certificate."""
    with connect(args) as client:
        rows = client.call("purge.list")
    text = "\n".join(
        f"{r['purge_id']}  {r['status']:<9} {r['target']}  by {r['requester']}"
        + (f", approved by {r['approver']}" if r["approver"] else "")
        + f"  {r['artifacts']} artifact(s)  {r['finished'] or r['started']}"
        for r in rows
    )
    emit(args, rows, text or "nothing was purged")
    return 0


def cmd_purges_show(args: argparse.Namespace) -> int:
    """A purge's signed certificate (NIST SP 800-88 fields); --out writes it to a file for a third party."""
    with connect(args) as client:
        r = client.call("purge.show", id=args.id)
    doc = {k: r[k] for k in ("certificate", "signature", "key_id")}
    import hashlib

    from registry.canonical import canonical_json

    doc["certificate_sha256"] = hashlib.sha256(canonical_json(r["certificate"])).hexdigest()
    if args.out:
        out = Path(args.out)
        if out.exists():
            raise ApplianceError(f"{out} already exists", "write the certificate to a new file")
        out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    c = r["certificate"]
    people = c["person_performing"]
    approver = (people.get("approved_by") or {}).get("user") or "nobody (no two-person rule)"
    text = (
        f"certificate of sanitization {args.id}\n"
        f"  requested by {people['requested_by']['user']}; approved by {approver}\n"
        f"  what: {c['media']['description']}: {len(c['media']['artifacts'])} artifact(s), {c['media']['total_bytes']} bytes\n"
        f"  method: {c['sanitization']['method_type']}: {c['sanitization']['technique']}\n"
        f"  tool: {c['sanitization']['tool']} {c['sanitization']['tool_version']}; {c['sanitization']['started']} to {c['sanitization']['completed']}\n"
        f"  verification: {c['verification']['result']}\n"
        f"  kept, derived from purged data: {len(c['kept_derived_from_purged_data'])}\n"
        f"  media: {c['post_sanitization']}\n"
        f"  signed by node key {r['key_id'][:16]}…" + (f"; written to {args.out}" if args.out else "")
    )
    emit(args, doc, text)
    return 0


def cmd_purges_verify(args: argparse.Namespace) -> int:
    """Check a certificate file offline against the appliance's node public key (no home needed)."""
    from keys.keystore import load_public_key
    from registry.purge_cert import verify_certificate

    path = Path(args.file)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ApplianceError(f"cannot read {path}: {exc}", "pass the file `appliance purges show ID --out FILE` wrote") from exc
    cert = verify_certificate(doc, load_public_key(Path(args.key)), source=str(path))
    emit(
        args,
        {"ok": True, "certificate": cert},
        f"{path}: signature good (node key {doc['key_id'][:16]}…); purge {cert['purge_id']}, verification {cert['verification']['result']}",
    )
    return 0


def register(sub: Any, add: Any) -> None:
    p = add("purge", cmd_purge)
    p.add_argument("target", help="artifact digest (or prefix), source:PATH|DIGEST (a source file), or run:RUN (a run's intermediates)")
    p.add_argument(
        "--also", action="append", metavar="DIGEST|all", help="erase this derived artifact too (repeat; 'all' for every one); the rest are kept and marked"
    )
    p.add_argument("--marker", action="append", metavar="TEXT", help="a string you know is in the data (a name, an id): the verification scan looks for it too")
    p.add_argument("--approval", help="your approved request (`appliance request data.purge TARGET`), where the policy asks for one")
    p.add_argument("--confirm", action="store_true", help="carry out the purge (without it: show the impact only)")
    purges = sub.add_parser("purges", help="purges done and their signed certificates").add_subparsers(dest="purges_command", required=True, metavar="COMMAND")
    add("list", cmd_purges_list, purges)
    p = add("show", cmd_purges_show, purges)
    p.add_argument("id", help="purge id (pg-…)")
    p.add_argument("--out", help="also write the signed certificate to this new file")
    p = add("verify", cmd_purges_verify, purges)
    p.add_argument("file", help="certificate file (`appliance purges show ID --out FILE`)")
    p.add_argument("--key", required=True, help="the appliance node's public key PEM (`appliance keys export-public`)")
