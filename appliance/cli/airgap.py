"""`appliance airgap check`: is this machine air-gapped, and do jobs run behind the guard?"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from appliance.cli.common import connect, emit, note


def job_probe() -> dict[str, Any] | None:
    """What a real job process sees: started as the job runner starts jobs (its environment, airgap.run)."""
    from appliance.jobs.launch import LaunchOptions
    from appliance.jobs.runner import job_env

    done = subprocess.run(
        [sys.executable, "-m", "airgap.run", "airgap.selftest"], env=job_env(LaunchOptions()), capture_output=True, text=True, timeout=120, check=False
    )
    try:
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return None


def cmd_airgap_check(args: argparse.Namespace) -> int:
    """Check the air gap: the egress guard in jobs (a real probe) and the service, hub switches, proxies, default route, packages."""
    from airgap.attest import environment_attestation
    from airgap.check import overall, verdicts

    service_guard = None
    if getattr(args, "socket", None) or os.environ.get("APPLIANCE_SOCKET"):
        with connect(args) as client:
            service_guard = bool(client.call("service.info").get("egress_guard"))
    att = environment_attestation()
    items = verdicts(att, job_probe(), service_guard)
    verdict = overall(items)
    width = max(len(i.name) for i in items)
    lines = [f"{i.verdict.upper():<5} {i.name:<{width}}  {i.detail}" + (f"\n      fix: {i.fix}" if i.fix else "") for i in items]
    emit(args, {"verdict": verdict, "items": [i.as_dict() for i in items], "attestation": att}, "\n".join(lines) + f"\nverdict: {verdict}")
    return 1 if verdict == "fail" else 0


def _pip_sources(args: argparse.Namespace) -> list[str]:
    out = ["--no-index"] if args.no_index else []
    for folder in args.find_links or []:
        out += ["--find-links", folder]
    if args.index_url:
        out += ["--index-url", args.index_url]
    for url in args.extra_index_url or []:
        out += ["--extra-index-url", url]
    return out


def cmd_airgap_lock(args: argparse.Namespace) -> int:
    """Write the hash-pinned lock (PEP 751 pylock.toml) for an install target, or --check it against pyproject.toml."""
    from airgap.lock import LockError, drift, load_lock, lock_path, make_lock

    path = Path(args.lock) if args.lock else lock_path(args.target)
    if args.check:
        lock = load_lock(path)
        problems = drift(lock)
        emit(
            args, {"lock": str(path), "packages": len(lock.packages), "drift": problems}, "\n".join([f"lock {path}: {len(lock.packages)} packages", *problems])
        )
        if problems:
            raise LockError(
                f"the lock {path.name} no longer matches pyproject.toml: {problems[0]}",
                "regenerate it: `appliance airgap lock` on a connected machine (pip >= 25.1), and commit it",
            )
        return 0
    note(f"locking {args.target} with pip lock (resolves through this machine's package sources)")
    written = make_lock(args.target, pip_args=_pip_sources(args), out=path, python=args.python)
    lock = load_lock(written)
    emit(args, {"lock": str(written), "packages": len(lock.packages)}, f"lock written: {written} ({len(lock.packages)} packages, target {lock.target.name})")
    return 0


def cmd_airgap_bundle(args: argparse.Namespace) -> int:
    """Build a signed offline wheel bundle (on a connected build machine): the lock's wheels, the appliance's, a manifest signed by a release key."""
    from airgap.bundle import build_bundle
    from airgap.lock import load_lock, lock_path
    from keys.keystore import load_key
    from keys.passphrase import read_passphrase

    lock = load_lock(Path(args.lock) if args.lock else lock_path(args.target))
    key = load_key(Path(args.key), read_passphrase(purpose=f"unlock the release key {args.key}"))
    m = build_bundle(
        Path(args.out),
        key,
        lock,
        pip_args=_pip_sources(args),
        source=Path(args.source) if args.source else None,
        appliance_wheel=Path(args.appliance_wheel) if args.appliance_wheel else None,
        only=args.only.split(",") if args.only else None,
        progress=note,
    )
    size = sum(w["size"] for w in m["wheels"])
    emit(
        args,
        {
            "bundle": args.out,
            "wheels": len(m["wheels"]),
            "bytes": size,
            "signer_key_id": m["signer_key_id"],
            "target": m["target"]["name"],
            "partial": m["partial"],
        },
        f"bundle {args.out}: {len(m['wheels'])} wheels ({size / 1e6:.1f} MB) for {m['target']['name']}{' (partial)' if m['partial'] else ''}, "
        f"signed by {m['signer_key_id'][:16]}…\n"
        f"on the head node: bash {args.out}/install.sh --key RELEASE.pub.pem {args.out} /opt/appliance/venv",
    )
    return 0


def cmd_airgap_verify(args: argparse.Namespace) -> int:
    """Check a wheel bundle as install.sh does: the manifest's signature by the release key, every wheel's sha256, nothing extra."""
    from airgap.bundle import verify_bundle
    from keys.keystore import load_public_key

    m = verify_bundle(Path(args.bundle), load_public_key(Path(args.key)), key_source=f"the release key {args.key}")
    size = sum(w["size"] for w in m["wheels"])
    emit(
        args,
        {
            "bundle": args.bundle,
            "ok": True,
            "wheels": len(m["wheels"]),
            "bytes": size,
            "target": m["target"],
            "signer_key_id": m["signer_key_id"],
            "partial": m["partial"],
        },
        f"bundle OK: {len(m['wheels'])} wheels ({size / 1e6:.1f} MB) for {m['target']['name']}, signature by {m['signer_key_id'][:16]}…, every sha256 matches, nothing extra",
    )
    return 0


def register(sub: Any, add: Any) -> None:
    group = sub.add_parser("airgap", help="the air gap: checks, locks, offline wheel bundles").add_subparsers(
        dest="airgap_command", required=True, metavar="COMMAND"
    )
    add("check", cmd_airgap_check, group)
    for name, fn in (("lock", cmd_airgap_lock), ("bundle", cmd_airgap_bundle)):
        p = add(name, fn, group)
        p.add_argument("--target", default="cpu-py311-manylinux_x86_64", help="the install target (locks/pylock.TARGET.toml)")
        p.add_argument("--lock", help="a lock file instead of the target's")
        p.add_argument("--find-links", action="append", metavar="DIR", help="a folder (or page) of wheels for pip (repeatable)")
        p.add_argument("--index-url", help="the package index pip uses instead of its configured one")
        p.add_argument("--extra-index-url", action="append", metavar="URL", help="another index (e.g. for a CUDA or CPU build of torch)")
        p.add_argument("--no-index", action="store_true", help="no index: only --find-links folders")
    p = group.choices["lock"]
    p.add_argument("--check", action="store_true", help="only check the lock against pyproject.toml (what CI runs)")
    p.add_argument("--python", help="the interpreter whose pip locks (pip >= 25.1; default: this one)")
    p = group.choices["bundle"]
    p.add_argument("--out", required=True, help="new folder for the bundle")
    p.add_argument(
        "--key", required=True, help="the release key file that signs the manifest (the home's keys/release.key, or one from `appliance keys create`)"
    )
    p.add_argument("--source", help="the appliance's source tree to build its wheel from (default: this one)")
    p.add_argument("--appliance-wheel", help="the appliance's wheel, already built")
    p.add_argument("--only", help="comma-separated distributions (sovereign-appliance for the appliance): a partial bundle that updates an install")
    p = add("verify", cmd_airgap_verify, group)
    p.add_argument("bundle", help="the bundle's folder")
    p.add_argument("--key", required=True, help="the release public key (PEM) of the site that built it")
