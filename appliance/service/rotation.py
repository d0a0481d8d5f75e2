"""Rotating and revoking keys: a new trust store signed by the root key, and the ledger told.

Both run in local mode, as the service user, with the service stopped (the root key is
brought from where it is kept offline). Each is authorized under the policy first and
recorded, like every other action.

Rotation of the node key: the old key records ``key.rotated`` (its last event), its validity
ends just after that (``not_after``), and a new key, valid from the same instant, signs from
then on. What the old key signed stays verifiable as "signed by a key valid at that time";
anything it signs later fails verification. The key files are swapped last: a crash before
that leaves the old key file with an expired key, which the service refuses, naming it.

Revocation: ``revoked_at`` now, with a reason. Every later use fails, naming the key and when
it was revoked. The node key in use cannot be revoked (rotate it first); nor can the root.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from appliance.home import Home
from appliance.service.caller import Caller
from appliance.service.core import HomeLock, Service
from keys.errors import ApplianceError, KeyStoreError
from keys.keystore import NodeKey, create_key, load_key, load_public_key, public_key_path
from keys.truststore import TrustStore, TrustStoreError, entry_for, read_store, write_store


def _exact_now() -> str:
    # Microseconds: a validity boundary must fall after the old key's last event, not at its second.
    return dt.datetime.now(dt.UTC).isoformat()


def _authorized(root: Path, passphrase: bytes, caller: Caller, action: str, subject: str) -> None:
    with Service.open(root, passphrase) as svc:
        svc.authorize(caller, action, subject)


def _store_and_root(home: Home, root_key_file: Path, passphrase: bytes) -> tuple[TrustStore, NodeKey]:
    anchor_path, anchor_source = home.root_anchor()
    store = read_store(home.trust_file, load_public_key(anchor_path), anchor_source=anchor_source)
    root_key = load_key(root_key_file, passphrase)
    if root_key.key_id != store.root_key_id:
        raise TrustStoreError(
            f"{root_key_file} holds key {root_key.key_id[:16]}…, not the trust store's root {store.root_key_id[:16]}…",
            "give the root key this home's trust store was signed with",
        )
    return store, root_key


def rotate_node_key(root: Path, passphrase: bytes, root_key_file: Path, caller: Caller) -> dict[str, Any]:
    """Replace the node key: the old one records its end, the trust store moves to the new one."""
    home = Home(Path(root))
    _authorized(root, passphrase, caller, "keys.rotate", "node key")
    lock = HomeLock(home)
    lock.acquire()
    staged = home.key_file.with_name("node-next.key")
    try:
        old = load_key(home.key_file, passphrase)
        store, root_key = _store_and_root(home, Path(root_key_file), passphrase)
        for leftover in (staged, public_key_path(staged)):
            leftover.unlink(missing_ok=True)  # a rotation that crashed before its store was written
        new = create_key(staged, passphrase)
    finally:
        lock.release()
    # The old key's last event, before its validity ends.
    with Service.open(root, passphrase) as svc:
        svc.ledger.append("key.rotated", caller.user, {"role": "node", "key_id": old.key_id, "new_key_id": new.key_id})
    boundary = _exact_now()
    lock.acquire()
    try:
        changed = store.with_change(old.key_id, not_after=boundary).with_entry(entry_for(new, "node", "node", not_before=boundary))
        write_store(home.trust_file, changed, root_key)
        os.replace(staged, home.key_file)
        os.replace(public_key_path(staged), home.public_key_file)
    finally:
        lock.release()
    with Service.open(root, passphrase) as svc:  # records the store's new version, signed by the new key
        svc.ledger.append("key.registered", caller.user, {"key_id": new.key_id, "public_key_pem": new.public_pem().decode(), "role": "node"})
    return {"old_key_id": old.key_id, "new_key_id": new.key_id, "at": boundary, "trust_store_version": changed.version}


def revoke_key(root: Path, passphrase: bytes, root_key_file: Path, caller: Caller, key_id: str, reason: str) -> dict[str, Any]:
    """Mark a key revoked from now on, in a new root-signed trust store, and record it."""
    home = Home(Path(root))
    _authorized(root, passphrase, caller, "keys.revoke", f"key {key_id}")
    if not reason.strip():
        raise ApplianceError("a revocation needs a reason", 'pass --reason "…" (it is recorded with the key)')
    lock = HomeLock(home)
    lock.acquire()
    try:
        store, root_key = _store_and_root(home, Path(root_key_file), passphrase)
        matches = [e for e in store.entries if e.key_id.startswith(key_id)] if len(key_id) >= 8 else []
        if len(matches) != 1:
            raise KeyStoreError(
                f"{key_id!r} names {'no' if not matches else 'more than one'} key of the trust store",
                "give at least 8 characters of a key id from `appliance keys list`",
            )
        entry = matches[0]
        node = load_public_key(home.public_key_file)
        from keys.keystore import key_id_of

        if entry.role == "root":
            raise KeyStoreError(f"key {entry.key_id[:16]}… is the root key", "a root key is replaced by making a new trust store, not revoked in its own")
        if entry.key_id == key_id_of(node):
            raise KeyStoreError(
                f"key {entry.key_id[:16]}… is the node key this service signs with",
                "rotate it first (`appliance keys rotate --root-key KEY`), then revoke the old one",
            )
        if entry.revoked_at is not None:
            raise KeyStoreError(f"key {entry.key_id[:16]}… was already revoked at {entry.revoked_at}", "nothing to do")
        at = _exact_now()
        changed = store.with_change(entry.key_id, revoked_at=at, revoked_reason=reason.strip())
        write_store(home.trust_file, changed, root_key)
    finally:
        lock.release()
    with Service.open(root, passphrase) as svc:
        svc.ledger.append("key.revoked", caller.user, {"key_id": entry.key_id, "role": entry.role, "owner": entry.owner, "at": at, "reason": reason.strip()})
    return {"key_id": entry.key_id, "role": entry.role, "revoked_at": at, "trust_store_version": changed.version}
