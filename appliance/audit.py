"""Read-only operations an auditor runs: they need public keys only, never the passphrase.

They open the ledger read-only; until the socket service lands they cannot run while a
writer holds the ledger (DuckDB lets one writer process lock out every other).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.home import Home
from keys.keystore import key_id_of, load_public_key
from registry.errors import StoreError
from registry.ledger import Ledger
from registry.query import query as sandboxed_query
from registry.store import Store


def trusted_keys(home: Home, extra: Sequence[Path] = ()) -> dict[str, Any]:
    """Public keys to trust: those given explicitly, else the home's node public key."""
    paths = list(extra) or [home.public_key_file]
    keys = {}
    for path in paths:
        pub = load_public_key(Path(path))
        keys[key_id_of(pub)] = pub
    return keys


def verify_ledger(home: Home, *, head: Path | None = None, keys: Sequence[Path] = ()) -> Any:
    """Recompute the whole chain and every signature, and check the signed head."""
    home.require()
    with Ledger.open(home.ledger_file, None, read_only=True) as ledger:
        return ledger.verify(trusted_keys(home, keys), head if head is not None else home.head_file)


def query(home: Home, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """One sandboxed, read-only SELECT over the ledger."""
    home.require()
    return sandboxed_query(home.ledger_file, sql)


def resolve_digest(home: Home, prefix: str, *, kind: str | None = None) -> str:
    """The full digest of the one recorded artifact whose digest starts with ``prefix``."""
    cleaned = prefix.removeprefix("sha256:").lower()
    if len(cleaned) < 8 or any(c not in "0123456789abcdef" for c in cleaned):
        raise StoreError(f"'{prefix}' is not a digest or digest prefix (at least 8 hex digits)", "copy the id from `appliance model list`")
    where = f" AND kind = '{kind}'" if kind else ""
    _, rows = query(home, f"SELECT DISTINCT digest FROM artifacts WHERE digest LIKE '{cleaned}%'{where}")
    if not rows:
        raise StoreError(f"no recorded {kind or 'artifact'} has a digest starting with {cleaned}", "list them with `appliance artifact list`")
    if len(rows) > 1:
        raise StoreError(f"{len(rows)} artifacts start with {cleaned}", "give more digits")
    return rows[0][0]


def verify_artifact(home: Home, digest: str, *, keys: Sequence[Path] = ()) -> Any:
    """Check a stored artifact on its own (digest, signature file) and through the ledger.

    Returns the ledger event that recorded it.
    """
    trusted = trusted_keys(home, keys)
    with Ledger.open(home.ledger_file, None, read_only=True) as ledger:
        event = ledger.recorded(digest, trusted)
    if event.data.get("store_path") is None:
        raise StoreError(
            f"artifact {digest[:16]}… is a recorded {event.data['kind']} ({event.data['name']}) that the store does not hold",
            "source files are recorded, not copied: verify them where they are with sha256sum",
        )
    Store(home.store_dir).verify(digest, trusted)
    return event
