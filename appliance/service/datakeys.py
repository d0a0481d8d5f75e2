"""The data key table: one wrapped key per sealed artifact, owned by the service.

Every artifact that holds document text or tokens is sealed (`keys.sealed`) under its own
random data key. The table is a folder of the home's ``keys/`` (0700), far from the store,
one small file per key (``<key id>.json``: the key wrapped to the node key, bound to the
artifact's digest), so a wrapped key is never next to its data and destroying one key is
overwriting and unlinking one file. The ledger records each key's creation and destruction
(ids and digests, never key material) for auditors.

A stage's output keys are made in memory before the job starts and written here only once
the output is in the store: a job that dies leaves ciphertext whose key never reached disk.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keys import sealed
from keys.files import atomic_write_json, fsync_dir, overwrite_and_unlink
from keys.keystore import NodeKey
from keys.sealed import SealedDataError

# Output names (of the stage table) whose files hold document text or tokens: sealed.
SEALED_OUTPUTS = ("raw", "rejects", "dataset", "dropped", "shards", "examples")
SEALED_KINDS = ("raw-documents", "ingest-rejects", "dataset", "dropped-samples", "token-shards", "finetune-examples")


class DataKeys:
    """The service's data keys: the table on disk and this process's keyring."""

    def __init__(self, folder: Path, node_key: NodeKey) -> None:
        self.folder = Path(folder)
        self.node_key = node_key
        self._lock = threading.Lock()
        self._by_digest: dict[str, str] = {}
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def load(self) -> int:
        """Unwrap every key of the table into the keyring; returns how many."""
        n = 0
        for path in sorted(self.folder.glob("*.json")):
            record = self._read(path)
            sealed.add_key(record["key_id"], self._unwrap(record, path))
            if set(record["wraps"]) != {self.node_key.key_id}:
                # A finished rotation: drop the wraps to retired node keys.
                record["wraps"] = {self.node_key.key_id: record["wraps"][self.node_key.key_id]}
                atomic_write_json(path, record, mode=0o600)
            self._by_digest[record["binding"]] = record["key_id"]
            n += 1
        return n

    def _unwrap(self, record: dict[str, Any], path: Path) -> bytes:
        wrap = (record.get("wraps") or {}).get(self.node_key.key_id)
        if wrap is None:
            raise SealedDataError(
                f"data key table entry {path} is not wrapped to the node key {self.node_key.key_id[:16]}…",
                "it was made under another node key: restore the keys/data folder that goes with this node key",
            )
        return self.node_key.unwrap_data_key(wrap)

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SealedDataError(f"data key table entry {path} cannot be read: {exc}", "restore the home's keys/data folder from a backup") from exc
        if not isinstance(record, dict) or path.stem != record.get("key_id"):
            raise SealedDataError(f"data key table entry {path} does not name its own key", "restore the home's keys/data folder from a backup")
        return record

    # -- a stage's keys -----------------------------------------------------------------

    def new(self) -> str:
        """A fresh key, in the keyring only (until `bind`)."""
        key_id, key = sealed.new_key()
        sealed.add_key(key_id, key)
        return key_id

    def bind(self, key_id: str, digest: str, kind: str) -> dict[str, Any]:
        """Write ``key_id`` to the table, wrapped and bound to the stored artifact ``digest``."""
        key = sealed.get_key(key_id)
        if key is None:
            raise SealedDataError(f"data key {key_id} is not in the service's keyring", "re-run the stage")
        record = {
            "key_id": key_id,
            "binding": digest,
            "kind": kind,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "wraps": {self.node_key.key_id: sealed.wrap_key(key_id, key, self.node_key.public_key, digest)},
        }
        with self._lock:
            atomic_write_json(self.folder / f"{key_id}.json", record, mode=0o600)
            fsync_dir(self.folder)
            self._by_digest[digest] = key_id
        return {"key_id": key_id, "cipher": sealed.CIPHER, "wrap": sealed.WRAP}

    def discard(self, key_id: str) -> None:
        """Forget a key that was never bound (an output not produced, or already stored)."""
        if not (self.folder / f"{key_id}.json").exists():
            sealed.forget_key(key_id)

    def key_of(self, digest: str) -> str | None:
        with self._lock:
            return self._by_digest.get(digest)

    def env_for(self, digests: list[str], extra_keys: Sequence[str] = ()) -> dict[str, str]:
        """The environment that gives a job the keys of its inputs (their digests) and outputs (key ids).

        What to seal travels in the job's spec (key ids and output names), not here.
        """
        ids = [k for d in digests if (k := self.key_of(d))] + list(extra_keys)
        keys = {k: v for k in ids if (v := sealed.get_key(k)) is not None}
        return sealed.job_environment(keys, {})

    # -- destruction ----------------------------------------------------------------------

    def entry(self, key_id: str) -> Path:
        return self.folder / f"{key_id}.json"

    def destroy(self, key_id: str) -> bool:
        """Crypto-erase: overwrite and unlink the key's table entry, drop it from memory. Idempotent."""
        sealed.forget_key(key_id)
        with self._lock:
            for digest, kid in list(self._by_digest.items()):
                if kid == key_id:
                    del self._by_digest[digest]
            path = self.entry(key_id)
            if path.exists():
                overwrite_and_unlink(path)
                return True
            return False

    def rewrap(self, new_key: NodeKey) -> int:
        """Add a wrap to ``new_key`` to every entry (node key rotation), keeping the old one.

        Crash-safe in either order: until the new node key is in place the old wraps open
        the keys; afterwards the new ones do. Each entry is replaced atomically.
        """
        n = 0
        for path in sorted(self.folder.glob("*.json")):
            record = self._read(path)
            key = self._unwrap(record, path)
            record.setdefault("wraps", {})[new_key.key_id] = sealed.wrap_key(record["key_id"], key, new_key.public_key, record["binding"])
            atomic_write_json(path, record, mode=0o600)
            n += 1
        fsync_dir(self.folder)
        return n
