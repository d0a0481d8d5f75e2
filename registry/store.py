"""The content-addressed artifact store.

An artifact (a file or a directory) lives at ``root/sha256/<digest[:2]>/<digest>``, read-only
(files 0444, directories 0555), with ``<digest>.sig.json`` beside it::

    {"digest", "kind", "name", "key_id",
     "signature": base64 ECDSA over canonical_json({"digest", "kind", "name"}),
     "files": [[relative path, sha256, size], ...]}     # directories only

A directory's digest is the sha256 of its sha256sum-style manifest (`keys.digest`), so the
saved ``files`` list is bound to the digest: verification first checks that the list hashes
to the digest, then uses it to name the file that differs, is extra or is missing.

Imports are staged: the source is moved (or copied) into ``root/tmp`` first and the *staged*
copy is hashed, so what is stored is exactly what was hashed even if the source changes
meanwhile. The signature file is written before the object is renamed into place, so an
object is never visible without its signature. Both are durable before the import returns
(and the ledger records the object): the signature through `keys.files.atomic_write_json`,
the object's files fsynced before its rename and its directory after.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from keys.digest import dir_manifest, manifest_text, sha256_bytes, sha256_file
from keys.errors import SigningError
from keys.files import atomic_write_json, fsync_dir, fsync_tree
from keys.keystore import NodeKey, verify_signature
from registry.canonical import canonical_json
from registry.errors import StoreError

_DIGEST = re.compile(r"[0-9a-f]{64}")
_FIX = "re-import the artifact from its source, or restore the store from a backup"


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    """An artifact in the store."""

    digest: str
    path: Path
    size_bytes: int
    files: int


def _signed_message(digest: str, kind: str, name: str) -> bytes:
    return canonical_json({"digest": digest, "kind": kind, "name": name})


def _check_tree(src: Path) -> None:
    """Refuse symlinks and special files: the digest covers regular files only."""
    if src.is_symlink():
        raise StoreError(f"cannot import {src}: it is a symbolic link", "import the file it points to")
    if src.is_file():
        return
    if not src.is_dir():
        raise StoreError(f"cannot import {src}: not a regular file or directory", "check the path")
    for root, dirs, files in os.walk(src):
        for name in dirs + files:
            p = Path(root) / name
            mode = p.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise StoreError(
                    f"cannot import {src}: {p.relative_to(src)} is a symbolic link or special file",
                    "replace links with the files they point to before importing",
                )


def _make_read_only(path: Path, *, top: bool = True) -> None:
    """Files 0444, directories 0555; ``top=False`` leaves ``path`` itself as it is."""
    if path.is_dir():
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                os.chmod(Path(root) / name, 0o444)
            for name in dirs:
                os.chmod(Path(root) / name, 0o555)
        if top:
            os.chmod(path, 0o555)
    else:
        os.chmod(path, 0o444)


def _make_writable(path: Path) -> None:
    if path.is_dir():
        os.chmod(path, 0o755)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(Path(root) / name, 0o755)
            for name in files:
                os.chmod(Path(root) / name, 0o644)
    elif path.exists():
        os.chmod(path, 0o644)


def _remove(path: Path) -> None:
    _make_writable(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class Store:
    """A content-addressed store rooted at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ paths

    def path_of(self, digest: str) -> Path:
        """Where the artifact ``digest`` lives (whether or not it exists)."""
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise StoreError(f"{digest!r} is not a sha256 digest (64 lowercase hex digits)", "pass the digest as recorded in the ledger")
        return self.root / "sha256" / digest[:2] / digest

    def sig_path_of(self, digest: str) -> Path:
        """The signature file of artifact ``digest``."""
        obj = self.path_of(digest)
        return obj.with_name(obj.name + ".sig.json")

    def exists(self, digest: str) -> bool:
        """Whether the artifact is present (a presence test, not a verification)."""
        return self.path_of(digest).exists()

    # ------------------------------------------------------------------ import

    def import_path(self, src: Path, *, kind: str, name: str, signer: NodeKey, move: bool = True) -> StoredArtifact:
        """Hash, sign and store ``src`` (a file or directory); return where it went.

        ``move=True`` moves it in (the source is gone afterwards); ``move=False`` copies. If
        the same content is already stored, the stored copy is verified instead and the
        source (when moving) is removed as a duplicate.
        """
        src = Path(src)
        if not src.exists() and not src.is_symlink():
            raise StoreError(f"cannot import {src}: it does not exist", "check the path the stage reported")
        _check_tree(src)
        staging = self.root / "tmp"
        staging.mkdir(parents=True, exist_ok=True)
        stage_dir = Path(tempfile.mkdtemp(prefix="import-", dir=staging))
        staged = stage_dir / "object"
        try:
            if move:
                shutil.move(str(src), staged)
            elif src.is_dir():
                shutil.copytree(src, staged, symlinks=True)
            else:
                shutil.copy2(src, staged)
            _check_tree(staged)  # a link may have appeared between check and move
            if staged.is_dir():
                entries = dir_manifest(staged)
                digest = sha256_bytes(manifest_text(entries).encode("utf-8"))
                files = [[rel, sha, size] for rel, sha, size in entries]
                size = sum(e[2] for e in entries)
            else:
                entries, files = [], None
                digest = sha256_file(staged)
                size = staged.stat().st_size
            count = len(entries) if staged.is_dir() else 1
            final = self.path_of(digest)
            if final.exists():
                self.verify_signature_file(digest)
                self.verify_content(digest)
                return StoredArtifact(digest, final, size, count)
            record: dict[str, Any] = {
                "digest": digest,
                "kind": kind,
                "name": name,
                "key_id": signer.key_id,
                "signature": base64.b64encode(signer.sign(_signed_message(digest, kind, name))).decode("ascii"),
            }
            if files is not None:
                record["files"] = files
            final.parent.mkdir(parents=True, exist_ok=True)
            self._write_sig(digest, record)
            # Moving a directory to another parent rewrites its "..", which needs write
            # permission on it: lock its top level only once it is in place.
            _make_read_only(staged, top=False)
            fsync_tree(staged)  # the ledger will say the object is here: it must be on disk, whole
            os.rename(staged, final)
            os.chmod(final, 0o555 if final.is_dir() else 0o444)
            fsync_dir(final.parent)
            return StoredArtifact(digest, final, size, count)
        finally:
            if staged.exists():
                _remove(staged)
            stage_dir.rmdir()

    def _write_sig(self, digest: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.sig_path_of(digest), record, mode=0o444, indent=1, ensure_ascii=True)

    # ------------------------------------------------------------------ verify

    def _read_sig(self, digest: str) -> dict[str, Any]:
        sig = self.sig_path_of(digest)
        try:
            record = json.loads(sig.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"artifact {digest} has no signature file {sig.name}", _FIX) from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StoreError(f"signature file of artifact {digest} is not JSON", _FIX) from None
        if not isinstance(record, dict) or record.get("digest") != digest:
            raise StoreError(f"signature file of artifact {digest} is for another digest", _FIX)
        return record

    def verify_signature_file(self, digest: str, trusted: dict[str, ec.EllipticCurvePublicKey] | None = None) -> dict[str, Any]:
        """Check the signature file's form and (if ``trusted`` is given) its signature."""
        record = self._read_sig(digest)
        kind, name, key_id = record.get("kind"), record.get("name"), record.get("key_id")
        if not (isinstance(kind, str) and isinstance(name, str) and isinstance(key_id, str)):
            raise StoreError(f"signature file of artifact {digest} lacks kind, name or key_id", _FIX)
        if trusted is not None:
            public_key = trusted.get(key_id)
            if public_key is None:
                raise StoreError(
                    f"artifact {digest} ({name}) is signed by key {key_id[:16]}…, which is not trusted",
                    "import the signer's public key into the trust store if it is legitimate",
                )
            try:
                signature = base64.b64decode(str(record.get("signature", "")), validate=True)
                verify_signature(public_key, signature, _signed_message(digest, kind, name))
            except (SigningError, ValueError):
                raise StoreError(
                    f"artifact {digest} ({name}): the signature does not verify (its kind or name was changed, or it was signed by another key)",
                    _FIX,
                ) from None
        return record

    def verify_content(self, digest: str) -> None:
        """Recompute the digest of the stored object; name the file that differs."""
        record = self._read_sig(digest)
        path = self.path_of(digest)
        label = f"artifact {digest} ({record.get('name', '?')})"
        if not path.exists():
            raise StoreError(f"{label} is missing from the store ({path})", _FIX)
        files = record.get("files")
        if path.is_dir():
            if not isinstance(files, list):
                raise StoreError(f"{label} is a directory but its signature file lists no files", _FIX)
            try:
                saved = {str(rel): (str(sha), int(size)) for rel, sha, size in files}
            except (TypeError, ValueError):
                raise StoreError(f"{label}: the file list in its signature file is malformed", _FIX) from None
            ordered = sorted(saved, key=lambda r: r.encode("utf-8"))
            text = manifest_text([(r, saved[r][0], saved[r][1]) for r in ordered])
            if sha256_bytes(text.encode("utf-8")) != digest:
                raise StoreError(f"{label}: the file list in its signature file does not hash to the digest (the signature file was edited)", _FIX)
            actual = {rel: sha for rel, sha, _ in dir_manifest(path)}
            problems = []
            for rel in ordered:
                if rel not in actual:
                    problems.append(f"file {rel} is missing")
                elif actual[rel] != saved[rel][0]:
                    problems.append(f"file {rel} differs")
            problems += [f"file {rel} is extra" for rel in sorted(set(actual) - set(saved))]
            problems += [f"{p.relative_to(path)} is not a regular file" for p in path.rglob("*") if p.is_symlink()]
            if problems:
                raise StoreError(f"{label} does not match its digest: " + "; ".join(problems), _FIX)
        else:
            if files is not None:
                raise StoreError(f"{label} should be a directory but is a file", _FIX)
            if sha256_file(path) != digest:
                raise StoreError(f"{label} does not match its digest: file {path.name} differs", _FIX)

    def verify(self, digest: str, trusted: dict[str, ec.EllipticCurvePublicKey]) -> None:
        """Check the artifact's signature by a trusted key and recompute its digest.

        Raises StoreError naming the artifact and, for a directory, each file that differs,
        is extra or is missing.
        """
        self.verify_signature_file(digest, trusted)
        self.verify_content(digest)
