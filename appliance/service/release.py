"""The release key: the home's key that signs model exports for other sites.

It lives in ``keys/release.key``, encrypted under the node key's passphrase, so the service
unlocks it when it opens with no second secret to keep. What makes it usable is its entry in
the root-signed trust store (role ``release``, owner ``release``), never its presence in the
home: a service that finds a release key the store does not trust for that role now
(unknown, revoked, expired) refuses to start, naming the key and why.

`appliance keys release-init` makes it. It needs the root key and works while the service
runs (the store is written under the trust-store lock, as `keys add` does): the running
service records the new key (``key.registered``) on its next request, but signs with it only
once restarted, since the release key is unlocked where the passphrase is, at open.
A revoked release key is never deleted: its file is kept aside as
``keys/release-revoked-<keyid16>.key`` (what it signed stays verifiable through its entry).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from appliance.home import Home
from keys.errors import KeyStoreError
from keys.files import fsync_dir
from keys.keystore import NodeKey, create_key, key_id_of, load_key, load_public_key, public_key_path
from keys.truststore import TrustStore, UntrustedKeyError, entry_for, write_store

ROLE = OWNER = "release"
INIT_HINT = "make one with `appliance keys release-init --root-key ROOT.key` (as the service user), then restart the service"

# `keys revoke` records a revocation through the service; revoking the release key would
# otherwise be refused by that very service, which cannot open with a revoked release key in
# the home. Revocation never signs with the release key, so its opens leave it locked.
_LEFT_LOCKED: ContextVar[bool] = ContextVar("release_key_left_locked", default=False)


@contextlib.contextmanager
def left_locked() -> Iterator[None]:
    """Services opened in this block do not unlock (nor check) the release key."""
    token = _LEFT_LOCKED.set(True)
    try:
        yield
    finally:
        _LEFT_LOCKED.reset(token)


# -- the service side ---------------------------------------------------------------------


def unlock(home: Home, passphrase: bytes) -> NodeKey | None:
    """The home's release key, unlocked with the node's passphrase; None where there is none.

    Not yet trusted: `check` does that once the service has read the trust store.
    """
    if _LEFT_LOCKED.get() or not home.release_key_file.exists():
        return None
    return load_key(home.release_key_file, passphrase)


def check(home: Home, key: NodeKey | None, trust: TrustStore) -> None:
    """Raise UntrustedKeyError, naming the file, the key and why, unless ``key`` is a release key of ``trust`` valid now."""
    if key is None:
        return
    now = dt.datetime.now(dt.UTC)
    try:
        trust.require(key.key_id, ROLE, at=now)
    except UntrustedKeyError as exc:
        entry = trust.entry(key.key_id)
        status = entry.status_at(now) if entry is not None and entry.role == ROLE else "untrusted"
        if status in ("revoked", "expired"):
            hint = f"it may sign nothing more; {INIT_HINT} (that keeps this file aside as keys/release-{status}-{key.key_id[:16]}.key)"
        elif status == "not yet valid":
            hint = "its validity has not begun (`appliance keys list` shows when it does): check this host's clock"
        else:
            hint = (
                f"a key file in the home proves nothing: restore the genuine {home.release_key_file} from a backup, "
                f"or move this one out of the home and {INIT_HINT}"
            )
        raise UntrustedKeyError(f"the release key {home.release_key_file} cannot be used: {exc.message}", hint) from None


def require(svc: Any) -> NodeKey:
    """The service's release key, trusted for the release role now; else a typed error saying how to get one."""
    key: NodeKey | None = svc.release_key
    path = svc.home.release_key_file
    if key is None:
        since = f"{path} was made after this service started" if path.exists() else f"this home has no release key ({path})"
        raise KeyStoreError(f"{since}: nothing can be signed for release", INIT_HINT)
    check(svc.home, key, svc.trust)  # its validity may have ended while the service ran
    return key


def holds(home: Home, key_id: str) -> bool:
    """Whether the home's release key file is the key ``key_id`` (by its public half: for messages only)."""
    try:
        return key_id_of(load_public_key(public_key_path(home.release_key_file))) == key_id
    except KeyStoreError:
        return False


# -- release-init ----------------------------------------------------------------------------


def release_init(root: Path, passphrase: bytes, root_key_file: Path, root_passphrase: bytes) -> dict[str, Any]:
    """Make the home's release key and trust it for the release role, signed by the root key.

    ``passphrase`` is the node key's (checked by unlocking it): the service unlocks the release
    key with it. Refused where the trust store already has a valid release key, or the home a
    release key file that is not revoked or expired; a revoked one is kept aside first.
    """
    from appliance.service.rotation import _store_and_root, trust_store_lock

    home = Home(Path(root))
    home.require()
    load_key(home.key_file, passphrase)  # a release key under any other passphrase would stop the service
    path = home.release_key_file
    staged = path.with_name("release-next.key")
    with trust_store_lock(home):
        store, root_key = _store_and_root(home, Path(root_key_file), root_passphrase)
        current = store.current(ROLE)
        if current and not path.exists() and staged.exists() and load_key(staged, passphrase).key_id == current[0].key_id:
            # An earlier release-init stopped after writing the store: finish it.
            _install(staged, path)
            return _result(home, current[0].key_id, store.version, None)
        if current:
            held = current[0]
            raise KeyStoreError(
                f"the trust store {home.trust_file} already has a valid release key {held.key_id[:16]}… ({held.owner})",
                f"use it; to replace it, revoke it first (`appliance keys revoke {held.key_id[:16]} --reason … --root-key KEY`)",
            )
        aside = _set_aside_retired(home, store, passphrase) if path.exists() else None
        for leftover in (staged, public_key_path(staged)):
            leftover.unlink(missing_ok=True)  # a release-init that stopped before its store was written
        key = create_key(staged, passphrase)
        changed = store.with_entry(entry_for(key, ROLE, OWNER))
        write_store(home.trust_file, changed, root_key)
        _install(staged, path)
    return _result(home, key.key_id, changed.version, aside)


def _set_aside_retired(home: Home, store: TrustStore, passphrase: bytes) -> Path:
    """Move a revoked or expired release key (and its public half) to ``release-<status>-<keyid16>.key``."""
    path = home.release_key_file
    old = load_key(path, passphrase)
    entry = store.entry(old.key_id)
    status = entry.status_at(dt.datetime.now(dt.UTC)) if entry is not None and entry.role == ROLE else None
    if status not in ("revoked", "expired"):
        why = "is not a release key of the trust store" if status is None else f"is {status}"
        raise KeyStoreError(
            f"{path} holds key {old.key_id[:16]}…, which {why}: refusing to replace it",
            "a key file in the home proves nothing: restore the genuine release key from a backup, or move this file out of the home, then run this again",
        )
    aside = path.with_name(f"release-{status}-{old.key_id[:16]}.key")
    for src, dst in ((path, aside), (public_key_path(path), public_key_path(aside))):
        if not src.exists():
            continue
        try:
            os.link(src, dst)  # never over an earlier file set aside
        except FileExistsError:
            raise KeyStoreError(f"{dst} already exists: refusing to overwrite a release key kept aside", f"compare it with {src} and remove the copy") from None
        src.unlink()
    fsync_dir(path.parent)
    return aside


def _install(staged: Path, path: Path) -> None:
    os.replace(staged, path)
    os.replace(public_key_path(staged), public_key_path(path))
    fsync_dir(path.parent)


def _result(home: Home, key_id: str, version: int, aside: Path | None) -> dict[str, Any]:
    path = home.release_key_file
    return {
        "key_id": key_id,
        "key_file": str(path),
        "public_key": str(public_key_path(path)),
        "trust_store_version": version,
        "set_aside": str(aside) if aside else None,
    }
