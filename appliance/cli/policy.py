"""`appliance policy show|check|sign|diff|update`: the access policy, signed by the root key."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from appliance.cli.common import connect, emit, note
from keys.errors import ApplianceError
from keys.files import atomic_write


def _read(path: str, what: str = "policy") -> str:
    # Bytes, then decoded: text mode would turn CRLF into LF, and the digest would no longer be the signed file's.
    try:
        return Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ApplianceError(f"cannot read the {what} {path}: {exc}", "pass a UTF-8 TOML file you can read") from None


def cmd_policy_show(args: argparse.Namespace) -> int:
    """The policy in force: roles × permissions, who holds which role, and your roles."""
    with connect(args) as client:
        r = client.call("policy.show")
    lines = [f"policy {r['name']} v{r['version']} (sha256 {r['digest'][:16]}…, {r['file']})", "", "role × permissions:"]
    lines += [f"  {role:16} {', '.join(perms) or '-'}" for role, perms in r["table"]]
    lines += ["", "bindings:"]
    lines += [f"  user {u:12} {', '.join(roles)}" for u, roles in sorted(r["users"].items())]
    lines += [f"  group {g:11} {', '.join(roles)}" for g, roles in sorted(r["groups"].items())]
    lines += ["", f"your roles: {', '.join(r['your_roles'])}"]
    emit(args, r, "\n".join(lines))
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Every problem of a policy file at once (no service needed)."""
    from policies.policy import policy_problems

    problems = policy_problems(_read(args.file), source=args.file)
    if args.json:
        import json

        print(json.dumps({"file": args.file, "problems": problems}, indent=2))
    elif problems:
        print(f"{args.file}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
    else:
        print(f"{args.file}: no problems")
    return 2 if problems else 0


def cmd_policy_sign(args: argparse.Namespace) -> int:
    """Sign a policy file with the root key (kept offline: give its path); writes FILE.sig."""
    from keys.keystore import load_key
    from keys.passphrase import read_passphrase
    from policies.signature import sign_policy

    raw = _read(args.file).encode("utf-8")
    root = load_key(Path(args.root_key), read_passphrase(purpose=f"unlock the root key {args.root_key}"))
    out = Path(args.out or f"{args.file}.sig")
    atomic_write(out, sign_policy(raw, root), mode=0o644)
    note(f"signed {args.file} with root key {root.key_id[:16]}…: {out}")
    return 0


def _current_and_new(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    from policies.policy import parse_policy

    with connect(args) as client:
        r = client.call("policy.show")
    return parse_policy(r["text"], source=r["file"]), parse_policy(_read(args.file), source=args.file), r


def cmd_policy_diff(args: argparse.Namespace) -> int:
    """What a policy file would change against the policy in force."""
    from policies.policy import policy_diff

    current, new, r = _current_and_new(args)
    changes = policy_diff(current, new)
    emit(args, {"from": r["digest"], "changes": changes}, "\n".join(changes) if changes else "no changes")
    return 0


def cmd_policy_update(args: argparse.Namespace) -> int:
    """Install a root-signed policy file (FILE.sig beside it, or --signature)."""
    text = _read(args.file)
    sig_path = Path(args.signature or f"{args.file}.sig")
    signature = _read(str(sig_path), "policy signature") if sig_path.exists() else None
    with connect(args) as client:
        r = client.call("policy.update", text=text, signature=signature)
    if r.get("requested"):
        from appliance.cli.approvals import describe

        req = r["request"]
        emit(args, r, f"{describe(req)}\nthe policy is installed when a second person approves: appliance approve {req['id']}")
        return 0
    emit(args, r, f"policy {r['name']} v{r['version']} in force (sha256 {r['digest'][:16]}…)\n" + "\n".join(r["changes"]))
    return 0


def register(sub: Any, add: Any) -> None:
    policy = sub.add_parser("policy", help="the access policy (roles, permissions, bindings), signed by the root key").add_subparsers(
        dest="policy_command", required=True, metavar="COMMAND"
    )
    add("show", cmd_policy_show, policy)
    p = add("check", cmd_policy_check, policy)
    p.add_argument("file", help="policy TOML file")
    p = add("sign", cmd_policy_sign, policy)
    p.add_argument("file", help="policy TOML file")
    p.add_argument("--root-key", required=True, help="the root key file (kept offline)")
    p.add_argument("--out", help="signature file (default FILE.sig)")
    p = add("diff", cmd_policy_diff, policy)
    p.add_argument("file", help="policy TOML file")
    p = add("update", cmd_policy_update, policy)
    p.add_argument("file", help="policy TOML file, signed")
    p.add_argument("--signature", help="its signature (default FILE.sig)")
