"""sha256 digests of files and directories, shared by every layer.

A directory's digest is the sha256 of its manifest: one line per regular file,
``<sha256 hex>  <posix relative path>\\n``, sorted by the path's UTF-8 bytes — exactly what
``sha256sum`` prints, so a third party can recompute it with coreutils::

    (cd DIR && find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from keys.sealed import open_read

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's contents, read in 1 MiB chunks.

    A sealed file (`keys.sealed`) is hashed by its plaintext, so an artifact's digest is the
    same sealed or not and a third party's ``sha256sum`` of the exported plaintext agrees.
    """
    return _hash_and_size(path)[0]


def _hash_and_size(path: Path) -> tuple[str, int]:
    """sha256 and length of a file's plaintext, in one read (sealed or not)."""
    h = hashlib.sha256()
    size = 0
    with open_read(path) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def dir_manifest(path: Path) -> list[tuple[str, str, int]]:
    """(relative posix path, sha256, size) of every regular file below ``path``, sorted."""
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in files:
            full = Path(root) / name
            if full.is_symlink() or not full.is_file():
                continue
            rel = full.relative_to(path).as_posix()
            digest, size = _hash_and_size(full)
            entries.append((rel, digest, size))
    entries.sort(key=lambda e: e[0].encode("utf-8"))
    return entries


def manifest_text(entries: list[tuple[str, str, int]]) -> str:
    """The manifest in sha256sum's format (the bytes a directory digest is taken over)."""
    return "".join(f"{digest}  {rel}\n" for rel, digest, _ in entries)


def sha256_path(path: Path) -> str:
    """Digest of a file, or of a directory's sorted per-file manifest."""
    path = Path(path)
    if path.is_dir():
        return sha256_bytes(manifest_text(dir_manifest(path)).encode("utf-8"))
    return sha256_file(path)
