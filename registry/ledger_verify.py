"""Checking a ledger: the hash chain, the signatures, the signed head, the audit views.

Pure functions over rows and a DuckDB cursor, used by `registry.ledger.Ledger`. Every check
raises `LedgerIntegrityError` carrying the FIRST broken seq (0 when the problem is not an
event, such as a redefined view).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb
from cryptography.hazmat.primitives.asymmetric import ec

from keys.errors import SigningError
from keys.keystore import verify_signature
from registry import ledger_schema as schema
from registry.canonical import CanonicalJSONError, canonical_json
from registry.errors import LedgerError, LedgerIntegrityError

GENESIS_HASH = "0" * 64
HEAD_DOMAIN = b"appliance-ledger-head\n"
# The settings of every connection the ledger code opens: no file access from SQL, no
# extension downloads, and no way to change that afterwards.
SAFE_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "lock_configuration": True,
}
VERIFY_HINT = "the ledger was changed outside the appliance; restore it from a backup and compare with the exported signed head, and report the incident"
_HEAD_FILE_HINT = "pass the head exported with `appliance ledger head --out FILE`"


def chain_hash(prev_hash: str, body: bytes) -> str:
    """sha256(bytes.fromhex(prev_hash) + body), hex."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + body).hexdigest()


def head_message(seq: int, hash_hex: str) -> bytes:
    """The bytes a signed head's signature covers."""
    return HEAD_DOMAIN + f"{seq}\n{hash_hex}".encode("ascii")


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What `Ledger.verify` checked: every event up to ``last_seq``, and the head if given."""

    events: int
    last_seq: int
    last_hash: str
    head_checked: bool


# ------------------------------------------------------------------------ the chain


def _broken(path: Path, seq: int, what: str) -> LedgerIntegrityError:
    return LedgerIntegrityError(seq, f"ledger {path}: event seq {seq} {what}", VERIFY_HINT)


def verify_row(path: Path, row: tuple, trusted: dict[str, ec.EllipticCurvePublicKey]) -> None:
    """Check one event on its own: canonical body, columns, hash and signature.

    The link to the previous event is the caller's to check (``verify_rows`` walks it).
    """
    seq, ts, kind, actor, body, prev_hash, hash_hex, key_id, signature = row
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        raise _broken(path, seq, "has a body that is not JSON") from None
    if not isinstance(parsed, dict) or set(parsed) != {"seq", "ts", "kind", "actor", "data"}:
        raise _broken(path, seq, "has a body without exactly seq, ts, kind, actor, data")
    try:
        canonical = canonical_json(parsed)
    except CanonicalJSONError:
        raise _broken(path, seq, "has a body that is not canonical JSON") from None
    if canonical != body.encode("utf-8"):
        raise _broken(path, seq, "has a body that is not in canonical form")
    for name, column in (("seq", seq), ("ts", ts), ("kind", kind), ("actor", actor)):
        if parsed[name] != column:
            raise _broken(path, seq, f"has column {name}={column!r} but its signed body says {parsed[name]!r}")
    if chain_hash(prev_hash, canonical) != hash_hex:
        raise _broken(path, seq, "does not match its hash: its body was changed")
    public_key = trusted.get(key_id)
    if public_key is None:
        raise _broken(
            path, seq, f"is signed by key {key_id[:16]}…, which is not trusted (no node key of the root-signed trust store, nor a key given to trust)"
        )
    try:
        verify_signature(public_key, base64.b64decode(signature, validate=True), bytes.fromhex(hash_hex))
    except (SigningError, ValueError):
        raise _broken(path, seq, f"has a signature that does not verify with key {key_id[:16]}…") from None


def verify_rows(path: Path, rows: Iterable[tuple], trusted: dict[str, ec.EllipticCurvePublicKey]) -> VerifyReport:
    """Walk ``rows`` (all columns of ``events`` in seq order) from seq 1; raise at the first break."""
    expected, prev, count = 1, GENESIS_HASH, 0
    for row in rows:
        seq, prev_hash, hash_hex = row[0], row[5], row[6]
        if seq != expected:
            if seq > expected:
                missing = f"event seq {expected} is missing" if seq == expected + 1 else f"events seq {expected}..{seq - 1} are missing"
                raise LedgerIntegrityError(expected, f"ledger {path}: {missing} (the next present is seq {seq})", VERIFY_HINT)
            raise _broken(path, seq, "appears twice")
        if prev_hash != prev:
            raise _broken(path, seq, "does not link to the hash of the event before it")
        verify_row(path, row, trusted)
        expected, prev, count = expected + 1, hash_hex, count + 1
    return VerifyReport(count, expected - 1, prev, False)


# ------------------------------------------------------------------------ the head


def head_fields(head: dict) -> tuple[int, str]:
    """(seq, hash) of a head dict; LedgerError if malformed."""
    seq, hash_hex = head.get("seq"), head.get("hash")
    if type(seq) is not int or seq < 0 or not isinstance(hash_hex, str) or len(hash_hex) != 64:
        raise LedgerError("the signed head has no valid seq and hash", "pass a head file written by `appliance ledger head --out FILE`")
    return seq, hash_hex


def verify_head_signature(path: Path, head: dict, trusted: dict[str, ec.EllipticCurvePublicKey]) -> None:
    """The head is signed by a trusted key over `head_message(seq, hash)`."""
    seq, hash_hex = head_fields(head)
    key_id = head.get("key_id")
    public_key = trusted.get(key_id) if isinstance(key_id, str) else None
    if public_key is None:
        raise LedgerIntegrityError(
            seq,
            f"the signed head for ledger {path} is signed by key {str(key_id)[:16]}…, which is not trusted (no node key of the root-signed trust store, nor a key given to trust)",
            VERIFY_HINT,
        )
    try:
        signature = base64.b64decode(str(head.get("signature", "")), validate=True)
        verify_signature(public_key, signature, head_message(seq, hash_hex))
    except (SigningError, ValueError):
        raise LedgerIntegrityError(
            seq, f"the signed head for ledger {path} (seq {seq}) has a signature that does not verify: the head was forged or altered", VERIFY_HINT
        ) from None


def check_head_position(cur: duckdb.DuckDBPyConnection, path: Path, head: dict, last_seq: int) -> None:
    """The ledger (ending at ``last_seq``) holds the head's seq with the head's hash."""
    seq, hash_hex = head_fields(head)
    if seq > last_seq:
        raise LedgerIntegrityError(
            last_seq + 1,
            f"ledger {path} ends at seq {last_seq} but the signed head says {seq}: events {last_seq + 1}..{seq} were cut off the end",
            VERIFY_HINT,
        )
    row = cur.execute("SELECT hash FROM events WHERE seq = ?", [seq]).fetchone()
    stored = GENESIS_HASH if seq == 0 else (row[0] if row else None)
    if stored != hash_hex:
        raise LedgerIntegrityError(
            seq,
            f"ledger {path}: event seq {seq} does not have the hash the signed head records ({hash_hex[:16]}…): the ledger was rewritten from that point",
            VERIFY_HINT,
        )


def read_head_file(path: Path) -> dict:
    """Load a signed head exported as JSON."""
    try:
        head = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LedgerError(f"signed head file {path} does not exist", _HEAD_FILE_HINT) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LedgerError(f"signed head file {path} is not JSON", _HEAD_FILE_HINT) from None
    if not isinstance(head, dict):
        raise LedgerError(f"signed head file {path} is not a JSON object", _HEAD_FILE_HINT)
    return head


# ------------------------------------------------------------------------ views and macros


@functools.cache
def _expected_catalog() -> dict[str, str]:
    """Views' and macros' definitions as this DuckDB prints them for our own DDL."""
    con = duckdb.connect(":memory:", config=dict(SAFE_CONFIG))
    try:
        for statement in schema.schema_statements():
            con.execute(statement)
        return _catalog(con)
    finally:
        con.close()


def _catalog(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    views = con.execute("SELECT view_name, sql FROM duckdb_views() WHERE database_name = current_database() AND NOT internal").fetchall()
    macros = con.execute(
        "SELECT function_name, string_agg(macro_definition, ';') FROM duckdb_functions() "
        "WHERE database_name = current_database() AND function_type = 'table_macro' "
        "GROUP BY function_name"
    ).fetchall()
    return {f"view {n}": str(sql) for n, sql in views} | {f"macro {n}": str(d) for n, d in macros}


def catalog_differences(con: duckdb.DuckDBPyConnection) -> list[str]:
    """How the ledger's views and macros differ from this version's definitions."""
    actual = _catalog(con)
    out = []
    for name, definition in _expected_catalog().items():
        if name not in actual:
            out.append(f"{name} is missing")
        elif actual[name] != definition:
            out.append(f"{name} was redefined")
    return out
