"""Token shards on disk: a fixed header with magic and version, then raw token ids.

Header (64 bytes, little-endian): magic ``b"APLTOKS\\0"``, format version (u32), bytes per
token (u32: 2 for uint16, 4 for uint32), token count (u64), vocabulary size (u32), zeros.
A shard set is a directory holding the shards and ``manifest.json``, which lists each
shard's split, token count and sha256; every shard is checked against it when opened.

A shard is written through `keys.sealed.open_write`, so a job told to seal its shard set writes
it encrypted (the header above is then part of the plaintext). `read_shard` memory-maps a plain
shard and gives a sealed one as `SealedTokens`, which decrypts only the windows read from it.

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
from keys.sealed import SealedReader, is_sealed, open_write
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
    """Write one shard file: header then the ids in the dtype the vocabulary allows (sealed if told to)."""
    dtype = dtype_for_vocab(vocab_size)
    arr = np.ascontiguousarray(tokens, dtype=dtype)
    with open_write(path) as f:
        f.write(HEADER.pack(MAGIC, VERSION, dtype.itemsize, arr.size, vocab_size))
        f.write(arr.tobytes())


class SealedTokens:
    """A sealed shard's token ids, read like the read-only np.memmap of a plain shard.

    Indexing with an int or a slice decrypts only the bytes it covers; ``np.asarray(tokens)``
    decrypts the whole shard. `windows` decrypts many equal-length windows in one AES call
    (the training loader's batches). Holds the file open until `close` (or garbage collection).
    """

    ndim = 1

    def __init__(self, reader: SealedReader, dtype: np.dtype, count: int) -> None:
        self.path = reader.path
        self.dtype = np.dtype(dtype)
        self.size = count
        self.shape = (count,)
        self._reader = reader

    def __len__(self) -> int:
        return self.size

    def _read(self, begin: int, end: int) -> np.ndarray:
        n = max(0, end - begin)
        item = self.dtype.itemsize
        return np.frombuffer(self._reader.pread(HEADER.size + begin * item, n * item), dtype=self.dtype, count=n)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            begin, end, step = key.indices(self.size)
            if step == 1:
                return self._read(begin, end)
            picked = range(begin, end, step)
            if not picked:
                return self._read(0, 0)
            lo, hi = min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1
            return self._read(lo, hi)[picked[0] - lo :: step]
        if isinstance(key, int | np.integer):
            i = int(key) + self.size if key < 0 else int(key)
            if not 0 <= i < self.size:
                raise IndexError(f"index {int(key)} is out of bounds for shard {self.path} of {self.size} tokens")
            return self._read(i, i + 1)[0]
        raise TypeError(f"a sealed shard takes an int or a slice, not {type(key).__name__}")

    def windows(self, starts: list[int], length: int) -> np.ndarray:
        """A (len(starts), length) array of the ``length`` ids from each start, decrypted together."""
        return self.take(np.asarray(starts, dtype=np.int64), length)

    def take(self, starts: np.ndarray, length: int) -> np.ndarray:
        """A (len(starts), length) array of the ``length`` ids from each start (an int array), vectorised."""
        item = self.dtype.itemsize
        rows = self._reader.windows_at(HEADER.size + np.asarray(starts, dtype=np.int64) * item, length * item)
        return rows.view(self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self._read(0, self.size)
        return arr if dtype is None else arr.astype(dtype)

    def close(self) -> None:
        self._reader.close()


def _shard_header(path: Path, head: bytes, size: int) -> tuple[np.dtype, int]:
    """(dtype, token count) of a shard whose plaintext starts with ``head`` and is ``size`` bytes."""
    if len(head) < HEADER.size:
        raise ShardIntegrityError(f"shard {path} is shorter than its {HEADER.size}-byte header", FIX_HINT)
    magic, version, itemsize, count, _vocab = HEADER.unpack(head)
    if magic != MAGIC:
        raise ShardIntegrityError(f"shard {path} has no token-shard magic (not a shard, or damaged)", FIX_HINT)
    if version != VERSION:
        raise ShardIntegrityError(
            f"shard {path} has format version {version}; this appliance reads version {VERSION}",
            "re-run the shard stage with this version of the appliance",
        )
    if itemsize not in (2, 4) or size != HEADER.size + itemsize * count:
        raise ShardIntegrityError(f"shard {path} is {size} bytes, but its header promises {count} tokens", FIX_HINT)
    return np.dtype(np.uint16 if itemsize == 2 else np.uint32), count


def read_shard(path: Path) -> np.ndarray | SealedTokens:
    """One shard after checking its header: memory-mapped if plain, a `SealedTokens` if sealed.

    Raises ShardIntegrityError naming the file (and `keys.sealed.SealedDataError`, naming file
    and key, for a sealed shard whose key this process lacks).
    """
    path = Path(path)
    if is_sealed(path):
        reader = SealedReader(path)
        try:
            dtype, count = _shard_header(path, reader.pread(0, HEADER.size), reader.size)
        except BaseException:
            reader.close()
            raise
        return SealedTokens(reader, dtype, count)
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    dtype, count = _shard_header(path, raw, path.stat().st_size)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


def shard_token_count(path: Path) -> int:
    """Tokens in one shard, from its checked header (a sealed shard's file is closed again)."""
    tokens = read_shard(path)
    if isinstance(tokens, SealedTokens):
        tokens.close()
    return int(tokens.size)


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

    def tokens(self, split: str) -> np.ndarray | SealedTokens:
        """All ids of ``split`` as one array (memory-mapped, or `SealedTokens`, when there is a single shard)."""
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
        if shard_token_count(path) != entry["tokens"]:
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
