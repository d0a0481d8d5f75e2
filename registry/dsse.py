"""DSSE envelopes (Dead Simple Signing Envelope, v1): a payload signed with its type bound in.

The signature covers PAE(type, body) = ``DSSEv1 <len(type)> <type> <len(body)> <body>``, so a
payload cannot be passed off as another type. Keys are ECDSA P-256 (the appliance's key
format); ``keyid`` is the appliance key id (sha256 of the public key's DER). Verification
takes the keys the verifier already trusts and never a key named inside the envelope alone.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from keys.errors import SigningError
from keys.keystore import NodeKey, verify_signature

IN_TOTO = "application/vnd.in-toto+json"


class EnvelopeError(SigningError):
    """A DSSE envelope is malformed, of the wrong type, or not signed by a trusted key."""


def pae(payload_type: str, body: bytes) -> bytes:
    """The pre-authentication encoding the signature covers."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def sign_envelope(body: bytes, key: NodeKey, payload_type: str = IN_TOTO) -> dict[str, Any]:
    """An envelope holding ``body``, signed by ``key``."""
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(body).decode("ascii"),
        "signatures": [{"keyid": key.key_id, "sig": base64.b64encode(key.sign(pae(payload_type, body))).decode("ascii")}],
    }


def open_envelope(envelope: Any, trusted: dict[str, ec.EllipticCurvePublicKey], *, source: str, payload_type: str = IN_TOTO) -> tuple[bytes, str]:
    """The payload of ``envelope`` and the id of the trusted key whose signature verifies it.

    ``trusted`` maps key id -> public key. Signatures by keys not in it count for nothing; at
    least one signature must be by a trusted key and verify. Raises EnvelopeError naming ``source``.
    """
    if not isinstance(envelope, dict) or not isinstance(envelope.get("payload"), str) or not isinstance(envelope.get("signatures"), list):
        raise EnvelopeError(f"{source} is not a DSSE envelope (payloadType, payload, signatures)", "export the bundle again")
    if envelope.get("payloadType") != payload_type:
        raise EnvelopeError(f"{source} holds a {envelope.get('payloadType')!r} payload, not {payload_type!r}", "export the bundle again")
    try:
        body = base64.b64decode(envelope["payload"], validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(f"the payload of {source} is not base64", "export the bundle again") from None
    named = []
    for sig in envelope["signatures"]:
        if not isinstance(sig, dict):
            continue
        key_id = str(sig.get("keyid", ""))
        named.append(key_id)
        public = trusted.get(key_id)
        if public is None:
            continue
        try:
            verify_signature(public, base64.b64decode(str(sig.get("sig", "")), validate=True), pae(payload_type, body))
        except (SigningError, binascii.Error, ValueError):
            raise EnvelopeError(
                f"the signature on {source} by key {key_id[:16]}… does not verify: the statement was changed after signing, or the signature is forged",
                "do not trust this bundle; ask its sender for a new export",
            ) from None
        return body, key_id
    shown = ", ".join(k[:16] + "…" for k in named) or "none"
    raise EnvelopeError(
        f"{source} is signed by no key this verifier trusts (it names {shown})",
        "pass the exporting site's release key, or a root key whose trust store lists it; a key shipped inside the bundle proves nothing alone",
    )


def payload_json(body: bytes, *, source: str) -> dict[str, Any]:
    """The payload parsed as a JSON object."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise EnvelopeError(f"the payload of {source} is not JSON", "export the bundle again") from None
    if not isinstance(value, dict):
        raise EnvelopeError(f"the payload of {source} is not a JSON object", "export the bundle again")
    return value
