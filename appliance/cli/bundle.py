"""`appliance export MODEL --to DIR | --tar FILE` and `appliance verify BUNDLE --root-key PEM`."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from appliance.cli.common import connect, emit
from keys.errors import ApplianceError


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model as a signed bundle for another site: the model, its release signature, provenance, a ledger excerpt, the trust store."""
    from keys.keystore import public_key_from_pem
    from registry.bundle import unpack_bundle, verify_bundle

    if bool(args.to) == bool(args.tar):
        raise ApplianceError(
            "give one of --to DIR (a folder) or --tar FILE (one file, e.g. for a USB stick)", "e.g. appliance export stdlib-demo:1 --to ./bundle"
        )
    target = Path(args.to or args.tar).resolve()
    if target.exists():
        raise ApplianceError(f"{target} already exists", "export into a new folder or file")
    partial = Path(tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tar", dir=target.parent)[1])
    try:
        with connect(args) as client:
            with open(partial, "wb") as sink:
                for chunk in client.stream("bundle.export", model=args.model, approval=args.approval):
                    sink.write(chunk)
            # service.info, not keys.list: a release manager exports without keys.read.
            root = client.call("service.info")["root_key"]
        if args.tar:
            os.replace(partial, target)
        else:
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            unpack_bundle(partial, staging)
            os.replace(staging, target)
    finally:
        partial.unlink(missing_ok=True)
    # Checked again on arrival, as the other site will, against this site's root key.
    report = verify_bundle(target, public_key_from_pem(root["public_key_pem"].encode("ascii")), root_source="this site's root key")
    m = report["model"]
    emit(
        args,
        {k: v for k, v in report.items() if k != "statement"} | {"path": str(target)},
        f"exported {m['name']}:{m['version']} ({m['digest'][:16]}…) to {target}\n"
        f"signed by release key {report['release_key_id'][:16]}…; {report['files']} files, {report['dependencies']} dependencies, ledger excerpt to seq {report['head_seq']}\n"
        f"the other site checks it with: appliance verify {target.name} --root-key ROOT.pub.pem (this site's root key: `appliance keys export-public`)",
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a bundle offline (no home needed) against a root key you already trust: files, signatures, provenance, ledger excerpt."""
    from keys.keystore import load_public_key
    from registry.bundle import verify_bundle

    newer = Path(args.trust_store) if args.trust_store else None
    report = verify_bundle(Path(args.bundle), load_public_key(Path(args.root_key)), root_source=f"the pinned root key {args.root_key}", trust_store=newer)
    m = report["model"]
    emit(
        args,
        {k: v for k, v in report.items() if k != "statement"},
        f"bundle OK: {m['name']}:{m['version']} ({m['kind']}, {m['digest']})\n"
        f"  release key {report['release_key_id'][:16]}… of the trust store signed by root {report['root_key_id'][:16]}… (pinned)\n"
        f"  {report['files']} files as signed; model-signing signature verifies; provenance names this model and {report['dependencies']} dependencies,"
        f" each recorded in the ledger excerpt, whose chain and signed head (seq {report['head_seq']}) verify"
        + (f"\n  notice from the exporting site: {report['exporter']['notice']}" if (report.get("exporter") or {}).get("notice") else ""),
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Import a model another site exported: verified first against the origin's root key you give, refused as a replay if not newer."""
    from appliance.cli.common import read_key_pems

    pem = read_key_pems([args.root_key])[0]
    newer = read_key_pems([args.trust_store])[0] if args.trust_store else None
    with connect(args) as client:
        r = client.call("bundle.receive", path=str(Path(args.bundle).resolve()), root_key=pem, trust_store=newer)
    emit(
        args,
        r,
        f"imported {r['name']} (version {r['origin_version']} at its origin) as {r['digest'][:16]}…, from the site of root key {r['origin_root_key_id'][:16]}…\n"
        f"use it as a fine-tuning base: [finetune] base = \"{r['store_path']}\" (its model.sig is the origin's node key's)",
    )
    return 0


def register(sub: Any, add: Any) -> None:
    p = add("export", cmd_export)
    p.add_argument("model", help="NAME:VERSION, NAME@TAG, NAME (latest) or a digest prefix")
    p.add_argument("--to", help="new folder for the bundle")
    p.add_argument("--tar", help="new file: the bundle as one tar (for a USB stick)")
    p.add_argument("--approval", help="your approved request (`appliance request model.export MODEL`), where the policy asks for one")
    p = add("import", cmd_import)
    p.add_argument("bundle", help="bundle folder or .tar from another site")
    p.add_argument("--root-key", required=True, help="the origin site's root public key, obtained out of band")
    p.add_argument("--trust-store", help="the origin's newer trust store, if you have it")
    p = add("verify", cmd_verify)
    p.add_argument("bundle", help="bundle folder or .tar")
    p.add_argument("--root-key", required=True, help="the exporting site's root public key, obtained out of band (never the one inside the bundle)")
    p.add_argument("--trust-store", help="the exporting site's newer trust store, if you have it: keys revoked since the export are refused")
