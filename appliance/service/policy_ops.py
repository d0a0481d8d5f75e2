"""The policy as the service serves it: show the one in force; take a signed update.

An update is the policy text and its root signature, sent by a caller holding policy.update.
The service checks the signature against the root-signed trust store, parses the policy
(every problem at once), and refuses one that would give the caller a role or permission the
caller does not hold now (no self-escalation, as in Kubernetes RBAC). Only then does it
replace the files and take the new policy, recording both digests and the differences.
"""

from __future__ import annotations

from typing import Any

from appliance.service.caller import Caller
from keys.files import atomic_write
from policies.errors import PolicyError
from policies.policy import parse_policy, policy_diff
from policies.signature import verify_policy


def policy_show(svc: Any, caller: Caller) -> dict[str, Any]:
    """The policy in force: name, version, digest, its text, and the role × permission table."""
    svc.authorize(caller, "policy.show", "policy")
    p = svc.policy
    return {
        "name": p.name,
        "version": p.version,
        "digest": p.digest,
        "file": str(svc.home.policy_file),
        "text": svc.home.policy_file.read_text(encoding="utf-8"),
        "table": [[role, perms] for role, perms in p.table()],
        "users": {u: list(r) for u, r in p.users.items()},
        "groups": {g: list(r) for g, r in p.groups.items()},
        "your_roles": list(p.roles_of(caller.user, caller.groups)),
    }


def policy_update(svc: Any, caller: Caller, *, text: str, signature: str | None = None) -> dict[str, Any]:
    """Replace the policy with ``text``, signed (``signature``: the .sig file's content) by the root key.

    Under a two-person rule on policy.update (the default) this opens a request holding the
    signed policy, checked now; the service installs it when a second person approves.
    """
    from appliance.service.approvals import open_request

    two_person = svc.policy.two_person("policy.update") is not None
    svc.authorize(caller, "policy.update", "policy", requesting=two_person)
    _check_update(svc, caller, text, signature)
    if two_person:
        params = {"text": text, "signature": signature}
        req = open_request(svc, caller, "policy.update", "policy", params, reason="install a new policy", ttl_s=None, authorized=True)
        return {"requested": True, "request": req}
    return install_policy(svc, caller, text=text, signature=signature)


def _check_update(svc: Any, caller: Caller, text: str, signature: str | None) -> Any:
    """Signature, every problem, no self-escalation, newer: what an update must pass, before and when it is installed."""
    source = "sent for update"
    verify_policy(text.encode("utf-8"), signature.encode("utf-8") if signature is not None else None, svc.trust, source=source)
    new = parse_policy(text, source=source)
    gained = svc.policy.escalations(new, caller.user, caller.groups)
    if gained:
        raise PolicyError(
            f"{caller.user} may not install a policy that gives {caller.user} what {caller.user} does not hold now: {', '.join(gained)}",
            "another admin, who holds it, must install this policy",
        )
    if new.version <= svc.policy.version:
        raise PolicyError(
            f"the policy {source} is version {new.version}, not newer than version {svc.policy.version} in force",
            "raise [policy] version and sign it again",
        )
    return new


def install_policy(svc: Any, caller: Caller, *, text: str, signature: str | None) -> dict[str, Any]:
    """Install an authorized update (checked again: the policy in force may have changed since it was requested)."""
    new = _check_update(svc, caller, text, signature)
    old = svc.policy
    changes = policy_diff(old, new)
    atomic_write(svc.home.policy_file, text.encode("utf-8"), mode=0o644)
    atomic_write(svc.home.policy_signature_file, (signature or "").encode("utf-8"), mode=0o644)
    svc.policy = new
    svc.ledger.append_many(
        [
            (
                "policy.updated",
                caller.user,
                {"by": caller.as_record(), "from_digest": old.digest, "digest": new.digest, "name": new.name, "version": new.version, "changes": changes},
            ),
            ("policy.loaded", caller.user, {"name": new.name, "version": new.version, "digest": new.digest}),
        ]
    )
    return {"name": new.name, "version": new.version, "digest": new.digest, "changes": changes}
