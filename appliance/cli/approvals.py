"""`appliance request | approvals list|show | approve | deny`: the two-person rule from the command line.

The approver's decision is signed here, in the approver's own process, with their user key
(`appliance keys create`): the service receives the signed statement, never the key.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from appliance.cli.common import connect, emit
from pipeline.errors import ConfigError

_DURATION = re.compile(r"(\d+)\s*([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90m``, ``24h``, ``2d``, ``3600`` (seconds) -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"--expires {text!r} is not a duration", "write e.g. 30m, 24h or 2d")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def describe(r: dict[str, Any]) -> str:
    who = r["requester"]["user"]
    lines = [
        f"request {r['id']}: {r['action']} {r['subject']}  [{r['status']}]",
        f"  asked by {who} at {r['requested_at']}, expires {r['expires_at']}" + (f" — {r['reason']}" if r.get("reason") else ""),
        f"  approvers: {' or '.join(r['approvers'])} (not {who})",
    ]
    if r.get("model_digest"):
        lines.append(f"  model {r['model_digest']}")
    if r.get("purge") is not None:
        # What the approver agrees to erase, as planned when it was asked (the purge re-plans and must match).
        lines.append(
            f"  erases {len(r['purge'])} artifact(s) of {r.get('label', r['subject'])}; keeps {len(r.get('keep') or [])} marked 'derived from purged data'"
        )
        lines += [f"    erase {d}" for d in r["purge"]]
        lines.append("  the full impact: `appliance purge " + r["subject"].split(" also=")[0] + "` (changes nothing)")
    if r.get("decided_by"):
        lines.append(f"  {r['status'] if r['status'] in ('approved', 'denied') else 'decided'} by {r['decided_by']} at {r['decided_at']}")
    if r.get("error"):
        lines.append(f"  failed: {r['error']}")
    if r.get("use"):
        lines.append(f"  use it: {r['use']}")
    return "\n".join(lines)


def cmd_request(args: argparse.Namespace) -> int:
    """Ask a second person to approve an action under a two-person rule (model.export, data.purge, keys.rotate, keys.revoke)."""
    with connect(args) as client:
        r = client.call("approvals.request", action=args.action, subject=args.subject, reason=args.reason, ttl_s=parse_duration(args.expires))
    emit(args, r, describe(r) + f"\nask one of them to run: appliance approve {r['id']}")
    return 0


def cmd_approvals_list(args: argparse.Namespace) -> int:
    """Your requests, and the pending ones you may decide."""
    with connect(args) as client:
        rows = client.call("approvals.list", all=bool(args.all))
    text = "\n".join(describe(r) + ("\n  you may decide it: appliance approve|deny " + r["id"] if r["you_may_decide"] else "") for r in rows)
    emit(args, rows, text or "no requests of yours, and none waiting for you")
    return 0


def cmd_approvals_show(args: argparse.Namespace) -> int:
    """One request: what it asks, who asked, where it stands (a policy update shows the policy)."""
    with connect(args) as client:
        r = client.call("approvals.show", id=args.id)
    text = describe(r) + (f"\n\n{r['policy_text']}" if r.get("policy_text") else "")
    emit(args, r, text)
    return 0


def _decide(args: argparse.Namespace, decision: str) -> int:
    import datetime as dt

    from appliance.service.caller import Caller
    from keys.approval import sign_statement, statement
    from keys.userkey import load_user_key

    with connect(args) as client:
        req = client.call("approvals.show", id=args.id)
        key = load_user_key(Path(args.key) if args.key else None)
        body = statement(req, decision=decision, approver=Caller.current().user, key_id=key.key_id, signed_at=dt.datetime.now(dt.UTC).isoformat())
        r = client.call("approvals.decide", id=args.id, statement=body, signature=sign_statement(body, key))
    text = describe(r)
    outcome = r.get("outcome")
    if outcome:
        text += "\n" + (
            f"carried out: policy {outcome['name']} v{outcome['version']} in force" if outcome["executed"] else f"approved, but it failed: {outcome['error']}"
        )
    elif r["status"] == "approved":
        text += f"\n{r['requester']['user']} may now use it"
    emit(args, r, text)
    return 0 if not outcome or outcome["executed"] else 2


def cmd_approve(args: argparse.Namespace) -> int:
    """Approve a request, signed with your user key (never your own request)."""
    return _decide(args, "approve")


def cmd_deny(args: argparse.Namespace) -> int:
    """Deny a request, signed with your user key."""
    return _decide(args, "deny")


def register(sub: Any, add: Any) -> None:
    p = add("request", cmd_request)
    p.add_argument("action", help="model.export, data.purge, keys.rotate or keys.revoke (a policy update is requested by `appliance policy update`)")
    p.add_argument(
        "subject",
        help="the model (digest or prefix); for data.purge the purge's target, quoted with its choices ('run:RUN also=all'); `node` for keys.rotate; the key id for keys.revoke",
    )
    p.add_argument("--reason", help="why: shown to the approvers and recorded")
    p.add_argument("--expires", default="24h", help="how long the request stays open, approved or not (default 24h, at most 7d)")
    approvals = sub.add_parser("approvals", help="requests under two-person rules").add_subparsers(dest="approvals_command", required=True, metavar="COMMAND")
    p = add("list", cmd_approvals_list, approvals)
    p.add_argument("--all", action="store_true", help="every request (for those who may query the ledger)")
    p = add("show", cmd_approvals_show, approvals)
    p.add_argument("id", help="the request id (req-…)")
    for name, fn in (("approve", cmd_approve), ("deny", cmd_deny)):
        p = add(name, fn)
        p.add_argument("id", help="the request id (req-…)")
        p.add_argument("--key", help="your user key file (default: $APPLIANCE_USER_KEY, else ~/.config/appliance/user.key)")
