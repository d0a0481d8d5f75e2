"""Token shards on disk: a fixed header with magic and version, then raw token ids.

Header (64 bytes, little-endian): magic ``b"APLTOKS\\0"``, format version (u32), bytes per
token (u32: 2 for uint16, 4 for uint32), token count (u64), vocabulary size (u32), zeros.
A shard set is a directory holding the shards and ``manifest.json``, which lists each
shard's split, token count and sha256; every shard is checked against it when opened.

A split with no tokens is not damage: the manifest says so, and it comes from the corpus and
the recipe (a one-document corpus sharded before the shard stage split such a document by
token range). ``require_val_tokens`` refuses it, and a val split shorter than one evaluation
window, with a hint naming the recipe settings that fix it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keys.digest import sha256_file
from pipeline.errors import DataError, ShardIntegrityError

MAGIC = b"APLTOKS\x00"
VERSION = 1
HEADER = struct.Struct("<8sIIQI36x")
MANIFEST = "manifest.json"
FORMAT_NAME = "appliance-token-shards"
FIX_HINT = "the shard set is damaged: restore it from the store (`appliance artifact verify DIGEST`) or re-run the shard stage"
# An empty or short val split is a recipe problem, not damage: the shard set holds what the
# corpus and the recipe gave it, and only a new run with a fixed recipe changes that.
VAL_FIX = (
    'give the corpus more than one document (`[ingest] split = "paragraphs"` makes one per paragraph of a big file) or more text, or raise [shard] val_fraction'
)
NEW_RUN = "then start a new run (`appliance run RECIPE`)"
VAL_HINT = f"fix the recipe so text is held out for validation: {VAL_FIX}; {NEW_RUN}"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (halves disk and page-cache use for small vocabularies)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write one shard file: header then the ids in the dtype the vocabulary allows."""
    dtype = dtype_for_vocab(vocab_size)
    arr = np.ascontiguousarray(tokens, dtype=dtype)
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, dtype.itemsize, arr.size, vocab_size))
        f.write(arr.tobytes())


def read_shard(path: Path) -> np.ndarray:
    """Memory-map one shard after checking its header; raises ShardIntegrityError naming the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise ShardIntegrityError(f"shard {path} is shorter than its {HEADER.size}-byte header", FIX_HINT)
    magic, version, itemsize, count, _vocab = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardIntegrityError(f"shard {path} has no token-shard magic (not a shard, or damaged)", FIX_HINT)
    if version != VERSION:
        raise ShardIntegrityError(
            f"shard {path} has format version {version}; this appliance reads version {VERSION}",
            "re-run the shard stage with this version of the appliance",
        )
    if itemsize not in (2, 4) or size != HEADER.size + itemsize * count:
        raise ShardIntegrityError(f"shard {path} is {size} bytes, but its header promises {count} tokens", FIX_HINT)
    dtype = np.uint16 if itemsize == 2 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


@dataclass
class ShardSet:
    """An opened, verified shard set. ``tokens(split)`` gives that split's ids in order."""

    root: Path
    manifest: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def bos_id(self) -> int:
        return int(self.manifest["bos_id"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    def shard_files(self, split: str) -> list[Path]:
        return [self.root / s["file"] for s in self.manifest["shards"] if s["split"] == split]

    def split_tokens(self, split: str) -> int:
        """Tokens of ``split`` as the manifest counts them (no shard is read)."""
        return split_tokens(self.manifest, split)

    def tokens(self, split: str) -> np.ndarray:
        """All ids of ``split`` as one array (memory-mapped when there is a single shard)."""
        parts = [read_shard(p) for p in self.shard_files(split)]
        if not parts:
            if split == "val":
                raise DataError(empty_val_message(self.root, self.manifest), VAL_HINT)
            raise DataError(f"shard set {self.root} has no '{split}' shards in its manifest", "re-run the shard stage on a dataset that holds text")
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def split_tokens(manifest: dict[str, Any], split: str) -> int:
    """Tokens of ``split`` summed over the manifest's shard entries."""
    return sum(int(e["tokens"]) for e in manifest["shards"] if e["split"] == split)


def empty_val_message(root: Path, manifest: dict[str, Any]) -> str:
    """Why a shard set has no validation tokens: its manifest says so, so it is not damaged."""
    documents = manifest.get("documents", {}).get("val")
    listed = f"{documents} validation documents" if documents is not None else "no validation shards"
    return (
        f"shard set {root} has no validation tokens (its manifest lists {listed}). It is not damaged: nothing"
        " was held out for validation, which is what the shard stage did with a corpus of one document"
        " (one big file ingested whole) before it learned to split such a document by token range"
    )


def require_val_tokens(root: Path, manifest: dict[str, Any], *, seq_len: int, source: str, knob: str = "") -> int:
    """The val split's token count; DataError if it is empty or shorter than one window of ``seq_len + 1``.

    ``source`` says where ``seq_len`` came from (``train.seq_len``) and ``knob`` which setting
    lowers it (default: ``source``), so the error can offer the fix. Reads only the manifest.
    """
    n = split_tokens(manifest, "val")
    if n == 0:
        raise DataError(empty_val_message(root, manifest), VAL_HINT)
    if n < seq_len + 1:
        # Evaluation does not shrink its window to fit: a loss over shorter contexts would not
        # compare with other runs' losses. So a run that could never measure one is refused.
        raise DataError(
            f"shard set {root} holds {n} validation tokens, fewer than one evaluation window of {seq_len + 1}"
            f" ({source} = {seq_len}, plus the next-token target): no validation loss could be measured",
            f"fix the recipe so more text is held out for validation: {VAL_FIX}; or lower {knob or source}; {NEW_RUN}",
        )
    return n


def read_manifest(root: Path) -> dict[str, Any]:
    """``root/manifest.json``, checked to be a shard manifest of this version; no shard is read."""
    mpath = Path(root) / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardIntegrityError(f"no {MANIFEST} in {root}: not a shard set", "point at the shard stage's output directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardIntegrityError(f"{mpath} is not valid JSON ({exc})", FIX_HINT) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME or manifest.get("version") != VERSION:
        raise ShardIntegrityError(f"{mpath} is not a version-{VERSION} {FORMAT_NAME} manifest", FIX_HINT)
    return manifest


def open_shards(root: Path, *, verify_digests: bool = True) -> ShardSet:
    """Open a shard set, checking every shard's sha256 and header against the manifest.

    Raises ShardIntegrityError naming the first shard that does not match.
    ``verify_digests=False`` skips only the sha256 (presence, headers and counts are still
    checked): for processes that share a node with one that has just verified the same files.
    """
    root = Path(root)
    mpath = root / MANIFEST
    manifest = read_manifest(root)
    for entry in manifest["shards"]:
        path = root / entry["file"]
        if not path.is_file():
            raise ShardIntegrityError(f"shard {path} listed in {mpath} is missing", FIX_HINT)
        actual = sha256_file(path) if verify_digests else entry["sha256"]
        if actual != entry["sha256"]:
            raise ShardIntegrityError(
                f"shard {path} does not match its manifest digest (sha256 {actual[:16]}…, expected {entry['sha256'][:16]}…): it was altered or corrupted",
                FIX_HINT,
            )
        if read_shard(path).size != entry["tokens"]:
            raise ShardIntegrityError(f"shard {path} token count differs from {mpath}", FIX_HINT)
    return ShardSet(root=root, manifest=manifest)


def write_manifest(root: Path, *, vocab_size: int, bos_id: int, eos_id: int, shards: list[dict[str, Any]], extra: dict[str, Any]) -> Path:
    """Write manifest.json for shards already in ``root`` (each entry: file, split, tokens)."""
    entries = [dict(s, sha256=sha256_file(root / s["file"])) for s in shards]
    manifest = {
        "format": FORMAT_NAME,
        "version": VERSION,
        "dtype": dtype_for_vocab(vocab_size).name,
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "shards": entries,
        **extra,
    }
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
