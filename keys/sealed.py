"""Sealed files: artifacts that hold document text or tokens, encrypted at rest.

Why: deleting or overwriting a file does not reliably erase it from flash or from a
copy-on-write file system; destroying the only key of data that was never written in the
clear does (cryptographic erase). So every file that holds text or tokens is written sealed
under a random 256-bit *data key* of its artifact, and the key itself lives elsewhere,
wrapped by the node key (`wrap_key`), in the service's key table.

Format (64-byte header, then the ciphertext, as long as the plaintext)::

    magic "APSEAL01" | key id (16 bytes) | nonce (16) | key check (16) | reserved (8)

The cipher is AES-256 in counter mode: byte ``i`` of the plaintext is byte ``64 + i`` of the
file and its keystream block is ``nonce + i // 16``, so any window decrypts on its own —
training reads shards a window at a time, never the whole shard into memory. Integrity comes
from the plaintext sha256 the store signs for every file (a full read is checked against it);
the key check (an HMAC of the nonce under the key) makes a wrong key fail at open with a clear
error instead of returning noise.

The *keyring* is this process's map of key id -> key. The service fills it from its key
table; a job inherits the keys of its run through ``APPLIANCE_DATA_KEYS`` and which outputs
to seal through ``APPLIANCE_SEAL_PATHS`` (a path, or a folder prefix, -> key id). Readers use
`open_read`, which opens plain and sealed files alike, so a home made before sealing keeps
working; writers use `open_write`, which seals exactly the paths it was told to.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keys.errors import ApplianceError

MAGIC = b"APSEAL01"
HEADER_SIZE = 64
KEY_BYTES = 32
ENV_KEYS = "APPLIANCE_DATA_KEYS"
ENV_SEAL = "APPLIANCE_SEAL_PATHS"
CIPHER = "aes-256-ctr"
_MASK64 = (1 << 64) - 1
WRAP = "ecdh-p256-hkdf-sha256-aes256gcm"


class SealedDataError(ApplianceError):
    """A sealed file cannot be read: its key is not here (purged, or not given), or it is damaged."""


# ---------------------------------------------------------------------------- keyring

_LOCK = threading.Lock()
_KEYS: dict[str, bytes] = {}
_SEAL: dict[str, str] = {}
_ENV_LOADED = False


def new_key_id() -> str:
    """A fresh data key id: 32 hex digits (16 random bytes)."""
    return secrets.token_hex(16)


def new_key() -> tuple[str, bytes]:
    """A fresh (key id, 256-bit data key)."""
    return new_key_id(), secrets.token_bytes(KEY_BYTES)


def _load_env() -> None:
    global _ENV_LOADED
    if _ENV_LOADED:
        return
    _ENV_LOADED = True
    for name, target in ((ENV_KEYS, _KEYS), (ENV_SEAL, _SEAL)):
        text = os.environ.get(name, "")
        if not text:
            continue
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SealedDataError(f"{name} is not JSON: {exc}", "jobs get it from the service; do not set it by hand") from exc
        for k, v in data.items():
            target[str(k)] = bytes.fromhex(v) if target is _KEYS else str(v)  # type: ignore[assignment]


def add_key(key_id: str, key: bytes) -> None:
    """Put a data key in this process's keyring."""
    _check_id(key_id)
    if len(key) != KEY_BYTES:
        raise SealedDataError(f"data key {key_id} is {len(key)} bytes, not {KEY_BYTES}", "make data keys with keys.sealed.new_key")
    with _LOCK:
        _load_env()
        _KEYS[key_id] = bytes(key)


def forget_key(key_id: str) -> None:
    """Drop a data key from this process's keyring (a purge's first step in memory)."""
    with _LOCK:
        _load_env()
        _KEYS.pop(key_id, None)


def has_key(key_id: str) -> bool:
    with _LOCK:
        _load_env()
        return key_id in _KEYS


def get_key(key_id: str) -> bytes | None:
    with _LOCK:
        _load_env()
        return _KEYS.get(key_id)


def seal_path(path: Path | str, key_id: str) -> None:
    """Have `open_write` seal ``path`` (a file, or every file below a folder) under ``key_id``."""
    _check_id(key_id)
    with _LOCK:
        _load_env()
        _SEAL[os.path.abspath(path)] = key_id


def unseal_path(path: Path | str) -> None:
    with _LOCK:
        _load_env()
        _SEAL.pop(os.path.abspath(path), None)


def sealing_key_for(path: Path | str) -> str | None:
    """The key id ``path`` is to be sealed under (the longest matching entry), or None."""
    full = os.path.abspath(path)
    with _LOCK:
        _load_env()
        best, found = -1, None
        for prefix, key_id in _SEAL.items():
            if (full == prefix or full.startswith(prefix.rstrip(os.sep) + os.sep)) and len(prefix) > best:
                best, found = len(prefix), key_id
        return found


def reset_for_tests() -> None:
    """Empty the keyring and the seal map, and read the environment again on next use (tests only)."""
    global _ENV_LOADED
    with _LOCK:
        _KEYS.clear()
        _SEAL.clear()
        _ENV_LOADED = False


def job_environment(keys: dict[str, bytes], seal: dict[str, str]) -> dict[str, str]:
    """The environment entries that hand a job its data keys and what to seal."""
    return {
        ENV_KEYS: json.dumps({k: v.hex() for k, v in keys.items()}, sort_keys=True),
        ENV_SEAL: json.dumps({os.path.abspath(p): k for p, k in seal.items()}, sort_keys=True),
    }


def _check_id(key_id: str) -> None:
    if not (isinstance(key_id, str) and len(key_id) == 32 and all(c in "0123456789abcdef" for c in key_id)):
        raise SealedDataError(f"{key_id!r} is not a data key id (32 lowercase hex digits)", "pass the id the key table holds")


# ---------------------------------------------------------------------------- format


def _key_check(key: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, b"appliance sealed key check\0" + nonce, hashlib.sha256).digest()[:16]


def _keystream_cipher(key: bytes, nonce: bytes, offset: int) -> Any:
    """A decryptor/encryptor positioned at the 16-byte block holding ``offset``."""
    counter = (int.from_bytes(nonce, "big") + offset // 16) % (1 << 128)
    return Cipher(algorithms.AES(key), modes.CTR(counter.to_bytes(16, "big"))).encryptor()


def is_sealed(path: Path | str) -> bool:
    """Whether ``path`` is a sealed file (by its magic)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except (IsADirectoryError, FileNotFoundError):
        return False


def header_key_id(path: Path | str) -> str | None:
    """The data key id a sealed file names, or None for a plain file."""
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if head[: len(MAGIC)] != MAGIC:
        return None
    return head[8:24].hex()


def plain_size(path: Path | str) -> int:
    """The size of a file's plaintext (its size, less the header if it is sealed)."""
    size = os.stat(path).st_size
    return size - HEADER_SIZE if size >= HEADER_SIZE and is_sealed(path) else size


class SealedReader(io.RawIOBase):
    """A read-only, seekable view of a sealed file's plaintext; `pread` decrypts any window."""

    def __init__(self, path: Path | str) -> None:
        super().__init__()
        self.path = Path(path)
        self._f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        try:
            head = self._f.read(HEADER_SIZE)
            if len(head) < HEADER_SIZE or head[:8] != MAGIC:
                raise SealedDataError(f"{self.path} is not a sealed file (no header)", "the file is damaged: restore it from a backup")
            self.key_id = head[8:24].hex()
            self._nonce = head[24:40]
            key = get_key(self.key_id)
            if key is None:
                raise SealedDataError(
                    f"{self.path} is sealed under data key {self.key_id}, which this process does not hold",
                    "the key was destroyed by a purge, or the reading job was not given it; read it through the service",
                )
            if not hmac.compare_digest(_key_check(key, self._nonce), head[40:56]):
                raise SealedDataError(
                    f"{self.path}: data key {self.key_id} does not open it (key check failed)", "the file is damaged or was sealed under another key"
                )
            self._key = key
            self._counter = int.from_bytes(self._nonce, "big")
            self._fd = self._f.fileno()
            self._block: Any = None
            self._map: Any = None
            self.size = os.fstat(self._f.fileno()).st_size - HEADER_SIZE
        except BaseException:
            self._f.close()
            raise
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def pread(self, offset: int, n: int) -> bytes:
        """``n`` plaintext bytes from ``offset`` (fewer at the end of the file)."""
        n = max(0, min(n, self.size - offset))
        if n == 0:
            return b""
        lead = offset % 16
        data = os.pread(self._f.fileno(), n, HEADER_SIZE + offset)
        enc = _keystream_cipher(self._key, self._nonce, offset)
        if lead:
            enc.update(bytes(lead))  # advance the keystream to the byte offset inside its block
        return enc.update(data)

    def windows_at(self, offsets: Any, n: int) -> Any:
        """The plaintext of ``n`` bytes at each of ``offsets`` (a numpy int array): (k, n) uint8.

        Vectorised for a training batch: the ciphertext is memory-mapped (the page cache serves
        it as it serves a plain shard), every window's whole blocks are gathered in one copy,
        their counter blocks are built as one array and encrypted in one AES call, then XORed.
        """
        import numpy as np  # lazy: the service imports this module and never needs numpy

        offsets = np.asarray(offsets, dtype=np.int64)
        k = len(offsets)
        if k == 0 or n <= 0:
            return np.empty((k, max(n, 0)), dtype=np.uint8)
        if int(offsets.min()) < 0 or int(offsets.max()) + n > self.size:
            raise ValueError(f"{self.path}: a window of {n} bytes is not inside the plaintext's {self.size} bytes")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        blocks_per = (15 + n + 15) // 16
        width = blocks_per * 16
        first = offsets // 16
        lead = offsets - first * 16
        total = len(self._map)
        at = HEADER_SIZE + first * 16
        tail = at + width > total  # the last windows of a file: fewer whole blocks left than a row
        if tail.any():
            out = np.empty((k, n), dtype=np.uint8)
            for row in np.flatnonzero(tail):
                out[row] = np.frombuffer(self.pread(int(offsets[row]), n), dtype=np.uint8)
            body = np.flatnonzero(~tail)
            if len(body):
                out[body] = self.windows_at(offsets[body], n)
            return out
        # Row r of this strided view is the `width` bytes of the file from byte r: one copy
        # gathers every window's blocks.
        rows_view = np.lib.stride_tricks.as_strided(self._map, shape=(total - width + 1, width), strides=(1, 1), writeable=False)
        data = rows_view[at]
        base = self._counter & _MASK64
        counters = np.empty((k, blocks_per, 2), dtype=">u8")
        if base + (self.size // 16 + 1) <= _MASK64:
            # The usual case (all but 2**-44 or so of random nonces): the low half never wraps in
            # this file, so the high half is one constant and the low half one broadcast sum.
            counters[:, :, 0] = self._counter >> 64
            counters[:, :, 1] = (first.astype(np.uint64) + np.uint64(base))[:, None] + np.arange(blocks_per, dtype=np.uint64)
        else:
            lo = np.uint64(base) + first.astype(np.uint64)  # wraps modulo 2**64, as the low half does
            low = lo[:, None] + np.arange(blocks_per, dtype=np.uint64)
            counters[:, :, 1] = low
            # Carry into the high half where the low half wrapped (before the window, or inside it).
            carry = (lo < np.uint64(base))[:, None].astype(np.uint64) + (low < lo[:, None]).astype(np.uint64)
            counters[:, :, 0] = np.uint64(self._counter >> 64) + carry
        data ^= np.frombuffer(self._ecb().update(counters.view(np.uint8).reshape(-1)), dtype=np.uint8).reshape(k, width)
        starts = np.arange(k, dtype=np.int64) * width + lead
        every = np.lib.stride_tricks.as_strided(data.reshape(-1), shape=(k * width - n + 1, n), strides=(1, 1), writeable=False)
        return every[starts]

    def _ecb(self) -> Any:
        if self._block is None:
            # ECB here encrypts counter blocks, never data: it is the CTR keystream generator.
            self._block = Cipher(algorithms.AES(self._key), modes.ECB()).encryptor()
        return self._block

    def readinto(self, b: Any) -> int:
        data = self.pread(self._pos, len(b))
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        data = self.pread(self._pos, self.size - self._pos)
        self._pos += len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._map = None
            self._f.close()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a sealed file has no plaintext descriptor")


class SealedWriter(io.RawIOBase):
    """Writes a new sealed file: the header, then the plaintext encrypted as it arrives."""

    def __init__(self, path: Path | str, key_id: str) -> None:
        super().__init__()
        key = get_key(key_id)
        if key is None:
            raise SealedDataError(f"cannot seal {path}: data key {key_id} is not in this process's keyring", "jobs get their keys from the service")
        nonce = secrets.token_bytes(16)
        self.path = Path(path)
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(MAGIC + bytes.fromhex(key_id) + nonce + _key_check(key, nonce) + bytes(8))
        self._enc = _keystream_cipher(key, nonce, 0)

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._f.write(self._enc.update(data))
        return len(data)

    def flush(self) -> None:
        if not self.closed:
            self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes first
            self._f.close()


def open_read(path: Path | str) -> BinaryIO:
    """Open a file for reading its plaintext, sealed or not (buffered, seekable)."""
    f = open(path, "rb")  # noqa: SIM115 - the caller closes it
    try:
        sealed = f.read(len(MAGIC)) == MAGIC
        f.seek(0)
    except BaseException:
        f.close()
        raise
    if not sealed:
        return f  # a plain file: opened once, as before sealing
    f.close()
    return io.BufferedReader(SealedReader(path), buffer_size=1 << 20)


def open_write(path: Path | str, *, like: Path | str | None = None) -> BinaryIO:
    """Open a new file for writing: sealed when `seal_path` named it (or a folder above it).

    ``like`` is the name the file will be renamed to (a ``.partial`` written first, then moved
    into place): the file is sealed as that name would be, under that name's key.
    """
    key_id = sealing_key_for(path if like is None else like)
    if key_id is None:
        return open(path, "wb")  # noqa: SIM115 - the caller closes it
    return io.BufferedWriter(SealedWriter(path, key_id), buffer_size=1 << 20)


def iter_plain(path: Path | str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """A file's plaintext in chunks (sealed or not)."""
    with open_read(path) as f:
        while data := f.read(chunk):
            yield data


def read_plain(path: Path | str) -> bytes:
    with open_read(path) as f:
        return f.read()


# ---------------------------------------------------------------------------- wrapping


def _wrap_kek(shared: bytes, key_id: str, binding: str) -> bytes:
    info = b"appliance data key wrap v1\0" + key_id.encode() + b"\0" + binding.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def wrap_key(key_id: str, key: bytes, node_public: ec.EllipticCurvePublicKey, binding: str) -> dict[str, str]:
    """``key`` encrypted to the node key (ECIES: ephemeral ECDH, HKDF-SHA256, AES-256-GCM).

    ``binding`` (the artifact it seals) is bound into the KDF and the AEAD's associated data,
    so a wrapped key cannot be moved to another artifact's row unnoticed.
    """
    eph = ec.generate_private_key(ec.SECP256R1())
    kek = _wrap_kek(eph.exchange(ec.ECDH(), node_public), key_id, binding)
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(kek).encrypt(nonce, key, (key_id + "\0" + binding).encode())
    return {
        "key_id": key_id,
        "binding": binding,
        "wrap": WRAP,
        "ephemeral": eph.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint).hex(),
        "nonce": nonce.hex(),
        "wrapped": sealed.hex(),
    }


def unwrap_key(record: dict[str, str], node_private: ec.EllipticCurvePrivateKey) -> bytes:
    """The data key of a `wrap_key` record; SealedDataError if this node key did not wrap it."""
    try:
        eph = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(record["ephemeral"]))
        kek = _wrap_kek(node_private.exchange(ec.ECDH(), eph), record["key_id"], record["binding"])
        return AESGCM(kek).decrypt(bytes.fromhex(record["nonce"]), bytes.fromhex(record["wrapped"]), (record["key_id"] + "\0" + record["binding"]).encode())
    except (InvalidTag, ValueError, KeyError, TypeError) as exc:  # a changed entry, bad hex, a bad point: one answer
        raise SealedDataError(
            f"data key {record.get('key_id', '?')} does not unwrap with this node key",
            "the key table entry was changed, or it was wrapped by another node key (re-wrap keys when rotating the node key)",
        ) from exc
