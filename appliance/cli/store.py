"""`appliance artifact list|verify` and `appliance model list|export|verify`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from appliance.cli.common import connect, emit, home_of, read_key_pems


def _listing(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    lines = [f"{r['digest']}  {r['kind']:<15} {r['size_bytes']:>12}  {r['name']}" for r in rows]
    emit(args, rows, "\n".join(lines) if lines else "nothing recorded yet")


def cmd_artifact_list(args: argparse.Namespace) -> int:
    """List recorded artifacts (optionally of one kind)."""
    with connect(args) as client:
        _listing(args, client.call("artifact.list", kind=args.kind))
    return 0


def cmd_artifact_verify(args: argparse.Namespace) -> int:
    """Check a stored artifact against its digest, its signature and its ledger record."""
    with connect(args) as client:
        r = client.call("artifact.verify", digest=args.digest, trusted_keys=read_key_pems(args.trusted_key) or None)
    if r.get("purged"):
        emit(args, r, f"{r['message']} ({r['kind']} {r['name']}): its bytes are erased by design; its ledger rows stay")
        return 0
    emit(
        args,
        r,
        f"artifact {r['digest']} OK: content matches its digest, its signature file verifies, "
        f"and it is recorded at ledger seq {r['seq']} ({r['kind']} {r['name']})",
    )
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    """List packaged, signed models."""
    with connect(args) as client:
        _listing(args, client.call("model.list"))
    return 0


def cmd_model_export(args: argparse.Namespace) -> int:
    """Export a signed model (with the public key that verifies it) into a new folder for another site."""
    from appliance.server.client import unpack_export
    from registry.modelsig import verify_model_dir

    out = Path(args.out).resolve()
    with connect(args) as client:
        unpack_export(client.stream("model.export", model=args.model, approval=args.approval), out)
    # Checked again on arrival, with the standard tool's rules, before we say it is done.
    verify_model_dir(out / "model", out / "signer.pub.pem")
    command = f"model_signing verify key {out}/model --signature {out}/model/model.sig --public_key {out}/signer.pub.pem"
    emit(args, {"model": args.model, "path": str(out), "verify": command}, f"exported {args.model} to {out}\nverify with:\n  {command}")
    return 0


def cmd_model_verify(args: argparse.Namespace) -> int:
    """Verify a model directory's model-signing signature (offline; names the file that differs)."""
    from registry.modelsig import verify_model_dir

    model_dir = Path(args.dir)
    beside = model_dir.parent / "signer.pub.pem"  # where `model export` puts it
    if args.public_key:
        key = Path(args.public_key)
    else:
        key = beside if beside.is_file() else home_of(args).public_key_file
    verify_model_dir(model_dir, key)
    emit(args, {"ok": True, "model": str(model_dir), "public_key": str(key)}, f"model {model_dir} OK: signature by {key} verifies every file")
    return 0


def register(sub: Any, add: Any) -> None:
    art = sub.add_parser("artifact", help="list and verify stored artifacts").add_subparsers(dest="artifact_command", required=True, metavar="COMMAND")
    p = add("list", cmd_artifact_list, art)
    p.add_argument("--kind", help="only this kind (source, dataset, tokenizer, token-shards, checkpoint, model, …)")
    p = add("verify", cmd_artifact_verify, art)
    p.add_argument("digest", help="digest or unique prefix")
    p.add_argument("--trusted-key", action="append", default=[], help="public key PEM to trust")

    model = sub.add_parser("model", help="list, export and verify signed models").add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    add("list", cmd_model_list, model)
    p = add("export", cmd_model_export, model)
    p.add_argument("model", help="model digest or unique prefix")
    p.add_argument("--out", required=True, help="new folder for the bundle")
    p.add_argument("--approval", help="your approved request (`appliance request model.export MODEL`), where the policy asks for one")
    p = add("verify", cmd_model_verify, model)
    p.add_argument("dir", help="model directory holding model.sig")
    p.add_argument("--public-key", help="signer's public key PEM (default: signer.pub.pem beside the dir, else the home's)")
