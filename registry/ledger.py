"""The provenance ledger: an append-only, hash-chained, signed event log in a DuckDB file.

Each event's ``body`` is the canonical JSON of ``{"seq", "ts", "kind", "actor", "data"}``;
``hash = sha256(bytes.fromhex(prev_hash) + body)`` (seq 1 chains from 64 zeros) and
``signature`` is the node key's ECDSA over the 32 raw hash bytes. A chain catches edits and
deletions in the middle but not rows cut off the end, so after every commit the ledger
rewrites a *signed head* (last seq + hash) beside it; export it elsewhere too.

DuckDB allows one writer process and locks every other process out while it writes, and
within one process a read-write and a read-only connection to the same file cannot coexist.
So the service that owns the ledger answers auditor queries itself, via `Ledger.query`,
and `registry.query.query(path, …)` serves processes that do not hold the ledger open.

Auditor SQL never runs on the ledger's own connection: `Ledger.query` runs it on an
`AuditSandbox`, a separate DuckDB instance holding a copy of the events that catches up
before each query, fenced with `AuditLimits` (memory, threads, time, rows, no file access).
The ledger's own connection is opened with external access disabled and its configuration
locked too, and serves only the ledger's own parameterised reads and writes.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import duckdb
from cryptography.hazmat.primitives.asymmetric import ec

from keys.keystore import NodeKey, key_id_of
from registry import ledger_schema as schema
from registry.audit_sandbox import AuditLimits, AuditSandbox, default_work_dir, remove_stale_mirrors
from registry.canonical import CanonicalJSONError, canonical_json
from registry.errors import LedgerError, LedgerIntegrityError
from registry.ledger_verify import (
    GENESIS_HASH,
    SAFE_CONFIG,
    VerifyReport,
    catalog_differences,
    chain_hash,
    check_head_position,
    head_message,
    read_head_file,
    verify_head_signature,
    verify_row,
    verify_rows,
)

if TYPE_CHECKING:  # pyarrow loads only when an auditor's first query fills the sandbox
    import pyarrow as pa

__all__ = ["GENESIS_HASH", "AuditLimits", "Event", "Ledger", "VerifyReport", "chain_hash", "head_message"]

# How long the writer waits for more callers before a group commit, when the last one served
# several: far below one commit's fsyncs, so a lone caller never waits for it.
GROUP_COMMIT_LINGER_S = 0.002
_COLUMNS = "seq, ts, kind, actor, body, prev_hash, hash, key_id, signature"
# Rows per Arrow batch when the audit sandbox copies events: a few tens of MB at most.
_COPY_BATCH_ROWS = 50_000


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Event:
    """One ledger event as stored (``signature`` is base64 text)."""

    seq: int
    ts: str
    kind: str
    actor: str
    data: dict
    prev_hash: str
    hash: str
    key_id: str
    signature: str

    @property
    def body(self) -> bytes:
        """The canonical JSON the hash covers."""
        return canonical_json({"seq": self.seq, "ts": self.ts, "kind": self.kind, "actor": self.actor, "data": self.data})


def _row_event(row: tuple) -> Event:
    seq, ts, kind, actor, body, prev_hash, hash_hex, key_id, signature = row
    return Event(seq, ts, kind, actor, json.loads(body)["data"], prev_hash, hash_hex, key_id, signature)


class Ledger:
    """A ledger file opened for reading, or for writing with the node key as signer."""

    def __init__(
        self,
        path: Path,
        con: duckdb.DuckDBPyConnection,
        signer: NodeKey | None,
        head_path: Path | None,
        read_only: bool,
        audit: AuditLimits | None = None,
    ) -> None:
        self.path = path
        self.head_path = head_path
        self.read_only = read_only
        self.audit = audit or AuditLimits()
        self._con = con
        self._signer = signer
        self._lock = threading.Lock()
        # (seq, hash) of the last committed event, once read; kept current by _commit.
        self._tip: tuple[int, str] | None = None
        # Batches waiting for the writer thread's next group commit (see append_many).
        self._queue: list[_Append] = []
        self._queue_cond = threading.Condition()
        self._writer: threading.Thread | None = None
        self._stopping = False
        # The last seq committed through this object (or found at open): how far the audit
        # sandbox must catch up before a query. Written under _lock, read without it.
        self._committed_seq = 0
        self._sandbox: AuditSandbox | None = None
        self._sandbox_lock = threading.Lock()
        self._closed = False

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        path: Path,
        signer: NodeKey | None,
        *,
        read_only: bool = False,
        head_path: Path | None | Literal["auto"] = "auto",
        adopt_head: bool = False,
        audit: AuditLimits | None = None,
    ) -> Ledger:
        """Open (creating if needed, unless ``read_only``) the ledger at ``path``.

        ``head_path``: where the signed head is kept; ``"auto"`` means
        ``path.with_suffix(".head.json")``, None keeps none. Writes need ``signer``.
        ``audit``: the limits of `query` (memory, threads, time, rows; default `AuditLimits()`).

        Opening for writing checks the existing head file against the ledger first: were it
        simply rewritten, rows cut off the end would be laundered. A ledger with events but
        no head file is refused too, unless ``adopt_head=True`` (use it once, after checking
        the ledger against an exported head).
        """
        path = Path(path)
        if head_path == "auto":
            head_path = path.with_suffix(".head.json")
        elif head_path is not None:
            head_path = Path(head_path)
        if read_only and not path.exists():
            raise LedgerError(f"ledger {path} does not exist", "run `appliance init` to create the home")
        creating = not path.exists()
        try:
            con = duckdb.connect(str(path), read_only=read_only, config=dict(SAFE_CONFIG))
        except duckdb.IOException as exc:
            raise LedgerError(
                f"cannot open ledger {path}: {exc}",
                "another process (the appliance service?) holds the ledger; DuckDB lets only "
                "one process open a file that is being written — ask the service instead, "
                "or stop it first",
            ) from None
        except duckdb.Error as exc:
            raise LedgerError(
                f"cannot open ledger {path}: {exc}",
                "check that the file is a ledger written by this appliance version",
            ) from None
        ledger = cls(path, con, signer, head_path, read_only, audit)
        try:
            if not read_only:
                ledger._ensure_schema()
                ledger._check_head_on_open(adopt_head=adopt_head or creating)
                # Mirrors a crashed service left (live ones are locked and stay).
                remove_stale_mirrors(Path(ledger.audit.work_dir or default_work_dir(path)), ledger._mirror_prefix())
            else:
                ledger._require_schema()
            ledger._committed_seq = ledger._last()[0]
        except LedgerError:
            con.close()
            raise
        return ledger

    def _ensure_schema(self) -> None:
        """Create the schema, or bring views and macros back to this version's definitions."""
        con = self._con
        try:
            con.execute(schema.META_TABLE)
            row = con.execute("SELECT value FROM ledger_meta WHERE name = 'schema_version'").fetchone()
            version = int(row[0]) if row is not None and str(row[0]).isdigit() else 0
            if version > schema.SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger {self.path} has schema version {version}, newer than this appliance's {schema.SCHEMA_VERSION}",
                    "upgrade the appliance software before opening this ledger",
                )
            if version == schema.SCHEMA_VERSION and not catalog_differences(con):
                return
            # Views and macros are derived, not evidence: rewriting them loses nothing.
            con.begin()
            for statement in schema.schema_statements():
                con.execute(statement)
            con.execute(
                "INSERT OR REPLACE INTO ledger_meta VALUES ('schema_version', ?)",
                [str(schema.SCHEMA_VERSION)],
            )
            con.commit()
        except duckdb.Error as exc:
            raise LedgerError(
                f"cannot set up the schema of ledger {self.path}: {exc}",
                "check that the file is a ledger written by this appliance version",
            ) from None

    def _require_schema(self) -> None:
        tables = {r[0] for r in self._con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()}
        if "events" not in tables:
            raise LedgerError(
                f"{self.path} is not a ledger (it has no events table)",
                "pass the ledger file of the appliance home (ledger.duckdb)",
            )

    def _check_head_on_open(self, *, adopt_head: bool) -> None:
        if self.head_path is None or self._signer is None:
            return
        last_seq, _ = self._last()
        if not self.head_path.exists():
            if last_seq and not adopt_head:
                raise LedgerIntegrityError(
                    last_seq,
                    f"ledger {self.path} has {last_seq} events but its signed head file "
                    f"{self.head_path} is missing, so rows cut off the end would go unnoticed",
                    "put the head file back, or verify the ledger against an exported head "
                    "(`appliance ledger verify --head FILE`) and open it once with adopt_head",
                )
        else:
            check_head_position(self._con, self.path, read_head_file(self.head_path), self._last()[0])
        self._write_head()

    # ---------------------------------------------------------------- writing

    def _last(self, con: duckdb.DuckDBPyConnection | None = None) -> tuple[int, str]:
        # This object is the file's only writer, so after the first read the tip is known here;
        # the query (a scan, milliseconds on a large ledger) would otherwise run twice per commit.
        if self._tip is None:
            row = (con or self._con).execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            tip = (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))
            if self.read_only:
                return tip  # another process may be appending: never cache a reader's view
            self._tip = tip
        return self._tip

    def _require_signer(self, what: str) -> NodeKey:
        if self.read_only:
            raise LedgerError(
                f"cannot {what}: ledger {self.path} is open read-only",
                "open it with read_only=False in the service that owns it",
            )
        if self._signer is None:
            raise LedgerError(
                f"cannot {what} on ledger {self.path} without the node key",
                "open the ledger with the unlocked node key as signer",
            )
        return self._signer

    def append(self, kind: str, actor: str, data: dict) -> Event:
        """Append one signed event and return it."""
        return self.append_many([(kind, actor, data)])[0]

    def append_many(self, items: Iterable[tuple[str, str, dict]]) -> list[Event]:
        """Append several events in ONE transaction: all are recorded, or none is.

        Group commit: batches from concurrent callers queue for one writer thread, which
        commits every batch waiting in one transaction with one head rewrite. Each batch still
        stands or falls whole (a batch with an invalid event is refused alone), and each
        caller returns only once its events are durable.
        """
        self._require_signer("append events")
        request = _Append(list(items))
        with self._queue_cond:
            if self._stopping:
                raise LedgerError(f"ledger {self.path} is closed", "open it again in the service that owns it")
            self._queue.append(request)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
                self._writer.start()
            self._queue_cond.notify()
        request.settled.wait()
        if request.error is not None:
            raise request.error
        return request.events

    def _write_loop(self) -> None:
        """The writer thread: commit whatever has queued since the last commit, until closed."""
        last_batch = 1
        while True:
            with self._queue_cond:
                while not self._queue and not self._stopping:
                    self._queue_cond.wait()
                if not self._queue:
                    return
                # Under concurrency, linger a moment for the callers the last commit released:
                # one commit (one WAL fsync, one head rewrite) then serves all of them.
                deadline = time.monotonic() + GROUP_COMMIT_LINGER_S
                while len(self._queue) < last_batch and not self._stopping and (left := deadline - time.monotonic()) > 0:
                    self._queue_cond.wait(left)
                batch, self._queue = self._queue, []
                last_batch = len(batch)
            with self._lock:
                try:
                    self._commit(batch)
                finally:
                    for request in batch:
                        request.settled.set()

    def _commit(self, batch: list[_Append]) -> None:
        """Commit queued batches (under ``_lock``) and settle each request."""
        signer = self._require_signer("append events")
        con = self._con
        committed = False
        try:
            con.begin()
            seq, prev = self._last(con)
            for request in batch:
                try:
                    events = []
                    at, head = seq, prev
                    for kind, actor, data in request.items:
                        at += 1
                        event = _make_event(signer, at, head, kind, actor, data)
                        events.append(event)
                        head = event.hash
                except LedgerError as exc:
                    request.error = exc  # this batch alone is refused; the others go on
                    continue
                request.events, seq, prev = events, at, head
            rows = [[e.seq, e.ts, e.kind, e.actor, e.body.decode("utf-8"), e.prev_hash, e.hash, e.key_id, e.signature] for r in batch for e in r.events]
            if rows:
                # One call for the whole group: each call into DuckDB lets go of the GIL and must
                # win it back, which costs up to a switch interval while other threads run.
                con.executemany(f"INSERT INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            con.commit()
            committed = True
            self._committed_seq = seq
            self._tip = (seq, prev)
        except duckdb.Error as exc:
            failure = LedgerError(f"could not append to ledger {self.path}: {exc}", "nothing of this batch was recorded; check the disk and retry")
            for request in batch:
                request.error, request.events = request.error or failure, []
        finally:
            if not committed:
                try:
                    con.rollback()
                except duckdb.TransactionException:
                    pass  # no transaction was open: BEGIN itself failed
            for request in batch:
                request.done = True
        recorded = [e for r in batch if r.error is None for e in r.events]
        if recorded:
            try:
                self._write_head()
            except OSError as exc:
                failure = LedgerError(
                    f"events {recorded[0].seq}..{recorded[-1].seq} were recorded in ledger "
                    f"{self.path}, but its signed head file {self.head_path} could not be "
                    f"rewritten: {exc.strerror}",
                    "free disk space or fix the directory's permissions; the next append rewrites the head",
                )
                for request in batch:
                    request.error = request.error or failure

    # ---------------------------------------------------------------- head

    def head(self) -> dict:
        """The signed head: {seq, hash, key_id, ts, signature (base64)}."""
        signer = self._require_signer("sign the ledger head")
        seq, hash_hex = self._last()
        return {
            "seq": seq,
            "hash": hash_hex,
            "key_id": signer.key_id,
            "ts": _now(),
            "signature": base64.b64encode(signer.sign(head_message(seq, hash_hex))).decode(),
        }

    def export_head(self, path: Path) -> dict:
        """Write the signed head to ``path`` (atomically) and return it."""
        head = self.head()
        _atomic_write(Path(path), (json.dumps(head, sort_keys=True, indent=1) + "\n").encode())
        return head

    def _write_head(self) -> None:
        if self.head_path is not None and self._signer is not None:
            self.export_head(self.head_path)

    # ---------------------------------------------------------------- reading

    def events(self, kind: str | None = None) -> list[Event]:
        """Every event (of ``kind``, if given), in seq order."""
        cur = self._con.cursor()
        try:
            if kind is None:
                rows = cur.execute(f"SELECT {_COLUMNS} FROM events ORDER BY seq").fetchall()
            else:
                rows = cur.execute(f"SELECT {_COLUMNS} FROM events WHERE kind = ? ORDER BY seq", [kind]).fetchall()
        finally:
            cur.close()
        return [_row_event(r) for r in rows]

    def select(self, sql: str, params: list | tuple = ()) -> list[tuple]:
        """The service's own parameterised read over the ledger's tables and views.

        For internal lookups only (``sql`` is the service's constant text, values are bound
        as ``?`` parameters); auditor SQL goes through `query` and its sandbox instead.
        """
        cur = self._con.cursor()
        try:
            return cur.execute(sql, list(params)).fetchall()
        except duckdb.Error as exc:
            raise LedgerError(f"internal read of ledger {self.path} failed: {exc}", "report this: it is a bug in the appliance") from None
        finally:
            cur.close()

    def event(self, seq: int) -> Event:
        """The event at ``seq`` (LedgerError if there is none)."""
        rows = self.select(f"SELECT {_COLUMNS} FROM events WHERE seq = ?", [int(seq)])
        if not rows:
            raise LedgerError(f"ledger {self.path} has no event {seq}", 'list events with `appliance ledger query "SELECT seq, kind FROM events"`')
        return _row_event(rows[0])

    def recorded(self, digest: str, trusted: dict[str, ec.EllipticCurvePublicKey]) -> Event:
        """The event that first recorded artifact ``digest``, its hash and signature checked.

        Raises LedgerError if the ledger never recorded it and LedgerIntegrityError if that
        event was altered or is not signed by a trusted key. (The whole chain is
        ``verify``'s job; this proves one artifact cheaply.)
        """
        cur = self._con.cursor()
        try:
            row = cur.execute(
                f"SELECT {_COLUMNS} FROM events WHERE kind = 'artifact.recorded' AND json_extract_string(body, '$.data.digest') = ? ORDER BY seq LIMIT 1",
                [digest],
            ).fetchone()
        finally:
            cur.close()
        if row is None:
            raise LedgerError(
                f"ledger {self.path} has no record of artifact {digest[:16]}…",
                "it was not produced by this appliance; list recorded ones with `appliance artifact list`",
            )
        verify_row(self.path, row, trusted)
        return _row_event(row)

    def query(self, sql: str, *, max_rows: int | None = None, timeout_s: float | None = None) -> tuple[list[str], list[tuple]]:
        """Run an auditor's single SELECT over this ledger; return (columns, rows).

        Exactly one SELECT that only reads (`registry.sql_sandbox.single_select`), run on
        this ledger's audit sandbox, never on its own connection: a separate DuckDB instance
        with no file access, bounded memory and threads (``self.audit``), on a cursor of its
        own in a transaction that is rolled back. It sees every event committed before the
        call. ``max_rows`` / ``timeout_s`` default to ``self.audit``'s and may only be lower.
        Past a limit, or for anything but a reading SELECT, it raises LedgerError. Safe to
        call from several threads at once, while others append.
        """
        return self._audit_sandbox().query(sql, upto=self._committed_seq, max_rows=max_rows, timeout_s=timeout_s)

    def _audit_sandbox(self) -> AuditSandbox:
        # Made on the first query: opening the ledger (every CLI call) stays cheap.
        with self._sandbox_lock:
            if self._closed:
                raise LedgerError(f"ledger {self.path} is closed", "open it again to query it")
            if self._sandbox is None:
                work_dir = self.audit.work_dir or default_work_dir(self.path)
                self._sandbox = AuditSandbox(str(self.path), self._events_since, self.audit, Path(work_dir), self._mirror_prefix())
            return self._sandbox

    def _mirror_prefix(self) -> str:
        return f".{self.path.name}.audit-"

    def _events_since(self, seq: int) -> Iterator[pa.RecordBatch]:
        """The stored events after ``seq``, in seq order, as Arrow batches (for the audit sandbox)."""
        cur = self._con.cursor()
        try:
            relation = cur.sql(f"SELECT {_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq", params=[seq])
            yield from relation.to_arrow_reader(_COPY_BATCH_ROWS)
        finally:
            cur.close()

    # ---------------------------------------------------------------- verifying

    def verify(
        self,
        trusted: dict[str, ec.EllipticCurvePublicKey],
        head: dict | Path | None = None,
    ) -> VerifyReport:
        """Recompute the chain from seq 1 and check every signature; check the head if given.

        ``trusted`` maps key ids to the public keys allowed to sign. Raises
        LedgerIntegrityError naming the FIRST broken seq: a missing seq, a column that
        differs from the signed body, a broken prev_hash link, a wrong hash, a signature by
        an unknown key or one that does not verify; with a head, a head whose signature
        fails or that the ledger does not reach (rows cut off the end).
        """
        for key_id, public_key in trusted.items():
            if key_id_of(public_key) != key_id:
                raise LedgerError(
                    f"trusted key listed as {key_id[:16]}… is really {key_id_of(public_key)[:16]}…",
                    "build the trust map with key_id_of(public_key) as the key",
                )
        head_dict = read_head_file(head) if isinstance(head, Path) else head
        cur = self._con.cursor()
        try:
            cur.begin()  # one snapshot, even while the service appends
            differences = catalog_differences(cur)
            if differences:
                raise LedgerIntegrityError(
                    0,
                    f"ledger {self.path}: {'; '.join(differences)}, so audit queries could lie",
                    "open the ledger once read-write in the service (it rewrites the views), and report the incident",
                )
            report = verify_rows(self.path, _iter_rows(cur), trusted)
            if head_dict is not None:
                verify_head_signature(self.path, head_dict, trusted)
                check_head_position(cur, self.path, head_dict, report.last_seq)
                report = VerifyReport(report.events, report.last_seq, report.last_hash, True)
        finally:
            try:
                cur.rollback()
            finally:
                cur.close()
        return report

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the audit sandbox and the connection (committed events are durable already)."""
        with self._queue_cond:  # the writer commits what is queued, then ends
            self._stopping = True
            self._queue_cond.notify_all()
            writer = self._writer
        if writer is not None:
            writer.join()
        with self._sandbox_lock:
            sandbox, self._sandbox = self._sandbox, None
            self._closed = True
        if sandbox is not None:
            sandbox.close()
        self._con.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -------------------------------------------------------------------- helpers


class _Append:
    """One caller's batch in the group-commit queue, and how it was settled."""

    __slots__ = ("done", "error", "events", "items", "settled")

    def __init__(self, items: list[tuple[str, str, dict]]) -> None:
        self.items = items
        self.events: list[Event] = []
        self.error: LedgerError | None = None
        self.done = False
        self.settled = threading.Event()


def _make_event(signer: NodeKey, seq: int, prev: str, kind: str, actor: str, data: dict) -> Event:
    if not isinstance(kind, str) or not kind:
        raise LedgerError(f"event kind {kind!r} is not a non-empty string", "name the event kind, e.g. 'artifact.recorded'")
    if not isinstance(actor, str):
        raise LedgerError(f"actor {actor!r} of a {kind!r} event is not a string", "pass the identity (user name) that caused the event")
    if not isinstance(data, dict):
        raise LedgerError(f"data of a {kind!r} event is a {type(data).__name__}, not a dict", "pass the event's fields as a dict")
    schema.check_event_data(kind, data)
    event = Event(seq, _now(), kind, actor, data, prev, "", signer.key_id, "")
    try:
        body = event.body
    except CanonicalJSONError as exc:
        raise LedgerError(f"event {kind!r} cannot be recorded: {exc.message}", exc.hint) from None
    hash_hex = chain_hash(prev, body)
    signature = base64.b64encode(signer.sign(bytes.fromhex(hash_hex))).decode("ascii")
    # A private copy of data: the caller's dict may change later, the event may not.
    frozen = json.loads(body)["data"]
    return Event(seq, event.ts, kind, actor, frozen, prev, hash_hex, signer.key_id, signature)


def _iter_rows(cur: duckdb.DuckDBPyConnection) -> Iterator[tuple]:
    result = cur.execute(f"SELECT {_COLUMNS} FROM events ORDER BY seq")
    while batch := result.fetchmany(2048):
        yield from batch


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    renamed = False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        renamed = True
    finally:
        if not renamed:
            Path(tmp).unlink(missing_ok=True)
