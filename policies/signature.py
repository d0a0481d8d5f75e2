"""Policy signatures: a policy takes effect only with a detached signature by a root key of the trust store.

The signature file (``policy.toml.sig``) is JSON: the format, the root key's id, the sha256 of
the policy's bytes, and an ECDSA signature over a domain-separated digest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path

from keys.errors import SigningError
from keys.keystore import NodeKey, verify_signature
from keys.truststore import TrustStore, UntrustedKeyError
from policies.errors import PolicyFileError, PolicySignatureError
from policies.policy import Policy, parse_policy

SIGNATURE_FORMAT = "appliance-policy-signature/v1"
_DOMAIN = b"appliance-policy/v1\n"


def sign_policy(policy_bytes: bytes, root: NodeKey) -> bytes:
    """The detached signature file (``<policy>.sig``) of ``policy_bytes`` by the root key ``root``.

    A policy with problems is refused (PolicyFileError): a signed but broken policy would
    only be refused later, by the service, further from whoever can fix it.
    """
    try:
        text = policy_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyFileError("the policy to sign is not UTF-8 text", "save it as UTF-8") from None
    parse_policy(text, source="the policy to sign")
    digest = hashlib.sha256(policy_bytes).hexdigest()
    signature = base64.b64encode(root.sign(_DOMAIN + digest.encode("ascii"))).decode("ascii")
    document = {"format": SIGNATURE_FORMAT, "key_id": root.key_id, "digest": digest, "signature": signature}
    return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode("utf-8")


def verify_policy(policy_bytes: bytes, signature_bytes: bytes | None, trust: TrustStore, *, source: str) -> None:
    """Check that ``policy_bytes`` carry a valid signature by a root key of ``trust``; PolicySignatureError naming ``source`` and why if not."""
    resign = f"have the root key's holder check {source} and sign it again"
    if signature_bytes is None:
        raise PolicySignatureError(f"the policy {source} is unsigned", f"a policy takes effect only when signed by the root key: {resign}")
    try:
        document = json.loads(signature_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PolicySignatureError(f"the signature of the policy {source} is not JSON ({exc})", resign) from None
    fields = ("key_id", "digest", "signature")
    if not isinstance(document, dict) or document.get("format") != SIGNATURE_FORMAT or not all(isinstance(document.get(f), str) for f in fields):
        raise PolicySignatureError(f"the signature of the policy {source} is not a policy signature ({SIGNATURE_FORMAT} with {', '.join(fields)})", resign)
    key_id, signed_digest = document["key_id"], document["digest"]
    digest = hashlib.sha256(policy_bytes).hexdigest()
    if signed_digest != digest:
        raise PolicySignatureError(
            f"the policy {source} was changed after it was signed: its sha256 is {digest[:16]}…, the signature covers {signed_digest[:16]}…",
            f"if nobody changed it on purpose, report the incident; else {resign}",
        )
    try:
        entry = trust.require(key_id, "root")
    except UntrustedKeyError as exc:
        raise PolicySignatureError(
            f"the policy {source} is signed by key {key_id[:16]}…, which is not a root key of the trust store: {exc.message}",
            f"only the root key signs policies: {resign}",
        ) from None
    try:
        verify_signature(entry.public_key(), base64.b64decode(document["signature"], validate=True), _DOMAIN + digest.encode("ascii"))
    except (SigningError, binascii.Error, ValueError):
        raise PolicySignatureError(
            f"the signature of the policy {source} does not verify with root key {key_id[:16]}…: it is forged or corrupted",
            f"if nobody changed it on purpose, report the incident; else {resign}",
        ) from None


def read_policy(path: Path, trust: TrustStore, *, signature_path: Path | None = None) -> Policy:
    """Read the policy at ``path``, verify its signature (default ``<path>.sig``) against ``trust``, and parse it."""
    path = Path(path)
    sig_path = Path(signature_path) if signature_path is not None else path.with_name(path.name + ".sig")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyFileError(f"cannot read the policy {path}: {exc.strerror}", "check the path") from None
    try:
        signature: bytes | None = sig_path.read_bytes()
    except FileNotFoundError:
        signature = None
    except OSError as exc:
        raise PolicySignatureError(f"cannot read the signature {sig_path} of the policy {path}: {exc.strerror}", "check its permissions") from None
    verify_policy(raw, signature, trust, source=str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyFileError(f"the policy {path} is not UTF-8 text", "save it as UTF-8 and sign it again") from None
    return parse_policy(text, source=str(path))
