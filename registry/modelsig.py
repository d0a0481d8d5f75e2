"""Signing model directories with the OpenSSF model-signing library.

The signature is a sigstore bundle (v0.3) holding a DSSE envelope over an in-toto statement
whose predicate lists every file's sha256, so anyone can check an exported model with the
standard command::

    model_signing verify key MODEL_DIR --signature MODEL_DIR/model.sig --public_key node.pub.pem

The signature file lives inside the model directory and is left out of the hashing (the
library records it in the statement's ``ignore_paths``; its CLI also ignores the
``--signature`` path on its own). The library only takes a key *path*: it gets the node key
as PKCS#8 PEM encrypted under a one-time random password, in a private temporary directory
removed right after — the key never touches disk unencrypted.

On failure the library's messages are terse (an edited statement fails with an empty
message), so `verify_model_dir` works out what is wrong itself: another key, an altered
statement, or which files differ, are missing or are extra.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from model_signing import hashing, signing, verifying

from keys.digest import sha256_file
from keys.errors import KeyStoreError, SigningError
from keys.keystore import NodeKey, load_public_key

DEFAULT_SIG_NAME = "model.sig"
_PAYLOAD_TYPE = "application/vnd.in-toto+json"
# What model_signing ignores by default in a model directory (ignore_git_paths=True).
_GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")
_RESIGN = "if the change is legitimate, package and sign the model again; otherwise treat the copy as tampered with and fetch it again from the appliance"


def _check_sig_name(sig_name: str) -> None:
    if not sig_name or "/" in sig_name or sig_name in (".", ".."):
        raise SigningError(f"signature name {sig_name!r} is not a plain file name", "use a name like 'model.sig'")


def sign_model_dir(model_dir: Path, key: NodeKey, sig_name: str = DEFAULT_SIG_NAME) -> Path:
    """Sign every file of ``model_dir`` into ``model_dir/<sig_name>``; return its path."""
    model_dir = Path(model_dir)
    _check_sig_name(sig_name)
    if not model_dir.is_dir():
        raise SigningError(f"model directory {model_dir} does not exist", "package the model first")
    sig_path = model_dir / sig_name
    pem, password = key.encrypted_pem_for_tool()
    with tempfile.TemporaryDirectory(prefix="appliance-sign-") as tmp:  # created 0700
        key_path = Path(tmp) / "signing-key.pem"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        config = (
            signing.Config()
            .use_elliptic_key_signer(
                private_key=key_path,
                # model_signing annotates password as str, but hands it to cryptography's
                # load_pem_private_key, which takes bytes only: its stub is wrong, bytes are right.
                password=password,  # type: ignore[arg-type]
            )
            .set_hashing_config(hashing.Config().set_ignored_paths(paths=[sig_name], ignore_git_paths=True))
        )
        try:
            config.sign(model_dir, sig_path)
        except ValueError as exc:  # e.g. a symbolic link in the model directory
            raise SigningError(f"cannot sign model directory {model_dir}: {exc}", "replace links with real files and sign again") from None
    return sig_path


def _pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding (what the envelope's signature covers)."""
    return b"DSSEv1 %d %s %d %s" % (len(_PAYLOAD_TYPE), _PAYLOAD_TYPE.encode(), len(payload), payload)


def _read_bundle(sig_path: Path) -> tuple[str | None, bytes, bytes, dict]:
    """(key hint, raw payload, signature, statement) from a bundle; not yet verified."""
    bad = SigningError(
        f"signature file {sig_path} is not a model-signing bundle",
        "the appliance signs a model when it packages it: export it again from the appliance that made it (`appliance model export DIGEST --out DIR`)",
    )
    try:
        bundle = json.loads(sig_path.read_text(encoding="utf-8"))
        envelope = bundle["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        signature = base64.b64decode(envelope["signatures"][0]["sig"], validate=True)
        statement = json.loads(payload)
        hint = bundle.get("verificationMaterial", {}).get("publicKey", {}).get("hint")
    except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise bad from None
    if not isinstance(statement, dict):
        raise bad
    return hint, payload, signature, statement


def _signed_files(statement: dict) -> tuple[dict[str, str], list[str]] | None:
    """(name → sha256, ignore paths) from a file-mode statement, or None if not file mode."""
    predicate = statement.get("predicate")
    if not isinstance(predicate, dict):
        return None
    serialization_ = predicate.get("serialization", {})
    if not isinstance(serialization_, dict) or serialization_.get("method") != "files":
        return None
    if serialization_.get("hash_type") != "sha256":
        return None
    files: dict[str, str] = {}
    for resource in predicate.get("resources", []):
        if isinstance(resource, dict):
            files[str(resource.get("name"))] = str(resource.get("digest"))
    ignore = [str(p) for p in serialization_.get("ignore_paths", []) if isinstance(p, str)]
    return files, ignore


def _ignored(rel: str, ignore: list[str]) -> bool:
    return any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in ignore)


def _file_differences(model_dir: Path, signed: dict[str, str], ignore: list[str]) -> list[str]:
    on_disk: dict[str, Path] = {}
    for root, dirs, files in os.walk(model_dir):
        dirs.sort()
        for name in files:
            full = Path(root) / name
            rel = full.relative_to(model_dir).as_posix()
            if not _ignored(rel, ignore):
                on_disk[rel] = full
    problems = []
    for rel in sorted(signed):
        if rel not in on_disk:
            problems.append(f"{rel} is missing")
        elif on_disk[rel].is_symlink():
            problems.append(f"{rel} is a symbolic link")
        elif sha256_file(on_disk[rel]) != signed[rel]:
            problems.append(f"{rel} differs")
    problems += [f"{rel} is extra (not signed)" for rel in sorted(set(on_disk) - set(signed))]
    return problems


def verify_model_dir(model_dir: Path, public_key_pem: Path, sig_name: str = DEFAULT_SIG_NAME) -> None:
    """Verify ``model_dir`` against ``model_dir/<sig_name>`` and the public key; return None.

    Raises SigningError saying what failed: the signature file is missing or malformed, it
    was made with another key, its signed statement was altered, or which files differ,
    are missing or are extra.
    """
    model_dir = Path(model_dir)
    _check_sig_name(sig_name)
    sig_path = model_dir / sig_name
    if not model_dir.is_dir():
        raise SigningError(f"model directory {model_dir} does not exist", "check the path")
    if not sig_path.is_file():
        raise SigningError(
            f"model directory {model_dir} has no signature file {sig_name}",
            "export models with `appliance model export DIGEST --out DIR`, which writes model.sig into the model folder",
        )
    try:
        public_key = load_public_key(Path(public_key_pem))
    except KeyStoreError as exc:
        raise SigningError(exc.message, exc.hint) from None
    hint, payload, signature, statement = _read_bundle(sig_path)

    verifier = (
        verifying.Config()
        .use_elliptic_key_verifier(public_key=Path(public_key_pem))
        .set_hashing_config(hashing.Config().set_ignored_paths(paths=[sig_name], ignore_git_paths=True))
    )
    try:
        verifier.verify(model_dir, sig_path)
        return
    except (ValueError, KeyError, TypeError, InvalidSignature) as exc:
        library_message = str(exc) or type(exc).__name__
    _explain_failure(model_dir, sig_path, public_key, Path(public_key_pem), hint, payload, signature, statement, library_message)


def _explain_failure(
    model_dir: Path,
    sig_path: Path,
    public_key: ec.EllipticCurvePublicKey,
    public_key_path: Path,
    hint: str | None,
    payload: bytes,
    signature: bytes,
    statement: dict,
    library_message: str,
) -> None:
    """Raise the SigningError that says best why model_signing refused the model."""
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if hint and hint != hashlib.sha256(pem).hexdigest():
        raise SigningError(
            f"model {model_dir} was signed by a different key than {public_key_path}",
            "verify with the public key of the appliance that signed it",
        )
    try:
        # load_public_key admits P-256 only, whose DSSE signatures use SHA-256.
        public_key.verify(signature, _pae(payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SigningError(
            f"the signature in {sig_path} does not verify with {public_key_path}: the signed "
            "statement (the list of files and digests) was altered, or another key signed it",
            _RESIGN,
        ) from None
    signed = _signed_files(statement)
    if signed is not None:
        ignore = sorted(set(signed[1]) | {sig_path.name} | set(_GIT_PATHS))
        problems = _file_differences(model_dir, signed[0], ignore)
        if problems:
            raise SigningError(
                f"model {model_dir} does not match its signature: " + "; ".join(problems),
                _RESIGN,
            )
    raise SigningError(f"model {model_dir} does not verify: {library_message}", _RESIGN)


def verify_signed_files(sig_path: Path, public_key: ec.EllipticCurvePublicKey, files: dict[str, str], *, what: str) -> None:
    """Check a model-signing signature against file digests already computed (``files``: path in
    the model directory -> sha256), without hashing the files again: the signature over the
    signed statement verifies with ``public_key``, and the statement lists exactly these files
    with these digests. The same checks model_signing's verifier makes, on one hashing pass."""
    _hint, payload, signature, statement = _read_bundle(sig_path)
    try:
        # P-256 keys only (load_public_key admits no other), whose DSSE signatures use SHA-256.
        public_key.verify(signature, _pae(payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SigningError(
            f"the model-signing signature {sig_path.name} of {what} does not verify with the release key: the signed file list was altered, or another key signed it",
            _RESIGN,
        ) from None
    signed = _signed_files(statement)
    if signed is None:
        raise SigningError(f"{sig_path} of {what} is not a sha256 file-by-file model-signing statement", _RESIGN)
    listed, ignore = signed
    ignore = sorted(set(ignore) | {sig_path.name} | set(_GIT_PATHS))
    present = {rel: digest for rel, digest in files.items() if not _ignored(rel, ignore)}
    problems = [f"{rel} is missing" for rel in sorted(set(listed) - set(present))]
    problems += [f"{rel} differs" for rel in sorted(set(listed) & set(present)) if listed[rel] != present[rel]]
    problems += [f"{rel} is extra (not signed)" for rel in sorted(set(present) - set(listed))]
    if problems:
        raise SigningError(f"{what} does not match its model-signing signature: " + "; ".join(problems), _RESIGN)


def signed_file_digests(sig_path: Path) -> dict[str, str]:
    """The file -> sha256 list of a model-signing signature this process just made (not verified here)."""
    _hint, _payload, _signature, statement = _read_bundle(sig_path)
    signed = _signed_files(statement)
    if signed is None:
        raise SigningError(f"{sig_path} is not a sha256 file-by-file model-signing statement", _RESIGN)
    return signed[0]
