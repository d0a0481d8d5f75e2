"""`appliance keys init|list|export-public|rotate|revoke|create|add|release-init`: the keys the appliance trusts, by role."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from appliance.cli.common import connect, emit, note
from keys.errors import ApplianceError
from keys.files import atomic_write


def _short(key_id: str) -> str:
    return f"{key_id[:16]}…"


def cmd_keys_init(args: argparse.Namespace) -> int:
    """Give a home made before trust stores its root key and root-signed trust store (local, as the service user)."""
    from appliance.cli.common import home_of
    from appliance.service import Caller, Service
    from keys.passphrase import read_passphrase

    home = home_of(args)
    passphrase = read_passphrase(purpose=f"unlock the node key in {home.root}")
    root_id = Service.adopt_trust_store(home.root, passphrase, Caller.current())
    emit(
        args,
        {"home": str(home.root), "root_key_id": root_id, "trust_store": str(home.trust_file)},
        f"root key {root_id}\ntrust store {home.trust_file} (root, and the node key)\n"
        f"move {home.root_key_file} offline and install {home.root_public_key_file} as /etc/appliance/root.pub.pem (root-owned)",
    )
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """Replace the node key (local, as the service user, service stopped; needs the root key)."""
    from appliance.cli.common import home_of
    from appliance.service import Caller
    from appliance.service.rotation import rotate_node_key
    from keys.passphrase import read_passphrase

    home = home_of(args)
    r = rotate_node_key(home.root, read_passphrase(purpose=f"unlock the keys of {home.root}"), Path(args.root_key), Caller.current(), approval=args.approval)
    emit(
        args,
        r,
        f"node key {_short(r['old_key_id'])} valid until {r['at']}; node key {_short(r['new_key_id'])} signs from then on"
        f" (trust store version {r['trust_store_version']}); what the old key signed still verifies",
    )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke a key from now on (local, as the service user, service stopped; needs the root key)."""
    from appliance.cli.common import home_of
    from appliance.service import Caller, release
    from appliance.service.rotation import revoke_key
    from keys.passphrase import read_passphrase

    home = home_of(args)
    passphrase = read_passphrase(purpose=f"unlock the keys of {home.root}")
    r = revoke_key(home.root, passphrase, Path(args.root_key), Caller.current(), args.key_id, args.reason, approval=args.approval)
    emit(args, r, f"{r['role']} key {_short(r['key_id'])} revoked at {r['revoked_at']} (trust store version {r['trust_store_version']})")
    if r["role"] == "release" and release.holds(home, r["key_id"]):
        note(f"{home.release_key_file} holds it: the service refuses to start until `appliance keys release-init --root-key KEY` replaces it")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Make your own user key (for signing approvals), encrypted under a passphrase you choose; only its public half leaves your account."""
    from appliance.service.caller import Caller
    from keys.userkey import create_user_key

    key, path = create_user_key(Path(args.out) if args.out else None)
    pub = path.with_name(f"{path.stem}.pub.pem")
    emit(
        args,
        {"key_id": key.key_id, "key_file": str(path), "public_key": str(pub)},
        f"user key {key.key_id}\nprivate, encrypted: {path}\npublic: {pub}\n"
        f"give {pub} to an admin, who adds it under the root key: appliance keys add {pub} --owner {Caller.current().user} --root-key ROOT.key",
    )
    return 0


def cmd_keys_add(args: argparse.Namespace) -> int:
    """Add a user's (or a release) public key to the trust store, signed by the root key (as the service user; the service may be running)."""
    from appliance.cli.common import home_of
    from appliance.service.rotation import add_key
    from keys.passphrase import read_passphrase

    home = home_of(args)
    r = add_key(home.root, Path(args.root_key), read_passphrase(purpose=f"unlock the root key {args.root_key}"), Path(args.public_key), args.role, args.owner)
    emit(
        args,
        r,
        f"{r['role']} key {_short(r['key_id'])} of {r['owner']} added (trust store version {r['trust_store_version']}); "
        "the service records it on its next request",
    )
    return 0


def cmd_keys_release_init(args: argparse.Namespace) -> int:
    """Make the home's release key (signs exports) and trust it under the root key (local, as the service user; the service may be running)."""
    from appliance.cli.common import home_of
    from appliance.service.release import release_init
    from keys.passphrase import read_passphrase

    home = home_of(args)
    passphrase = read_passphrase(purpose=f"unlock the node key of {home.root} (the release key is kept under the same passphrase)")
    r = release_init(home.root, passphrase, Path(args.root_key), read_passphrase(purpose=f"unlock the root key {args.root_key}"))
    aside = f"\nthe retired release key was kept aside: {r['set_aside']}" if r["set_aside"] else ""
    emit(
        args,
        r,
        f"release key {r['key_id']}\nprivate, encrypted: {r['key_file']}\npublic: {r['public_key']}{aside}\n"
        f"trusted as role release (trust store version {r['trust_store_version']}); restart the service to sign with it",
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """The root-signed trust store: every key with its role, owner, validity and status."""
    with connect(args) as client:
        r = client.call("keys.list")
    lines = [
        f"trust store {r['trust_store']} (version {r['version']}, issued {r['issued_at']})",
        f"root key {r['root_key_id']} (anchor: {r['anchor']})",
        "",
        f"{'role':8} {'status':14} {'key id':18} {'owner':16} valid",
    ]
    for k in r["keys"]:
        window = f"from {k['not_before']}" + (f" until {k['not_after']}" if k["not_after"] else "")
        if k["revoked_at"]:
            window += f", revoked {k['revoked_at']}" + (f" ({k['revoked_reason']})" if k["revoked_reason"] else "")
        mark = " (this service)" if k["key_id"] == r["node_key_id"] else ""
        lines.append(f"{k['role']:8} {k['status']:14} {_short(k['key_id']):18} {k['owner']:16} {window}{mark}")
    emit(args, r, "\n".join(lines))
    return 0


def cmd_keys_export_public(args: argparse.Namespace) -> int:
    """Write the public keys of one role (valid now, or all with --all) as PEM, for a verifier elsewhere."""
    with connect(args) as client:
        r = client.call("keys.list")
    chosen = [k for k in r["keys"] if k["role"] == args.role and (args.all or k["status"] == "valid")]
    if not chosen:
        raise ApplianceError(f"the trust store holds no {'' if args.all else 'valid '}{args.role} key", "`appliance keys list` shows the keys and their roles")
    pem = "".join(k["public_key_pem"] for k in chosen).encode("ascii")
    if args.out:
        atomic_write(Path(args.out), pem, mode=0o644)
        note(f"{len(chosen)} {args.role} public key(s) written to {args.out}")
    else:
        print(pem.decode("ascii"), end="")
    return 0


def register(sub: Any, add: Any) -> None:
    keys = sub.add_parser("keys", help="the keys the appliance trusts (root-signed trust store)").add_subparsers(
        dest="keys_command", required=True, metavar="COMMAND"
    )
    add("init", cmd_keys_init, keys)
    add("list", cmd_keys_list, keys)
    p = add("rotate", cmd_keys_rotate, keys)
    p.add_argument("--root-key", required=True, help="the root key file (kept offline)")
    p.add_argument("--approval", help="your approved request (`appliance request keys.rotate node`), where the policy asks for one")
    p = add("revoke", cmd_keys_revoke, keys)
    p.add_argument("key_id", help="the key's id (at least 8 characters; `appliance keys list`)")
    p.add_argument("--reason", required=True, help="why (recorded with the key)")
    p.add_argument("--root-key", required=True, help="the root key file (kept offline)")
    p.add_argument("--approval", help="your approved request (`appliance request keys.revoke KEY`), where the policy asks for one")
    p = add("create", cmd_keys_create, keys)
    p.add_argument("--out", help="key file (default: $APPLIANCE_USER_KEY, else ~/.config/appliance/user.key)")
    p = add("add", cmd_keys_add, keys)
    p.add_argument("public_key", help="the public key PEM (user.pub.pem from `appliance keys create`)")
    p.add_argument("--role", choices=["user", "release"], default="user", help="user: signs approvals; release: signs exports")
    p.add_argument("--owner", required=True, help="who holds the private key: the Unix login for a user key")
    p.add_argument("--root-key", required=True, help="the root key file (kept offline)")
    p = add("release-init", cmd_keys_release_init, keys)
    p.add_argument("--root-key", required=True, help="the root key file (kept offline)")
    p = add("export-public", cmd_keys_export_public, keys)
    p.add_argument("--role", choices=["root", "node", "release", "user"], default="root", help="which role's keys (default: root, the anchor)")
    p.add_argument("--all", action="store_true", help="also keys rotated out or revoked (they verify what they signed while valid)")
    p.add_argument("--out", help="write the PEM here (default: standard output)")
