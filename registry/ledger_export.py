"""A copy of the ledger an auditor takes away, and the check of such a copy anywhere.

Two shapes, both ending at a signed head taken when the copy was made:

- a DuckDB file that the PyPI ``duckdb-cli`` (1.5.x) opens: this package's DuckDB (2.x)
  writes a storage format 1.5 cannot read ("version number 69"), so the copy is written
  with ``STORAGE_VERSION 'v1.5.0'``. It holds ``events``, the audit views and macros of
  `registry.ledger_schema`, and ``ledger_head`` (one row: the signed head).
- a folder with ``events.parquet`` (every column of ``events``, in seq order) whose
  key-value metadata carries the signed head as JSON, and that head again as ``head.json``.

`verify_export` needs no appliance home: it recomputes the chain from the rows with the
same code as `Ledger.verify` (`registry.ledger_verify`), against public keys the caller
trusts — never a key found inside the export — and requires the head to sign exactly the
last row, so rows cut off the end, rows added after it, or a head from a longer ledger fail.
An earlier head kept elsewhere (a checkpoint) catches an export cut back and re-headed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
from cryptography.hazmat.primitives.asymmetric import ec

from registry import ledger_schema as schema
from registry.errors import LedgerError, LedgerIntegrityError
from registry.ledger_verify import SAFE_CONFIG, check_head_position, head_fields, verify_head_signature, verify_rows

if TYPE_CHECKING:
    from registry.ledger import Ledger

FORMATS = ("duckdb", "parquet")
# The newest format the PyPI duckdb-cli 1.5.x reads; a 2.x file stays in it after checkpoints.
STORAGE_VERSION = "v1.5.0"
DUCKDB_FILE = "ledger.duckdb"
PARQUET_FILE = "events.parquet"
HEAD_FILE = "head.json"
# The Parquet key-value metadata key that carries the signed head (JSON).
HEAD_KEY = "appliance.ledger.head"
HEAD_TABLE = "CREATE TABLE ledger_head (seq BIGINT NOT NULL, hash VARCHAR NOT NULL, key_id VARCHAR NOT NULL, ts VARCHAR NOT NULL, signature VARCHAR NOT NULL)"
_HEAD_COLUMNS = ("seq", "hash", "key_id", "ts", "signature")
_COLUMNS = ("seq", "ts", "kind", "actor", "body", "prev_hash", "hash", "key_id", "signature")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM events"
# Rows per page read from the live ledger: tens of MB at most, whatever the ledger's size.
_PAGE_ROWS = 50_000
# Files and folders here, unlike the ledger's own connection, must be reachable from SQL
# (ATTACH, COPY TO, read_parquet); extensions still never load or download.
_FILE_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
EXPORT_HINT = (
    "check that every --trusted-key is a node public key of the appliance that made the export "
    "(after a rotation, pass the earlier node keys too); if they are, the export was altered or cut "
    "after it left the appliance: take a fresh one with `appliance ledger export` and report the incident"
)


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What `verify_export` checked: every row up to the signed head (and a checkpoint, if given)."""

    path: Path
    format: str
    events: int
    last_seq: int
    last_hash: str
    head_key_id: str
    checkpoint_seq: int | None


# ------------------------------------------------------------------------ writing


def write_duckdb(ledger: Ledger, dest: Path) -> dict[str, Any]:
    """Copy ``ledger`` up to a freshly signed head into a new DuckDB file ``dest``; return the head.

    The head is signed first and only rows up to it are copied, so appends that arrive while
    the copy runs are simply not in it. ``dest`` must not exist.
    """
    dest = Path(dest)
    if dest.exists():
        raise LedgerError(f"ledger export target {dest} already exists", "choose a new file name")
    head = ledger.head()
    con = duckdb.connect(":memory:", config=dict(_FILE_CONFIG))
    try:
        con.execute("ATTACH ? AS export (STORAGE_VERSION ?)", [str(dest), STORAGE_VERSION])
        con.execute("USE export")
        # The ledger's own DDL, so the views read the signed bodies exactly as in the appliance.
        for statement in schema.schema_statements():
            con.execute(statement)
        con.execute(HEAD_TABLE)
        con.execute("INSERT INTO ledger_head VALUES (?, ?, ?, ?, ?)", [head[c] for c in _HEAD_COLUMNS])
        con.execute("INSERT INTO ledger_meta VALUES ('schema_version', ?), ('export_storage_version', ?)", [str(schema.SCHEMA_VERSION), STORAGE_VERSION])
        for page in _pages(ledger, int(head["seq"])):
            con.register("page", page)
            con.execute(f"INSERT INTO events SELECT {', '.join(_COLUMNS)} FROM page")
            con.unregister("page")
        # Nothing may stay in a .wal beside the file: the auditor gets one file.
        con.execute("CHECKPOINT export")
        con.execute("USE memory")
        con.execute("DETACH export")
    except duckdb.Error as exc:
        con.close()
        # It did not exist before: a half-written copy must not look like one.
        dest.unlink(missing_ok=True)
        dest.with_name(dest.name + ".wal").unlink(missing_ok=True)
        raise LedgerError(f"cannot write the ledger export {dest}: {exc}", f"check the free space and permissions of {dest.parent}") from None
    con.close()
    return head


def write_parquet(ledger: Ledger, dest_dir: Path) -> dict[str, Any]:
    """Write ``events.parquet`` (the signed head in its metadata) and ``head.json`` into the
    existing, empty folder ``dest_dir``; return the head. Rows as in `write_duckdb`."""
    dest_dir = Path(dest_dir)
    if not dest_dir.is_dir() or any(dest_dir.iterdir()):
        raise LedgerError(f"ledger export folder {dest_dir} is not an empty folder", "choose a new folder")
    # One copying routine: stage the rows in a DuckDB copy, then write Parquet from it.
    staging = dest_dir / f".{DUCKDB_FILE}.staging"
    try:
        head = write_duckdb(ledger, staging)
        con = duckdb.connect(str(staging), read_only=True, config=dict(_FILE_CONFIG))
        try:
            con.execute(
                f"COPY ({_SELECT} ORDER BY seq) TO ? (FORMAT parquet, KV_METADATA {{'{HEAD_KEY}': ?}})",
                [str(dest_dir / PARQUET_FILE), json.dumps(head, sort_keys=True)],
            )
        except duckdb.Error as exc:
            raise LedgerError(f"cannot write {dest_dir / PARQUET_FILE}: {exc}", f"check the free space and permissions of {dest_dir}") from None
        finally:
            con.close()
    finally:
        staging.unlink(missing_ok=True)
    (dest_dir / HEAD_FILE).write_text(head_text(head), encoding="utf-8")
    return head


def head_text(head: dict[str, Any]) -> str:
    """A signed head as a file: the same text `appliance ledger head --out` writes, so either serves as a checkpoint."""
    return json.dumps(head, sort_keys=True, indent=1) + "\n"


def _pages(ledger: Ledger, upto: int) -> Iterator[Any]:
    """Rows 1..``upto`` as Arrow tables, a page at a time, through the ledger's own parameterised
    reads (the service holds the file; no second connection to it may exist)."""
    import pyarrow as pa  # loaded only when an export is made

    types = {"seq": pa.int64()}
    arrow_schema = pa.schema([(c, types.get(c, pa.string())) for c in _COLUMNS])
    after = 0
    while after < upto:
        rows = ledger.select(f"{_SELECT} WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?", [after, upto, _PAGE_ROWS])
        if not rows:
            break  # a gap at the end: verification of the copy names it
        yield pa.table([list(col) for col in zip(*rows, strict=True)], schema=arrow_schema)
        after = int(rows[-1][0])


# ------------------------------------------------------------------------ checking


def export_format(path: Path) -> str:
    """``parquet`` for a folder or a ``.parquet`` file, else ``duckdb``."""
    path = Path(path)
    return "parquet" if path.is_dir() or path.suffix == ".parquet" else "duckdb"


def verify_export(path: Path, trusted: dict[str, ec.EllipticCurvePublicKey], checkpoint: dict | None = None) -> ExportReport:
    """Check an export made by `write_duckdb` or `write_parquet`; raise, never return "not ok".

    ``trusted`` maps key ids to the public keys allowed to have signed rows and head (the
    caller's, not the export's). Raises LedgerIntegrityError naming the first broken seq: an
    edited, missing or reordered row, a signature that does not verify with a trusted key, a
    head that does not sign exactly the last row; with ``checkpoint`` (an earlier signed head),
    an export that does not hold that head's row with that hash. LedgerError if the file is
    not an export at all.
    """
    path = Path(path)
    if not trusted:
        raise LedgerError(f"no key given to check the ledger export {path} with", "pass the node public key with --trusted-key PEM")
    if not path.exists():
        raise LedgerError(f"ledger export {path} does not exist", "pass the file or folder written by `appliance ledger export`")
    fmt = export_format(path)
    con, head = _open_parquet(path) if fmt == "parquet" else _open_duckdb(path)
    try:
        report = _verify_open(con, path, head, trusted, checkpoint)
    except LedgerIntegrityError as exc:
        raise LedgerIntegrityError(exc.seq, exc.message, EXPORT_HINT) from None
    except duckdb.Error as exc:  # a damaged file: a Parquet page or DuckDB block that cannot be read
        raise LedgerError(f"cannot read ledger export {path}: {exc}", EXPORT_HINT) from None
    finally:
        con.close()
    return ExportReport(path, fmt, report[0], report[1], report[2], str(head.get("key_id")), head_fields(checkpoint)[0] if checkpoint is not None else None)


def _verify_open(
    con: duckdb.DuckDBPyConnection, path: Path, head: dict, trusted: dict[str, ec.EllipticCurvePublicKey], checkpoint: dict | None
) -> tuple[int, int, str]:
    _check_columns(con, path)
    report = verify_rows(path, _rows(con), trusted)
    verify_head_signature(path, head, trusted)
    check_head_position(con, path, head, report.last_seq)  # rows cut off, or a rewritten tail
    seq, _ = head_fields(head)
    if seq < report.last_seq:
        raise LedgerIntegrityError(
            seq + 1, f"ledger export {path} holds events {seq + 1}..{report.last_seq} after its signed head (seq {seq}): they were added to it", EXPORT_HINT
        )
    if checkpoint is not None:
        try:
            verify_head_signature(path, checkpoint, trusted)
            check_head_position(con, path, checkpoint, report.last_seq)
        except LedgerIntegrityError as exc:
            raise LedgerIntegrityError(exc.seq, f"checked against the earlier signed head (seq {checkpoint.get('seq')}): {exc.message}", EXPORT_HINT) from None
    return report.events, report.last_seq, report.last_hash


def _rows(con: duckdb.DuckDBPyConnection) -> Iterator[tuple]:
    result = con.execute(f"{_SELECT} ORDER BY seq")
    while batch := result.fetchmany(2048):
        yield from batch


def _check_columns(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """``events`` has the ledger's columns and types and no NULL: the chain walk may then trust them."""
    try:
        relation = con.table("events")
        found = list(zip(relation.columns, (str(t) for t in relation.types), strict=True))
    except duckdb.Error:
        raise LedgerError(f"{path} has no events table, so it is not a ledger export", "pass the file or folder written by `appliance ledger export`") from None
    wanted = [(c, "BIGINT" if c == "seq" else "VARCHAR") for c in _COLUMNS]
    if found != wanted:
        raise LedgerIntegrityError(0, f"ledger export {path}: events has columns {found}, not the ledger's {wanted}", EXPORT_HINT)
    nulls = " OR ".join(f"{c} IS NULL" for c in _COLUMNS)
    row = con.execute(f"SELECT seq FROM events WHERE {nulls} ORDER BY seq NULLS FIRST LIMIT 1").fetchone()
    if row is not None:
        raise LedgerIntegrityError(int(row[0] or 0), f"ledger export {path}: event seq {row[0]} has an empty (NULL) column", EXPORT_HINT)


def _open_duckdb(path: Path) -> tuple[duckdb.DuckDBPyConnection, dict]:
    """The copy opened read-only, no file access from SQL; its head, once its catalog is checked."""
    from registry.ledger_verify import catalog_differences

    try:
        con = duckdb.connect(str(path), read_only=True, config=dict(SAFE_CONFIG))
    except duckdb.Error as exc:
        raise LedgerError(f"cannot open ledger export {path}: {exc}", "pass the DuckDB file written by `appliance ledger export --duckdb FILE`") from None
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()}
        if not {"events", "ledger_head"} <= tables:
            raise LedgerError(
                f"{path} has no events and ledger_head tables, so it is not a ledger export",
                "pass the DuckDB file written by `appliance ledger export --duckdb FILE`",
            )
        # An auditor queries the views: one redefined could hide what the verified rows say.
        differences = catalog_differences(con)
        if differences:
            raise LedgerIntegrityError(0, f"ledger export {path}: {'; '.join(differences)}, so audit queries on it could lie", EXPORT_HINT)
        heads = con.execute(f"SELECT {', '.join(_HEAD_COLUMNS)} FROM ledger_head").fetchall()
        if len(heads) != 1:
            raise LedgerIntegrityError(0, f"ledger export {path}: ledger_head holds {len(heads)} rows, not the one signed head", EXPORT_HINT)
    except duckdb.Error as exc:
        con.close()
        raise LedgerError(f"cannot read ledger export {path}: {exc}", "pass the DuckDB file written by `appliance ledger export --duckdb FILE`") from None
    except LedgerError:
        con.close()
        raise
    return con, dict(zip(_HEAD_COLUMNS, heads[0], strict=True))


def _open_parquet(path: Path) -> tuple[duckdb.DuckDBPyConnection, dict]:
    """``events`` as a view over the Parquet file; the head from its metadata (and head.json, if beside it, must agree)."""
    file = path / PARQUET_FILE if path.is_dir() else path
    hint = "pass the folder written by `appliance ledger export --parquet DIR`"
    if not file.is_file():
        raise LedgerError(f"{file} does not exist", hint)
    con = duckdb.connect(":memory:", config=dict(_FILE_CONFIG))
    try:
        values = con.execute("SELECT value FROM parquet_kv_metadata(?) WHERE key = ?", [str(file), HEAD_KEY.encode()]).fetchall()
        # The relation API names the file without building SQL from the caller's path.
        con.read_parquet(str(file)).create_view("events")
    except duckdb.Error as exc:
        con.close()
        raise LedgerError(f"cannot read ledger export {file}: {exc}", hint) from None
    try:
        if len(values) != 1:
            raise LedgerIntegrityError(0, f"ledger export {file} carries no signed head in its metadata ({HEAD_KEY})", EXPORT_HINT)
        head = _head_json(bytes(values[0][0]), f"the head in the metadata of {file}")
        beside = file.parent / HEAD_FILE
        if beside.is_file() and _head_json(_read(beside), str(beside)) != head:
            raise LedgerIntegrityError(head_fields(head)[0], f"{beside} is not the signed head embedded in {file}", EXPORT_HINT)
    except LedgerError:
        con.close()
        raise
    return con, head


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LedgerError(f"cannot read {path}: {exc.strerror}", "check that you may read the export's files") from None


def _head_json(data: bytes, what: str) -> dict:
    try:
        head = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise LedgerIntegrityError(0, f"{what} is not JSON", EXPORT_HINT) from None
    if not isinstance(head, dict):
        raise LedgerIntegrityError(0, f"{what} is not a JSON object", EXPORT_HINT)
    head_fields(head)  # a malformed head fails here, with its own message
    return head
