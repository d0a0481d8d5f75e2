"""The trust store: which public keys the appliance trusts, for which role, when; signed by the root key.

A key merely present in a home proves nothing: whoever can write the home can drop a key
file there. What makes a key trusted is an entry here, and what makes the entries
trustworthy is the root key's signature over all of them. The root key is kept offline;
its public half (the *anchor*) is what a verifier must obtain out of band, e.g. installed
root-owned under ``/etc/appliance`` where the service user cannot replace it.

Roles (ISSUE: keys with roles):

* ``root``    signs this store and the policies; kept offline;
* ``node``    the service: ledger events, stored artifacts, packaged models;
* ``release`` signs exports for other sites;
* ``user``    a person's approvals; one per user, created by that user.

An entry is valid from ``not_before`` until ``not_after`` (rotation ends a key's validity:
what it signed before stays verifiable as "signed by a key valid at that time") or until
``revoked_at`` (every later use fails, naming the key and when it was revoked). Times are
UTC ISO 8601 strings, compared as datetimes.

File format (``truststore.json``)::

    {"format": "appliance-trust-store/v1", "version": 3, "issued_at": "...",
     "root_key_id": "...", "entries": [ {...}, ... ], "signature": "<base64 DER>"}

The signature covers the canonical JSON (sorted keys, no spaces, UTF-8) of every field but
``signature``, prefixed by a domain string, so a signature over anything else never passes
as one over a trust store. ``version`` only grows: a service that has seen version N
refuses an older store (a rollback to a store that still trusted a revoked key).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keys.errors import ApplianceError, SigningError
from keys.files import atomic_write
from keys.keystore import NodeKey, key_id_of, public_key_from_pem

FORMAT = "appliance-trust-store/v1"
ROLES = ("root", "node", "release", "user")
_DOMAIN = b"appliance-trust-store/v1\n"


class TrustStoreError(ApplianceError):
    """The trust store is missing, unsigned, tampered with, signed by another root, or malformed."""


class UntrustedKeyError(SigningError):
    """A key is not in the trust store for the role it was used in, or was not valid then."""


def now() -> str:
    """The current UTC time as the store writes it."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def parse_time(text: str, *, what: str = "time") -> dt.datetime:
    """An ISO 8601 time (a naive one is taken as UTC)."""
    try:
        value = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise TrustStoreError(f"{what} {text!r} is not an ISO 8601 time", "write times as 2026-01-31T12:00:00+00:00") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class TrustEntry:
    key_id: str
    role: str
    # Who holds the private key: a Unix user for user keys, the node for node keys.
    owner: str
    public_key_pem: str
    not_before: str
    not_after: str | None = None
    revoked_at: str | None = None
    revoked_reason: str = ""

    def status_at(self, when: dt.datetime) -> str:
        """ "valid", or why not: "not yet valid", "expired", "revoked"."""
        if self.revoked_at is not None and when >= parse_time(self.revoked_at):
            return "revoked"
        if when < parse_time(self.not_before):
            return "not yet valid"
        if self.not_after is not None and when >= parse_time(self.not_after):
            return "expired"
        return "valid"

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return public_key_from_pem(self.public_key_pem.encode("ascii"), source=f"trust store entry {self.key_id[:16]}…")


@dataclass(frozen=True, slots=True)
class TrustStore:
    version: int
    issued_at: str
    root_key_id: str
    entries: tuple[TrustEntry, ...] = field(default_factory=tuple)

    # -- reading -------------------------------------------------------------------------

    def entry(self, key_id: str) -> TrustEntry | None:
        return next((e for e in self.entries if e.key_id == key_id), None)

    def keys_for(self, role: str) -> dict[str, ec.EllipticCurvePublicKey]:
        """Every key ever trusted for ``role`` (current, rotated out or revoked): what verifies old signatures."""
        return {e.key_id: e.public_key() for e in self.entries if e.role == role}

    def require(self, key_id: str, role: str, at: dt.datetime | str | None = None) -> TrustEntry:
        """The entry of ``key_id`` if it was trusted for ``role`` at ``at`` (default now); else UntrustedKeyError."""
        when = parse_time(at) if isinstance(at, str) else at or dt.datetime.now(dt.UTC)
        found = self.entry(key_id)
        if found is None or found.role != role:
            held = f" (it is a {found.role} key)" if found is not None else ""
            raise UntrustedKeyError(
                f"key {key_id[:16]}… is not trusted as a {role} key{held}: it is not in the root-signed trust store for that role",
                "a key file in the home proves nothing by itself: restore the genuine key; if this one is genuine, it must first be added to the trust store under the root key, else treat what it signed as forged",
            )
        status = found.status_at(when)
        if status == "revoked":
            raise UntrustedKeyError(
                f"{role} key {key_id[:16]}… ({found.owner}) was revoked at {found.revoked_at}"
                + (f" ({found.revoked_reason})" if found.revoked_reason else "")
                + f"; it was used at {when.isoformat(timespec='seconds')}",
                "what it signed after its revocation cannot be trusted; use the key that replaced it",
            )
        if status != "valid":
            window = f"valid from {found.not_before}" + (f" until {found.not_after}" if found.not_after else "")
            raise UntrustedKeyError(
                f"{role} key {key_id[:16]}… ({found.owner}) was {status} at {when.isoformat(timespec='seconds')} ({window})",
                "use a key that is valid now (`appliance keys list`)",
            )
        return found

    def current(self, role: str, owner: str | None = None) -> list[TrustEntry]:
        """Entries of ``role`` (and ``owner``) valid now."""
        t = dt.datetime.now(dt.UTC)
        return [e for e in self.entries if e.role == role and (owner is None or e.owner == owner) and e.status_at(t) == "valid"]

    # -- changing (each change is a new version, to be signed) ---------------------------

    def with_entry(self, entry: TrustEntry) -> TrustStore:
        if entry.role not in ROLES:
            raise TrustStoreError(f"role {entry.role!r} is not one of {', '.join(ROLES)}", "pick one of those roles")
        if self.entry(entry.key_id) is not None:
            raise TrustStoreError(f"key {entry.key_id[:16]}… is already in the trust store", "a key has one role; create another key for another role")
        return replace(self, version=self.version + 1, issued_at=now(), entries=(*self.entries, entry))

    def with_change(self, key_id: str, **changes: Any) -> TrustStore:
        if self.entry(key_id) is None:
            raise TrustStoreError(f"key {key_id[:16]}… is not in the trust store", "`appliance keys list` shows the keys it holds")
        entries = tuple(replace(e, **changes) if e.key_id == key_id else e for e in self.entries)
        return replace(self, version=self.version + 1, issued_at=now(), entries=entries)

    # -- signing -------------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "issued_at": self.issued_at,
            "root_key_id": self.root_key_id,
            "entries": [asdict(e) for e in self.entries],
        }

    def signed_document(self, root: NodeKey) -> dict[str, Any]:
        if root.key_id != self.root_key_id:
            raise TrustStoreError(
                f"the trust store names root key {self.root_key_id[:16]}…, but it is being signed with {root.key_id[:16]}…",
                "sign it with the root key it names",
            )
        root_entry = self.entry(root.key_id)
        if root_entry is None or root_entry.role != "root":
            raise TrustStoreError(f"root key {root.key_id[:16]}… has no root entry in the trust store", "report this: it is a bug in the appliance")
        body = self.body()
        return {**body, "signature": base64.b64encode(root.sign(_DOMAIN + canonical(body))).decode("ascii")}


def canonical(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes a signature covers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def new_store(root: NodeKey, owner: str) -> TrustStore:
    """Version 1: the root key alone."""
    entry = TrustEntry(key_id=root.key_id, role="root", owner=owner, public_key_pem=root.public_pem().decode("ascii"), not_before=now())
    return TrustStore(version=1, issued_at=now(), root_key_id=root.key_id, entries=(entry,))


def entry_for(key: NodeKey | ec.EllipticCurvePublicKey, role: str, owner: str, *, not_before: str | None = None) -> TrustEntry:
    public = key.public_key if isinstance(key, NodeKey) else key
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
    return TrustEntry(key_id=key_id_of(public), role=role, owner=owner, public_key_pem=pem, not_before=not_before or now())


def write_store(path: Path, store: TrustStore, root: NodeKey) -> None:
    """Sign ``store`` with ``root`` and write it atomically (0644: anyone may read whom the node trusts)."""
    document = store.signed_document(root)
    atomic_write(Path(path), (json.dumps(document, indent=1, sort_keys=True) + "\n").encode("utf-8"), mode=0o644)


def read_store(path: Path, anchor: ec.EllipticCurvePublicKey, *, anchor_source: str = "the root public key") -> TrustStore:
    """Read and verify the trust store at ``path`` against the root public key ``anchor``.

    Raises TrustStoreError naming the file and the reason: missing, not JSON, unsigned, signed
    by another root, tampered with, or malformed.
    """
    path = Path(path)
    fix = f"restore {path} from a backup of the home"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TrustStoreError(
            f"the trust store {path} does not exist",
            "restore it from a backup; a home made before trust stores gets one (and a root key) with `appliance keys init`",
        ) from None
    except OSError as exc:
        raise TrustStoreError(f"cannot read the trust store {path}: {exc.strerror}", fix) from None
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrustStoreError(f"the trust store {path} is not JSON ({exc})", fix) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise TrustStoreError(f"{path} is not a trust store (format {FORMAT} expected)", fix)
    signature = document.pop("signature", None)
    if not isinstance(signature, str) or not signature:
        raise TrustStoreError(f"the trust store {path} is unsigned", f"an unsigned store proves nothing: restore {path} from a backup of the home")
    anchor_id = key_id_of(anchor)
    if document.get("root_key_id") != anchor_id:
        raise TrustStoreError(
            f"the trust store {path} is signed for root key {str(document.get('root_key_id'))[:16]}…, but the trusted root is {anchor_id[:16]}… ({anchor_source})",
            "a store signed by another root is not this appliance's: restore the genuine one, or point the anchor at the right root public key",
        )
    try:
        anchor.verify(base64.b64decode(signature, validate=True), _DOMAIN + canonical(document), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        raise TrustStoreError(
            f"the trust store {path} does not verify with root key {anchor_id[:16]}…: it was changed after it was signed",
            "restore it from a backup; if nobody changed it on purpose, report the incident",
        ) from None
    try:
        entries = tuple(TrustEntry(**e) for e in document["entries"])
        store = TrustStore(version=int(document["version"]), issued_at=str(document["issued_at"]), root_key_id=anchor_id, entries=entries)
        for e in entries:
            if e.role not in ROLES:
                raise ValueError(f"unknown role {e.role!r}")
            if key_id_of(e.public_key()) != e.key_id:
                raise ValueError(f"entry {e.key_id[:16]}… holds another key")
    except (KeyError, TypeError, ValueError, ApplianceError) as exc:
        raise TrustStoreError(f"the trust store {path} is signed but malformed: {exc}", fix) from None
    return store


def describe(entries: Iterable[TrustEntry]) -> list[dict[str, Any]]:
    """Entries as rows for listing, with their status now."""
    t = dt.datetime.now(dt.UTC)
    return [{**asdict(e), "status": e.status_at(t)} for e in entries]
