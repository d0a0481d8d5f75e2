"""Signed approval decisions: what an approver's user key signs, and how the service checks it.

A decision on a request under a two-person rule is a small statement (request id, action,
subject, the digest of the request's parameters, requester, expiry, the appliance's node key,
approve or deny) signed by the approver's *user* key on the approver's own machine account:
the private key never reaches the service. The service checks the signature against the
root-signed trust store (a user key, owned by the caller the kernel named, valid now) and
then that every field matches the request it is offered for, so a decision signed for one
request, subject or appliance cannot be replayed on another.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from keys.errors import SigningError
from keys.keystore import NodeKey, verify_signature
from keys.truststore import TrustEntry, TrustStore, canonical

FORMAT = "appliance-approval/v1"
_DOMAIN = b"appliance-approval/v1\n"
DECISIONS = ("approve", "deny")
# The fields a statement carries, all of them bound by the signature.
FIELDS = ("format", "request", "decision", "action", "subject", "params_digest", "requester", "expires_at", "node_key_id", "approver", "key_id", "signed_at")


class ApprovalSignatureError(SigningError):
    """A signed decision is malformed, forged, by an untrusted key, or made for another request."""


def statement(request: dict[str, Any], *, decision: str, approver: str, key_id: str, signed_at: str) -> dict[str, Any]:
    """The statement an approver signs for ``request`` (as the service shows it: approvals.show)."""
    if decision not in DECISIONS:
        raise ApprovalSignatureError(f"decision {decision!r} is not one of {', '.join(DECISIONS)}", "approve or deny")
    return {
        "format": FORMAT,
        "request": request["id"],
        "decision": decision,
        "action": request["action"],
        "subject": request["subject"],
        "params_digest": request["params_digest"],
        "requester": request["requester"]["user"],
        "expires_at": request["expires_at"],
        "node_key_id": request["node_key_id"],
        "approver": approver,
        "key_id": key_id,
        "signed_at": signed_at,
    }


def sign_statement(body: dict[str, Any], key: NodeKey) -> str:
    """The base64 signature of ``body`` by ``key`` (the approver's user key)."""
    if body.get("key_id") != key.key_id:
        raise ApprovalSignatureError(
            f"the statement names key {str(body.get('key_id'))[:16]}…, not the signing key {key.key_id[:16]}…", "report this: it is a bug"
        )
    return base64.b64encode(key.sign(_DOMAIN + canonical(body))).decode("ascii")


def check_statement(body: Any, signature: Any, trust: TrustStore, *, approver: str, expected: dict[str, Any], at: str | None = None) -> TrustEntry:
    """Check a signed decision by ``approver`` on the request ``expected`` (the statement the service built).

    The key must be a user key of the root-signed trust store, owned by ``approver`` and valid
    now; the signature must verify; every field but ``decision``, ``key_id`` and ``signed_at``
    must equal the request's. ``at``: check the key as of then (an auditor re-checking a decision
    recorded then), not now. Raises ApprovalSignatureError (or UntrustedKeyError) naming what failed.
    """
    if not isinstance(body, dict) or sorted(body) != sorted(FIELDS) or body.get("format") != FORMAT:
        raise ApprovalSignatureError(f"the signed decision is not an {FORMAT} statement", "sign it with `appliance approve ID` or `appliance deny ID`")
    if not isinstance(signature, str):
        raise ApprovalSignatureError("the signed decision carries no signature", "sign it with `appliance approve ID` or `appliance deny ID`")
    key_id = str(body["key_id"])
    entry = trust.require(key_id, "user", at=at)  # raises UntrustedKeyError naming the key and why
    if entry.owner != approver:
        raise ApprovalSignatureError(
            f"key {key_id[:16]}… is {entry.owner}'s user key, but {approver} sent the decision",
            "sign with your own user key (`appliance keys create` makes one; an admin adds it under the root key)",
        )
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise ApprovalSignatureError("the decision's signature is not base64", "sign it again with `appliance approve ID`") from None
    try:
        verify_signature(entry.public_key(), raw, _DOMAIN + canonical(body))
    except SigningError:
        raise ApprovalSignatureError(
            f"the decision's signature does not verify with {approver}'s user key {key_id[:16]}…",
            "it was signed with another key or changed after signing: sign it again with your own user key",
        ) from None
    for name in ("request", "action", "subject", "params_digest", "requester", "expires_at", "node_key_id", "approver"):
        if body[name] != expected[name]:
            raise ApprovalSignatureError(
                f"the signed decision is for {name} {body[name]!r}, but request {expected['request']} has {name} {expected[name]!r}",
                "a decision signed for one request cannot be used for another: decide this request itself (`appliance approvals show ID`)",
            )
    if body["decision"] not in DECISIONS:
        raise ApprovalSignatureError(f"decision {body['decision']!r} is not one of {', '.join(DECISIONS)}", "approve or deny")
    return entry
