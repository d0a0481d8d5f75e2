"""Purge certificates: signed by the node key, checkable offline by anyone with its public key.

The signed document is ``{"certificate", "certificate_sha256", "signature", "key_id"}``: the
signature is ECDSA-SHA256 over the canonical JSON of the certificate (whose sha256 is
``certificate_sha256``), so a third party re-serialises, hashes and verifies with OpenSSL or
`appliance purges verify FILE --key NODE.pub.pem`.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from keys.errors import SigningError
from keys.keystore import NodeKey, key_id_of, verify_signature
from registry.canonical import canonical_json


def sign_certificate(certificate: dict[str, Any], key: NodeKey) -> dict[str, Any]:
    body = canonical_json(certificate)
    return {
        "certificate": certificate,
        "certificate_sha256": hashlib.sha256(body).hexdigest(),
        "signature": base64.b64encode(key.sign(body)).decode("ascii"),
        "key_id": key.key_id,
    }


def verify_certificate(doc: dict[str, Any], public_key: ec.EllipticCurvePublicKey, *, source: str = "the certificate") -> dict[str, Any]:
    """The certificate, after checking its digest and signature; SigningError names what failed."""
    if not isinstance(doc, dict) or not {"certificate", "certificate_sha256", "signature", "key_id"} <= set(doc):
        raise SigningError(f"{source} is not a signed purge certificate", "pass the file `appliance purges show ID --out FILE` wrote")
    body = canonical_json(doc["certificate"])
    if hashlib.sha256(body).hexdigest() != doc["certificate_sha256"]:
        raise SigningError(f"{source}: the certificate does not match its sha256 (it was changed)", "get the certificate again from the appliance")
    if key_id_of(public_key) != doc["key_id"]:
        raise SigningError(
            f"{source} is signed by key {doc['key_id'][:16]}…, not by the key given ({key_id_of(public_key)[:16]}…)",
            "pass the appliance node key that signed it",
        )
    try:
        signature = base64.b64decode(doc["signature"], validate=True)
    except ValueError as exc:
        raise SigningError(f"{source}: the signature is not base64", "get the certificate again from the appliance") from exc
    verify_signature(public_key, signature, body)
    return dict(doc["certificate"])
