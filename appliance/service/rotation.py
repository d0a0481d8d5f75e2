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

import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.home import Home
from appliance.service.caller import Caller
from appliance.service.core import HomeLock, Service
from appliance.service.datakeys import DataKeys
from keys.errors import ApplianceError, KeyStoreError
from keys.keystore import NodeKey, create_key, load_key, load_public_key, public_key_path
from keys.truststore import TrustStore, TrustStoreError, entry_for, read_store, write_store


def _exact_now() -> str:
    # Microseconds: a validity boundary must fall after the old key's last event, not at its second.
    return dt.datetime.now(dt.UTC).isoformat()


def _authorized(root: Path, passphrase: bytes, caller: Caller, action: str, subject: str, approval: str | None) -> None:
    with Service.open(root, passphrase) as svc:
        svc.authorize(caller, action, subject, approval=approval)


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


def rotate_node_key(root: Path, passphrase: bytes, root_key_file: Path, caller: Caller, *, approval: str | None = None) -> dict[str, Any]:
    """Replace the node key: the old one records its end, the trust store moves to the new one.

    ``approval``: the caller's approved request (`appliance request keys.rotate node`), where
    the policy puts keys.rotate under a two-person rule. The root key is checked first, so a
    wrong root key does not use the approval up.
    """
    home = Home(Path(root))
    _store_and_root(home, Path(root_key_file), passphrase)
    _authorized(root, passphrase, caller, "keys.rotate", "node key", approval)
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
        with trust_store_lock(home):
            store = _store_and_root(home, Path(root_key_file), passphrase)[0]  # as it is now (a key may have been added)
            changed = store.with_change(old.key_id, not_after=boundary).with_entry(entry_for(new, "node", "node", not_before=boundary))
            write_store(home.trust_file, changed, root_key)
        # Sealed artifacts' data keys must open under the new key: wrap each to it too.
        DataKeys(home.data_keys_dir, old).rewrap(new)
        os.replace(staged, home.key_file)
        os.replace(public_key_path(staged), home.public_key_file)
    finally:
        lock.release()
    Service.open(root, passphrase).close()  # records the store's new version and the new key, signed by the new key
    return {"old_key_id": old.key_id, "new_key_id": new.key_id, "at": boundary, "trust_store_version": changed.version}


def revoke_key(root: Path, passphrase: bytes, root_key_file: Path, caller: Caller, key_id: str, reason: str, *, approval: str | None = None) -> dict[str, Any]:
    """Mark a key revoked from now on, in a new root-signed trust store, and record it.

    The services it opens leave the release key locked: it may be the key revoked, and a
    revocation never signs with it.
    """
    from appliance.service import release

    with release.left_locked():
        return _revoke_key(root, passphrase, root_key_file, caller, key_id, reason, approval=approval)


def _revoke_key(root: Path, passphrase: bytes, root_key_file: Path, caller: Caller, key_id: str, reason: str, *, approval: str | None = None) -> dict[str, Any]:
    home = Home(Path(root))
    if not reason.strip():
        raise ApplianceError("a revocation needs a reason", 'pass --reason "…" (it is recorded with the key)')
    _store_and_root(home, Path(root_key_file), passphrase)
    _authorized(root, passphrase, caller, "keys.revoke", f"key {key_id}", approval)
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
        with trust_store_lock(home):
            store = _store_and_root(home, Path(root_key_file), passphrase)[0]
            changed = store.with_change(entry.key_id, revoked_at=at, revoked_reason=reason.strip())
            write_store(home.trust_file, changed, root_key)
    finally:
        lock.release()
    with Service.open(root, passphrase) as svc:
        svc.ledger.append("key.revoked", caller.user, {"key_id": entry.key_id, "role": entry.role, "owner": entry.owner, "at": at, "reason": reason.strip()})
    return {"key_id": entry.key_id, "role": entry.role, "revoked_at": at, "trust_store_version": changed.version}


@contextlib.contextmanager
def trust_store_lock(home: Home) -> Iterator[None]:
    """One writer of the trust store at a time (``keys/truststore.lock``), with or without the service running."""
    fd = os.open(home.trust_file.with_name("truststore.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_key(root: Path, root_key_file: Path, root_passphrase: bytes, public_key_file: Path, role: str, owner: str) -> dict[str, Any]:
    """Add a user or release public key to the trust store, signed by the root key.

    Holding the root key is the authority here. It works whether or not the service runs: a
    running service takes the new store on its next request, after checking its root signature
    and that it is newer, and records the key (``key.registered``); a stopped one does so when
    it starts. A user has one valid user key at a time.
    """
    import pwd

    from keys.keystore import key_id_of, public_key_from_pem

    home = Home(Path(root))
    home.require()
    if role not in ("user", "release"):
        raise ApplianceError(
            f"keys add takes user and release keys, not {role!r}", "node keys come from `appliance init` and `keys rotate`; the root key from `appliance init`"
        )
    if role == "user":
        try:
            pwd.getpwnam(owner)
        except KeyError:
            raise ApplianceError(
                f"there is no Unix user {owner!r} on this host", "a user key belongs to a user the kernel knows: pass their login name as --owner"
            ) from None
    try:
        pem = Path(public_key_file).read_bytes()
    except OSError as exc:
        raise ApplianceError(
            f"cannot read the public key {public_key_file}: {exc.strerror}", "pass the user.pub.pem that `appliance keys create` wrote"
        ) from None
    public = public_key_from_pem(pem, source=str(public_key_file))
    with trust_store_lock(home):
        store, root_key = _store_and_root(home, Path(root_key_file), root_passphrase)
        if role == "user" and store.current("user", owner):
            held = store.current("user", owner)[0]
            raise KeyStoreError(
                f"{owner} already has a valid user key {held.key_id[:16]}…",
                f"revoke it first (`appliance keys revoke {held.key_id[:16]} --reason …`), then add the new one",
            )
        changed = store.with_entry(entry_for(public, role, owner))
        write_store(home.trust_file, changed, root_key)
    return {"key_id": key_id_of(public), "role": role, "owner": owner, "trust_store_version": changed.version}
