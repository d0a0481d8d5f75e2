"""Two-person approvals: request, decide (signed by the approver's user key), then execute.

An action whose permission carries a two-person rule in the policy runs only after a second
person approves it. Every step is a ledger event keyed by the request id, and the ledger is
the only place the state lives (so a restarted service, or an auditor's SQL, sees the same):

- ``approval.requested``: who asked (uid, user, groups), the action, the subject, the digest
  of the request's parameters, and when it expires (default 24 h);
- ``approval.refused``: an attempt to decide it that was refused (own request, no approver
  role, a bad or replayed signature, expired) and why;
- ``approval.approved`` / ``approval.denied``: the decision, the approver, the user key and
  the signed statement, so anyone can check the signature again later;
- ``approval.executed`` / ``approval.failed``: the action was carried out (once), or failed.

Actions the service can carry out alone (``policy.update``: the request holds the signed
policy) run as soon as they are approved. The others are used by the requester, once, by
running the action again with ``--approval ID`` (``model export``, whose bundle goes to the
requester; ``keys rotate`` / ``keys revoke``, which need the root key and the service stopped).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import threading
from typing import Any

from appliance.service.caller import Caller
from keys.approval import ApprovalSignatureError, check_statement, statement
from keys.errors import ApplianceError
from keys.truststore import UntrustedKeyError, canonical, parse_time
from pipeline.errors import ConfigError
from policies.errors import ApprovalError

# action -> who carries it out once approved: the service at once, or the requester with --approval.
REQUESTABLE = {"model.export": "requester", "data.purge": "requester", "keys.rotate": "requester", "keys.revoke": "requester", "policy.update": "service"}
DEFAULT_TTL_S = 24 * 3600
MAX_TTL_S = 7 * 24 * 3600
MIN_TTL_S = 60
LOCK = threading.Lock()  # one decision or use of a request at a time


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def subject_of(action: str, raw: str) -> str:
    """The subject as the action's own authorization names it (so a request and its use match exactly)."""
    if action == "keys.rotate":
        return "node key"
    if action == "keys.revoke":
        return raw if raw.startswith("key ") else f"key {raw}"
    if action == "policy.update":
        return "policy"
    return raw


def request_command(action: str, subject: str) -> str:
    """The command that requests ``action`` on ``subject`` (as its authorization names it)."""
    if action == "policy.update":
        return "appliance policy update FILE"
    shown = {"keys.rotate": "node", "keys.revoke": subject.removeprefix("key ")}.get(action, subject)
    if " " in shown:
        shown = f"'{shown}'"
    return f"appliance request {action} {shown}"


def how_to_use(req: dict[str, Any]) -> str:
    """The command that uses an approved request."""
    rid, action = req["id"], req["action"]
    if action == "model.export":
        return f"appliance export {req['subject']} --approval {rid} --to DIR"
    if action == "keys.rotate":
        return f"appliance keys rotate --root-key ROOT.key --approval {rid}"
    if action == "data.purge":
        target, _, also = req["subject"].partition(" also=")
        return f"appliance purge {target}" + "".join(f" --also {a}" for a in also.split(",") if a) + f" --approval {rid} --confirm"
    if action == "keys.revoke":
        return f"appliance keys revoke {req['subject'].removeprefix('key ')} --reason ... --root-key ROOT.key --approval {rid}"
    return "nothing: the service carries it out when it is approved"


# -- state, read back from the ledger ----------------------------------------------------


def _events(svc: Any, rid: str) -> list[tuple[str, str, dict[str, Any]]]:
    rows = svc.ledger.select(
        "SELECT ts, kind, body FROM events WHERE kind LIKE 'approval.%' AND body ->> '$.data.id' = ? ORDER BY seq",
        [rid],
    )
    return [(str(ts), str(kind), json.loads(body)["data"]) for ts, kind, body in rows]


def state(svc: Any, rid: str) -> dict[str, Any]:
    """The request ``rid`` and where it stands: pending, approved, denied, executed, failed or expired."""
    events = _events(svc, rid)
    if not events or events[0][1] != "approval.requested":
        raise ApprovalError(f"there is no request {rid!r}", "`appliance approvals list` shows the requests you made or may decide")
    req = dict(events[0][2])
    req.pop("params", None)  # may be large (a policy); its digest stands for it
    req.update(status="pending", decided_by=None, decided_at=None, executed_at=None, error=None, refusals=0)
    for ts, kind, data in events[1:]:
        if kind in ("approval.approved", "approval.denied"):
            req.update(status="approved" if kind == "approval.approved" else "denied", decided_by=data["by"]["user"], decided_at=ts)
        elif kind == "approval.executed":
            req.update(status="executed", executed_at=ts)
        elif kind == "approval.failed":
            req.update(status="failed", error=data.get("error"))
        elif kind == "approval.refused":
            req["refusals"] += 1
    if req["status"] in ("pending", "approved") and _now() >= parse_time(req["expires_at"]):
        req["status"] = "expired"
    req["use"] = how_to_use(req) if req["status"] == "approved" else None
    return req


def _params(svc: Any, rid: str) -> dict[str, Any]:
    return dict(_events(svc, rid)[0][2].get("params") or {})


# -- operations ---------------------------------------------------------------------------


def op_request(svc: Any, caller: Caller, *, action: str, subject: str, reason: str | None = None, ttl_s: int | None = None) -> dict[str, Any]:
    """`appliance request ACTION SUBJECT`: ask for a second person's approval of an action."""
    if action == "policy.update":
        raise ConfigError("a policy update is requested with the policy itself", "run `appliance policy update FILE`: it opens the request")
    return open_request(svc, caller, action, subject, {}, reason=reason, ttl_s=ttl_s)


def open_request(
    svc: Any, caller: Caller, action: str, subject: str, params: dict[str, Any], *, reason: str | None, ttl_s: int | None, authorized: bool = False
) -> dict[str, Any]:
    """Record a request by ``caller`` (who must hold the action's permission) for a second person to decide.

    ``authorized``: the caller's operation has already authorized the request (one decision per call).
    """
    if action not in REQUESTABLE:
        raise ConfigError(f"{action!r} is not an action that is requested for approval", f"the actions are: {', '.join(sorted(REQUESTABLE))}")
    ttl = DEFAULT_TTL_S if ttl_s is None else ttl_s
    if not MIN_TTL_S <= ttl <= MAX_TTL_S:
        raise ConfigError(f"expiry {ttl} s is outside {MIN_TTL_S} s to {MAX_TTL_S // 3600} h", "pass e.g. --expires 24h")
    subject = subject_of(action, subject)
    if not authorized:
        svc.authorize(caller, action, subject, requesting=True)
    rule = svc.policy.two_person(_permission(action))
    if rule is None:
        raise ConfigError(f"the policy in force needs no second person for {action}", "run the action itself; nothing to request")
    extra = _check_subject(svc, action, subject)
    now = _now()
    rid = f"req-{secrets.token_hex(6)}"
    data = {
        "id": rid,
        "action": action,
        "subject": subject,
        "permission": rule.permission,
        "approvers": list(rule.approvers),
        "params_digest": hashlib.sha256(canonical(params)).hexdigest(),
        "requester": caller.as_record(),
        "requested_at": now.isoformat(),
        "expires_at": (now + dt.timedelta(seconds=ttl)).isoformat(),
        "node_key_id": svc.key.key_id,
        "reason": (reason or "").strip(),
        "policy_digest": svc.policy.digest,
        **extra,
        "params": params,
    }
    svc.ledger.append("approval.requested", caller.user, data)
    return state(svc, rid)


def op_list(svc: Any, caller: Caller, *, all: bool = False) -> list[dict[str, Any]]:  # noqa: A002 (the CLI's --all)
    """The requests the caller made, and the pending ones the caller may decide (``all``: every request, for approvers and auditors)."""
    svc.authorize(caller, "approvals.list", "approvals")
    rows = svc.ledger.select("SELECT body ->> '$.data.id' FROM events WHERE kind = 'approval.requested' ORDER BY seq")
    out = []
    may_see_all = "ledger.query" in svc.policy.permissions_of(caller.user, caller.groups)
    for (rid,) in rows:
        req = state(svc, str(rid))
        mine = req["requester"]["user"] == caller.user
        decidable = req["status"] == "pending" and not mine and svc.policy.may_approve(caller.user, caller.groups, req["permission"])
        if mine or decidable or (all and may_see_all):
            out.append({**req, "you_may_decide": decidable})
    return out


def op_show(svc: Any, caller: Caller, *, id: str) -> dict[str, Any]:  # noqa: A002 (the path's name)
    """One request: what it asks, who asked, its state, and what an approver signs."""
    svc.authorize(caller, "approvals.list", f"request {id}")
    req = state(svc, id)
    held = svc.policy.permissions_of(caller.user, caller.groups)
    # Its requester, anyone who decides requests (whether this one is theirs to decide is checked
    # when they do), and auditors.
    if req["requester"]["user"] != caller.user and "approvals.decide" not in held and "ledger.query" not in held:
        raise ApprovalError(
            f"request {id} is not yours, and {caller.user} decides no requests: {req['permission']} is approved by {' or '.join(req['approvers'])}",
            "ask its requester or an approver",
        )
    if req["action"] == "policy.update" and req["status"] == "pending":
        req["policy_text"] = _params(svc, id).get("text", "")  # an approver reads what they approve
    return req


def op_decide(svc: Any, caller: Caller, *, id: str, statement: dict[str, Any], signature: str) -> dict[str, Any]:  # noqa: A002
    """Approve or deny a request with a statement signed by the caller's user key."""
    svc.authorize(caller, "approvals.decide", f"request {id}")
    with LOCK:
        req = state(svc, id)

        def refuse(message: str, hint: str) -> ApprovalError:
            svc.ledger.append("approval.refused", caller.user, {"id": id, "by": caller.as_record(), "reason": message})
            return ApprovalError(message, hint)

        if req["status"] != "pending":
            raise refuse(f"request {id} is {req['status']}, not waiting for a decision", "a request is decided once; ask its requester to request again")
        if req["requester"]["user"] == caller.user:
            raise refuse(
                f"{caller.user} made request {id} and may not decide it: nobody approves their own request",
                f"ask another holder of {' or '.join(req['approvers'])}",
            )
        if not svc.policy.may_approve(caller.user, caller.groups, req["permission"]):
            roles = ", ".join(r for r in svc.policy.roles_of(caller.user, caller.groups)) or "none"
            raise refuse(
                f"{caller.user} may not decide request {id}: {req['permission']} is approved by {' or '.join(req['approvers'])} with approvals.decide; {caller.user} holds {roles}",
                f"ask a holder of {' or '.join(req['approvers'])}",
            )
        decision = statement.get("decision") if isinstance(statement, dict) else None
        expected = _expected(req, caller, decision)
        try:
            entry = check_statement(statement, signature, svc.trust, approver=caller.user, expected=expected)
        except (ApprovalSignatureError, UntrustedKeyError) as exc:
            raise refuse(exc.message, exc.hint) from None
        kind = "approval.approved" if decision == "approve" else "approval.denied"
        svc.ledger.append(kind, caller.user, {"id": id, "by": caller.as_record(), "key_id": entry.key_id, "statement": statement, "signature": signature})
    result = state(svc, id)
    if kind == "approval.approved" and REQUESTABLE[req["action"]] == "service":
        result["outcome"] = _execute(svc, id, req)
        result = {**state(svc, id), "outcome": result["outcome"]}
    return result


def _expected(req: dict[str, Any], caller: Caller, decision: Any) -> dict[str, Any]:
    body = statement(req, decision=decision if decision in ("approve", "deny") else "approve", approver=caller.user, key_id="", signed_at="")
    return body


def _execute(svc: Any, rid: str, req: dict[str, Any]) -> dict[str, Any]:
    """Carry out an approved request the service can do alone, as its requester; record the outcome.

    It goes through the same authorization as a requester's own use (the requester must still
    hold the permission; the use is recorded once), with the identity recorded at request time.
    """
    from appliance.service.policy_ops import install_policy

    params = _params(svc, rid)
    who = req["requester"]
    requester = Caller(uid=int(who["uid"]), user=str(who["user"]), gids=(), groups=tuple(who["groups"]), pid=None)
    try:
        svc.authorize(requester, req["action"], req["subject"], approval=rid)
        done = install_policy(svc, requester, text=params["text"], signature=params.get("signature"))
    except ApplianceError as exc:
        svc.ledger.append("approval.failed", requester.user, {"id": rid, "error": exc.message})
        return {"executed": False, "error": exc.message, "hint": exc.hint}
    return {"executed": True, **done}


def redeem(svc: Any, caller: Caller, rid: str, action: str, subject: str) -> dict[str, Any]:
    """The approved request ``rid`` if ``caller`` may use it now for ``action`` on ``subject``; else ApprovalError.

    Called by the service's authorization, under LOCK, which then records the use.
    """
    req = state(svc, rid)
    if req["action"] != action or req["subject"] != subject:
        raise ApprovalError(
            f"request {rid} approved {req['action']} on {req['subject']!r}, not {action} on {subject!r}",
            "an approval is for the one action and subject it names: request this one",
        )
    if req["requester"]["user"] != caller.user:
        raise ApprovalError(f"request {rid} was made by {req['requester']['user']}; only they may use it", "request it yourself")
    status = req["status"]
    if status == "approved":
        return req
    why = {
        "pending": "is still waiting for a second person's decision",
        "denied": f"was denied by {req['decided_by']}",
        "executed": f"was already used at {req['executed_at']} (an approval is used once)",
        "failed": "was used and failed",
        "expired": f"expired at {req['expires_at']} before it was used",
    }[status]
    raise ApprovalError(f"request {rid} {why}", f"request it again: `{request_command(action, subject)}`")


def _permission(action: str) -> str:
    from policies.policy import ACTION_PERMISSION

    return ACTION_PERMISSION[action]


def _check_subject(svc: Any, action: str, subject: str) -> dict[str, Any]:
    """Refuse a request whose subject does not exist now (no approval is asked for nothing)."""
    if action == "model.export":
        from appliance.service.registry_ops import resolve_model

        row = resolve_model(svc, subject)  # NAME:VERSION, NAME@TAG, NAME, or a digest prefix
        return {"model_digest": row["digest"], "model": f"{row['name']}:{row['version']}"}
    if action == "data.purge":
        from appliance.service.purge import plan, split_subject

        target, also = split_subject(subject)
        p = plan(svc, target, also)
        # The approver sees what will be erased and what stays marked; the use re-plans and must match.
        return {"purge": sorted(a["digest"] for a in p.purge), "keep": sorted(a["digest"] for a in p.keep), "label": p.label}
    if action == "keys.revoke":
        wanted = subject.removeprefix("key ")
        found = [e for e in svc.trust.entries if e.key_id.startswith(wanted)] if len(wanted) >= 8 else []
        if len(found) != 1:
            raise ConfigError(
                f"{wanted!r} names {'no' if not found else 'more than one'} key of the trust store",
                "give at least 8 characters of a key id from `appliance keys list`",
            )
        return {"key_role": found[0].role, "key_owner": found[0].owner}
    return {}
