"""Verifying a base model's signature offline, before transformers reads any of its files.

A base is signed with OpenSSF model-signing: a sigstore bundle (v0.3) whose DSSE envelope holds
an in-toto statement listing every file's sha256. The bundle is the recipe's ``base_signature``
(relative to the recipe) or ``<base>/model.sig``, the name the appliance's own packaging
writes. Two ways to check it, both without network:

- **key**: an ECDSA P-256/384/521 public key (model_signing's elliptic key verifier): the
  recipe's ``base_public_key``, else the trusted key whose hash matches the bundle's key hint
  (the home's ``keys/node.pub.pem`` for models this appliance packaged).
- **keyless**: a Fulcio certificate plus a Rekor entry, checked by sigstore-python against the
  trust root *embedded in the installed sigstore package* (never the TUF cache, never a TUF
  refresh): the certificate chain to Fulcio at the signed time, its SCT, the Rekor inclusion
  proof and checkpoint (and inclusion promise), the DSSE signature, and the certificate's
  identity and issuer equal to the recipe's ``base_identity`` / ``base_issuer``. Signatures
  whose Fulcio, CT or Rekor keys are newer than the installed sigstore release cannot verify
  offline: upgrade sigstore from the appliance's offline wheels, or sign with a key.

After the library accepts the bundle, the signed file list must equal the manifest
`inspect_base` hashed (so the digests the ledger records are the ones that were verified; a
file changed in between is caught), and no visible file may be left unsigned. A bundle that
was checked and failed is always refused; ``allow_unsigned_base`` only admits a base with no
signature, or one whose signature cannot be checked for want of a key or identity.

The bundle diagnostics mirror `registry.modelsig` (pipeline may not import registry).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keys.errors import SigningError
from keys.keystore import key_id_of
from pipeline.finetune.base import BaseModel, inspect_base, is_hidden

if TYPE_CHECKING:
    from pipeline.settings.finetune import FinetuneConfig

# What the appliance's packaging names the bundle inside a model directory (registry.modelsig.DEFAULT_SIG_NAME).
DEFAULT_SIG_NAME = "model.sig"
_PAYLOAD_TYPE = "application/vnd.in-toto+json"
_MAX_BUNDLE = 64 << 20
# The hash model_signing pairs with each curve (its get_ec_key_hash).
_CURVES: dict[str, hashes.HashAlgorithm] = {"secp256r1": hashes.SHA256(), "secp384r1": hashes.SHA384(), "secp521r1": hashes.SHA512()}
# The sigstore instances whose trust roots ship inside sigstore-python (sigstore/_store/<quoted TUF URL>/).
_TUF_URLS = {"production": "https://tuf-repo-cdn.sigstore.dev", "staging": "https://tuf-repo-cdn.sigstage.dev"}
_RESIGN = "if the change is legitimate, sign the base again (`model_signing sign ...`); otherwise restore the base from its source"
_SIGN_HINT = (
    "sign it on a trusted machine (`model_signing sign key DIR --private_key KEY.pem --signature DIR/model.sig`) and set "
    "[finetune] base_public_key to the public key, or set allow_unsigned_base = true to use it unverified (the ledger records that)"
)

Method = Literal["key", "keyless", "unsigned-allowed"]


@dataclass(frozen=True, kw_only=True)
class BaseVerdict:
    """How a base was admitted: the ledger records this next to the base's per-file digests."""

    method: Method
    # key: the key id (sha256 of the DER public key); keyless: "identity (issuer)"; unsigned: "".
    signer: str
    bundle: Path | None
    manifest_digest: str
    # unsigned-allowed: "unsigned, allowed by the recipe", and why a present signature was not checked.
    note: str = ""
    key_path: Path | None = field(default=None)

    def record(self) -> dict[str, Any]:
        """The verdict as JSON-ready fields for the ledger."""
        return {
            "method": self.method,
            "signer": self.signer,
            "bundle": str(self.bundle) if self.bundle else None,
            "manifest_digest": self.manifest_digest,
            "note": self.note,
            "key_path": str(self.key_path) if self.key_path else None,
        }


@dataclass(frozen=True, kw_only=True)
class _Bundle:
    path: Path
    raw: bytes
    material: Literal["key", "keyless", "certificate"]
    hint: str
    payload: bytes
    signature: bytes
    signed: dict[str, str]


def _read_bundle(path: Path) -> _Bundle:
    """Parse a model-signing bundle once (its bytes are what gets verified); nothing is trusted yet."""
    bad = f"signature bundle {path} is not a model-signing bundle"
    try:
        if path.stat().st_size > _MAX_BUNDLE:
            raise SigningError(f"{bad} (larger than {_MAX_BUNDLE >> 20} MiB)", "point base_signature at the model's .sig bundle")
        raw = path.read_bytes()
        bundle = json.loads(raw)
        envelope = bundle["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        signature = base64.b64decode(envelope["signatures"][0]["sig"], validate=True)
        statement = json.loads(payload)
        material = bundle["verificationMaterial"]
        serial = statement["predicate"]["serialization"]
        resources = statement["predicate"]["resources"]
        signed = {str(r["name"]): str(r["digest"]) for r in resources}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise SigningError(f"{bad} ({type(exc).__name__}: {exc})", "point base_signature at the bundle written by `model_signing sign`") from None
    if envelope.get("payloadType") != _PAYLOAD_TYPE:
        raise SigningError(f"{bad}: payload type {envelope.get('payloadType')!r}", "sign the base with model_signing")
    if serial.get("method") != "files" or serial.get("hash_type") != "sha256":
        raise SigningError(
            f"{path} signs with {serial.get('method')!r}/{serial.get('hash_type')!r} hashing; the appliance checks file-by-file sha256 (model_signing's default)",
            "sign the base again without --hashing/shard options",
        )
    if "publicKey" in material:
        kind: Literal["key", "keyless", "certificate"] = "key"
    elif ("certificate" in material or "x509CertificateChain" in material) and material.get("tlogEntries"):
        kind = "keyless"
    else:
        kind = "certificate"
    hint = str(material.get("publicKey", {}).get("hint", "") or "")
    return _Bundle(path=path, raw=raw, material=kind, hint=hint, payload=payload, signature=signature, signed=signed)


def _bundle_rel(base: BaseModel, bundle: Path) -> str | None:
    try:
        return bundle.resolve().relative_to(base.path.resolve()).as_posix()
    except ValueError:
        return None


def _hidden_unsigned(base: BaseModel, signed: dict[str, str]) -> list[str]:
    """Hidden entries on disk that the signer did not sign: ignored, like inspect_base ignores them."""
    found = []
    for current, dirs, files in os.walk(base.path):
        here = Path(current)
        for name in [*dirs, *files]:
            rel = (here / name).relative_to(base.path).as_posix()
            if name.startswith(".") and not any(s == rel or s.startswith(rel + "/") for s in signed):
                found.append(rel)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return found


def _differences(base: BaseModel, bundle: _Bundle) -> list[str]:
    """Files that differ from, are missing from, or are not covered by the signed list."""
    rel = _bundle_rel(base, bundle.path)
    on_disk = {e.path: e.sha256 for e in base.manifest if e.path != rel}
    signed = {n: d for n, d in bundle.signed.items() if not is_hidden(n)}
    problems = [f"{n} differs" for n in sorted(signed) if n in on_disk and on_disk[n] != signed[n]]
    problems += [f"{n} is missing" for n in sorted(set(signed) - set(on_disk))]
    problems += [f"{n} is extra (not signed)" for n in sorted(set(on_disk) - set(signed))]
    return problems


def _run_model_signing(base: BaseModel, bundle: _Bundle, configure: Any) -> str | None:
    """Run model_signing on a private copy of the bundle's bytes; the library's message on failure, else None."""
    from model_signing import hashing, verifying
    from sigstore.errors import Error as SigstoreError

    rel = _bundle_rel(base, bundle.path)
    ignores = ([rel] if rel else []) + _hidden_unsigned(base, bundle.signed)
    with tempfile.TemporaryDirectory(prefix="appliance-base-verify-") as tmp:  # created 0700
        copy = Path(tmp) / "bundle.sig"
        copy.write_bytes(bundle.raw)
        config = configure(verifying.Config(), Path(tmp))
        config.set_hashing_config(hashing.Config().use_file_serialization(hashing_algorithm="sha256").set_ignored_paths(paths=ignores, ignore_git_paths=True))
        try:
            config.verify(base.path, copy)
        except SigstoreError as exc:
            return f"sigstore: {exc}" if str(exc) else f"sigstore: {type(exc).__name__}"
        except (ValueError, KeyError, TypeError, InvalidSignature) as exc:
            return str(exc) or type(exc).__name__
    return None


def _check_against_manifest(base: BaseModel, bundle: _Bundle) -> None:
    """The verified file list must be exactly what inspect_base hashed (the ledger's digests)."""
    problems = _differences(base, bundle)
    if problems:
        raise SigningError(
            f"base {base.path} changed between inspection and signature check, or holds unsigned files: " + "; ".join(problems),
            "inspect and verify the base again; " + _RESIGN,
        )


def _load_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise SigningError(f"cannot read public key {path}: {exc.strerror}", "set [finetune] base_public_key to a PEM file relative to the recipe") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningError(f"{path} is not a PEM public key", "give the signer's SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        raise SigningError(
            f"public key {path} is not ECDSA P-256, P-384 or P-521",
            "model_signing verifies offline with elliptic-curve keys only (Ed25519 and RSA are refused): sign with an ECDSA key",
        )
    return key


def _hint(key: ec.EllipticCurvePublicKey) -> str:
    """model_signing's key hint: sha256 hex of the public key's PEM."""
    return hashlib.sha256(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding (what the envelope's signature covers)."""
    return b"DSSEv1 %d %s %d %s" % (len(_PAYLOAD_TYPE), _PAYLOAD_TYPE.encode(), len(payload), payload)


def verify_with_key(base: BaseModel, bundle_path: Path, public_key: Path) -> BaseVerdict:
    """Verify ``base`` against a key-signed bundle; raise SigningError naming what failed."""
    bundle = _read_bundle(Path(bundle_path))
    return _verify_key(base, bundle, Path(public_key))


def _verify_key(base: BaseModel, bundle: _Bundle, key_path: Path) -> BaseVerdict:
    if bundle.material != "key":
        raise SigningError(
            f"{bundle.path} is a {bundle.material} signature, not a key signature; it cannot be checked with {key_path}",
            "for a keyless (sigstore) bundle set [finetune] base_identity and base_issuer instead of base_public_key",
        )
    key = _load_key(key_path)
    message = _run_model_signing(base, bundle, lambda c, _tmp: c.use_elliptic_key_verifier(public_key=key_path))
    if message is not None:
        where = f"base {base.path} (signature {bundle.path})"
        if bundle.hint and bundle.hint != _hint(key):
            raise SigningError(f"{where} was signed by a different key than {key_path}", "set base_public_key to the signer's public key")
        try:
            key.verify(bundle.signature, _pae(bundle.payload), ec.ECDSA(_CURVES[key.curve.name]))
        except InvalidSignature:
            raise SigningError(
                f"{where}: the signature does not verify with {key_path}: the signed file list was altered, or another key signed it", _RESIGN
            ) from None
        problems = _differences(base, bundle)
        detail = "; ".join(problems) if problems else message
        raise SigningError(f"{where} does not match its signature: {detail}", _RESIGN)
    _check_against_manifest(base, bundle)
    return BaseVerdict(method="key", signer=key_id_of(key), bundle=bundle.path, manifest_digest=base.digest, key_path=key_path)


def embedded_trust_config(instance: Literal["production", "staging"] = "production") -> bytes:
    """A sigstore ClientTrustConfig (JSON) built from the trust root shipped inside sigstore-python.

    This is the file sigstore copies into its TUF cache on first use; reading it from the
    package directly means no TUF refresh (network) and no cache another user could edit.
    """
    from importlib import resources
    from urllib.parse import quote

    store = resources.files("sigstore").joinpath("_store", quote(_TUF_URLS[instance], safe=""))
    try:
        trusted_root = json.loads(store.joinpath("trusted_root.json").read_bytes())
        signing_config = json.loads(store.joinpath("signing_config.v0.2.json").read_bytes())
    except (OSError, ValueError) as exc:
        raise SigningError(
            f"the installed sigstore package has no embedded {instance} trust root ({exc})",
            "install the sigstore version the appliance pins (its trust root is read from the package, offline)",
        ) from None
    body = {"mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json", "trustedRoot": trusted_root, "signingConfig": signing_config}
    return json.dumps(body).encode("utf-8")


def verify_keyless(base: BaseModel, bundle_path: Path, identity: str, issuer: str, *, instance: Literal["production", "staging"] = "production") -> BaseVerdict:
    """Verify a keyless (Fulcio + Rekor) bundle offline for ``identity`` and ``issuer``; raise SigningError."""
    if not identity.strip() or not issuer.strip():
        raise SigningError(
            "keyless verification needs both the signer's identity and its OIDC issuer",
            'set [finetune] base_identity (e.g. "release@example.org") and base_issuer (e.g. "https://accounts.google.com")',
        )
    bundle = _read_bundle(Path(bundle_path))
    if bundle.material != "keyless":
        raise SigningError(
            f"{bundle.path} is a {bundle.material} signature, not a keyless (sigstore) one",
            "for a key-signed bundle set [finetune] base_public_key and leave base_identity / base_issuer empty",
        )
    trust = embedded_trust_config(instance)

    def configure(config: Any, tmp: Path) -> Any:
        trust_path = tmp / "trust_config.json"
        trust_path.write_bytes(trust)
        # With trust_config, model_signing builds its sigstore Verifier from this file alone:
        # no ClientTrustConfig.production() and so no TUF update over the network.
        return config.use_sigstore_verifier(identity=identity, oidc_issuer=issuer, trust_config=trust_path)

    message = _run_model_signing(base, bundle, configure)
    if message is not None:
        where = f"base {base.path} (keyless signature {bundle.path}, verified offline against sigstore's embedded {instance} trust root)"
        if message.startswith("sigstore:"):
            raise SigningError(
                f"{where} does not verify for identity {identity!r} / issuer {issuer!r}: {message[len('sigstore: ') :]}",
                "check base_identity and base_issuer against the signer's certificate; a bundle newer than the installed sigstore's "
                "trust root cannot verify offline: upgrade sigstore from the appliance's offline wheels, or sign the base with a key",
            )
        problems = _differences(base, bundle)
        raise SigningError(f"{where} does not match its signature: {'; '.join(problems) if problems else message}", _RESIGN)
    _check_against_manifest(base, bundle)
    return BaseVerdict(method="keyless", signer=f"{identity} ({issuer})", bundle=bundle.path, manifest_digest=base.digest)


def _unverified(base: BaseModel, bundle: Path | None, why: str) -> BaseVerdict:
    note = "unsigned, allowed by the recipe" + (f"; {why}" if why else "")
    return BaseVerdict(method="unsigned-allowed", signer="", bundle=bundle, manifest_digest=base.digest, note=note)


def verify_base(base: BaseModel, cfg: FinetuneConfig, recipe_dir: Path, trusted_keys: list[Path]) -> BaseVerdict:
    """Check ``base``'s signature as the recipe says, offline; raise SigningError if it is not admitted.

    Call this before any file of the base is given to transformers. The bundle is
    ``cfg.base_signature`` (relative to ``recipe_dir``) or ``<base>/model.sig``. Keyless when the
    recipe names ``base_identity`` / ``base_issuer``; else by ``base_public_key``, else by the one
    of ``trusted_keys`` the bundle names. A missing or uncheckable signature is admitted only
    with ``allow_unsigned_base`` (verdict "unsigned-allowed"); a failed check never is.
    """
    recipe_dir = Path(recipe_dir)
    explicit = bool(cfg.base_signature.strip())
    bundle_path = recipe_dir / cfg.base_signature if explicit else base.path / DEFAULT_SIG_NAME
    if not bundle_path.is_file():
        if explicit:
            raise SigningError(f"base_signature {bundle_path} does not exist", "set [finetune] base_signature to the bundle's path, relative to the recipe")
        if cfg.allow_unsigned_base:
            return _unverified(base, None, "")
        raise SigningError(f"base model {base.path} is not signed (no {DEFAULT_SIG_NAME}, no base_signature)", _SIGN_HINT)
    bundle = _read_bundle(bundle_path)

    if cfg.base_identity or cfg.base_issuer:
        return verify_keyless(base, bundle_path, cfg.base_identity, cfg.base_issuer)
    if cfg.base_public_key:
        return _verify_key(base, bundle, recipe_dir / cfg.base_public_key)
    if bundle.material == "key":
        keys = {_hint(_load_key(Path(k))): Path(k) for k in trusted_keys}
        if bundle.hint in keys:
            return _verify_key(base, bundle, keys[bundle.hint])
        if not bundle.hint and len(keys) == 1:
            return _verify_key(base, bundle, next(iter(keys.values())))
        why = f"its signer (key hint {bundle.hint[:16] or 'none'}) is none of the {len(keys)} trusted key(s)"
        hint = "set [finetune] base_public_key to the signer's public key (PEM)"
    elif bundle.material == "keyless":
        why, hint = "it is a keyless signature and the recipe names no base_identity / base_issuer", "set [finetune] base_identity and base_issuer"
    else:
        why = "it is a certificate-chain signature, which pins no signer identity"
        hint = "sign the base with an ECDSA key or keylessly (sigstore)"
    if cfg.allow_unsigned_base:
        return _unverified(base, bundle_path, f"signature {bundle_path} not checked: {why}")
    raise SigningError(f"the signature of base {base.path} ({bundle_path}) cannot be checked: {why}", hint)


def import_base(cfg: FinetuneConfig, recipe_dir: Path, trusted_keys: list[Path]) -> tuple[BaseModel, BaseVerdict]:
    """Inspect and verify the recipe's base, in that order; nothing of it is loaded yet."""
    base = inspect_base(Path(recipe_dir) / cfg.base)
    return base, verify_base(base, cfg, recipe_dir, trusted_keys)
