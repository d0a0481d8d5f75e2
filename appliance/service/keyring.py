"""Keys as the service sees them: the root-signed trust store and where its anchor comes from."""

from __future__ import annotations

from typing import Any

from appliance.service.caller import Caller
from keys.truststore import describe


def keys_list(svc: Any, caller: Caller) -> dict[str, Any]:
    """Every key of the trust store with its role, owner, validity and status now."""
    svc.authorize(caller, "keys.list", "trust store")
    _, anchor_source = svc.home.root_anchor()
    return {
        "trust_store": str(svc.home.trust_file),
        "version": svc.trust.version,
        "issued_at": svc.trust.issued_at,
        "root_key_id": svc.trust.root_key_id,
        "anchor": anchor_source,
        "node_key_id": svc.key.key_id,
        "keys": describe(svc.trust.entries),
    }
