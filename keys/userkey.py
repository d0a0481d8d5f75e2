"""A person's user key: made by that person, in their own account, for signing approvals.

The key file is the node key's format (ECDSA P-256, encrypted with AES-256-GCM under an
Argon2id key from the user's passphrase) at ``$XDG_CONFIG_HOME/appliance/user.key``
(default ``~/.config/appliance/user.key``), mode 0600 in a 0700 folder. Only its public half
(``user.pub.pem``) leaves the account: an admin adds it to the trust store under the root key,
with the user as its owner. The private half is unlocked in memory, in the user's own
process, only to sign a decision.
"""

from __future__ import annotations

import os
from pathlib import Path

from keys.errors import KeyStoreError
from keys.keystore import NodeKey, create_key, load_key
from keys.passphrase import read_passphrase

ENV_USER_KEY = "APPLIANCE_USER_KEY"
ENV_USER_PASSPHRASE = "APPLIANCE_USER_PASSPHRASE"
ENV_USER_PASSPHRASE_FILE = "APPLIANCE_USER_PASSPHRASE_FILE"


def default_user_key_path() -> Path:
    """``$APPLIANCE_USER_KEY``, else ``$XDG_CONFIG_HOME/appliance/user.key``, else ``~/.config/appliance/user.key``."""
    if os.environ.get(ENV_USER_KEY):
        return Path(os.environ[ENV_USER_KEY])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "appliance" / "user.key"


def user_passphrase(path: Path, *, confirm: bool = False) -> bytes:
    """The user key's passphrase: ``$APPLIANCE_USER_PASSPHRASE``, the file named by
    ``$APPLIANCE_USER_PASSPHRASE_FILE``, or the terminal (never the node's passphrase variables)."""
    return read_passphrase(
        purpose=f"{'protect the new' if confirm else 'unlock your'} user key {path}",
        confirm=confirm,
        env=ENV_USER_PASSPHRASE,
        env_file=ENV_USER_PASSPHRASE_FILE,
        credential=False,
    )


def create_user_key(path: Path | None = None) -> tuple[NodeKey, Path]:
    """Make the caller's user key (refuses to replace one). Returns the key and its path."""
    path = path or default_user_key_path()
    if path.exists():
        raise KeyStoreError(
            f"you already have a user key at {path}",
            "use it (its public half is beside it, user.pub.pem); to replace a lost or leaked one, ask an admin to revoke it first, then move the file away",
        )
    return create_key(path, user_passphrase(path, confirm=True)), path


def load_user_key(path: Path | None = None) -> NodeKey:
    """Unlock the caller's user key."""
    path = path or default_user_key_path()
    if not path.exists():
        raise KeyStoreError(
            f"no user key at {path}",
            "make one with `appliance keys create`, and have an admin add its public half to the trust store (`appliance keys add`)",
        )
    try:
        return load_key(path, user_passphrase(path))
    except KeyStoreError as exc:
        if "wrong passphrase" not in exc.message:
            raise
        raise KeyStoreError(
            exc.message,
            f"give the passphrase you chose at `appliance keys create` through {ENV_USER_PASSPHRASE} or {ENV_USER_PASSPHRASE_FILE}, or on a terminal",
        ) from None
