"""Where auditor SQL runs: a DuckDB instance of its own, never the ledger writer's.

The service holds the ledger read-write, and DuckDB then refuses every other opening of that
file, a read-only one in the same process included. Settings that fence SQL in (memory,
threads, file access, locking the configuration) are per *instance*, and setting them on a
cursor of the writer's connection would bind the writer too. So queries run on a mirror:

- `AuditSandbox` keeps a copy of the ``events`` table in a private DuckDB file (a fresh 0700
  directory, disposable: rebuilt at every open, never synced to disk) with this version's
  views and macros. Before each query it copies what the ledger committed since the last
  one (an indexed ``seq > n`` read on a cursor of the writer's connection). Appends never
  wait for it and it never waits for them; a query sees every event committed before it
  began, as a gap-free prefix (each copy is one transaction in seq order).
- `query_file` serves a process that holds no ledger: a fresh in-memory instance ATTACHes
  the file READ_ONLY with the same limits.

Both instances are opened with `AuditLimits`: ``memory_limit`` and ``threads`` bounded,
nothing spilled to disk (``temp_directory=''``: DuckDB always lets SQL read its temp
directory, by default ``$PWD/.tmp``, so a symlink ``.tmp -> /`` in the caller's working
directory would open every file), no extension loading, external access off and the
configuration locked last. Each query runs on its own cursor inside a transaction that is
rolled back, with a row cap and a watch that interrupts it past its time limit or once the
process grew by more than ``memory_limit`` (DuckDB's cap counts its buffers, not every
string a scalar function builds).
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from registry import ledger_schema as schema
from registry.errors import LedgerError
from registry.sql_sandbox import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S, ONLY_SELECT, single_select

if TYPE_CHECKING:  # pyarrow loads only when an auditor's first query fills the sandbox
    import pyarrow as pa

__all__ = ["AuditLimits", "AuditSandbox", "parse_size", "query_file", "run_select"]

_LOCK_FILE = "in-use.lock"
_LIMITS_HINT = "open the ledger with a larger AuditLimits(...) in the service's configuration"


# DuckDB's size units: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024.
_UNITS = {
    "b": 1,
    "byte": 1,
    "bytes": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*")


def parse_size(text: str) -> int:
    """Bytes in a size written the DuckDB way ("1GB", "512 MiB", "2.5GB"); LedgerError otherwise."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise LedgerError(f"{text!r} is not a memory size", "write a number and a unit, e.g. 1GB, 512MB or 2GiB")
    return int(float(match.group(1)) * unit)


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditLimits:
    """The fences of the auditor's SQL sandbox; a query may ask for less, never for more."""

    memory_limit: int = 1 << 30
    """Bytes: DuckDB's cap for all audit queries together (the mirror's cached pages
    included), and how far one query may grow the process. 1 GiB, as the service's
    ``--query-memory-limit`` (`parse_size` reads that form)."""
    threads: int = 2
    """DuckDB worker threads of the sandbox: audit queries never take every core from the
    service and its jobs."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """The longest a query may run, and the default time limit."""
    max_rows: int = DEFAULT_MAX_ROWS
    """The most rows a query may return, and the default row limit."""
    work_dir: Path | None = None
    """Where the mirror's private directory is made. None: beside the ledger (the home is
    0700 and sized for the ledger), or the system temp directory if that is not writable."""

    def __post_init__(self) -> None:
        if type(self.memory_limit) is not int or self.memory_limit < (16 << 20):
            raise LedgerError(f"AuditLimits.memory_limit={self.memory_limit!r} is not a byte count of at least 16 MiB", "pass e.g. 1 << 30 for 1 GiB")
        if type(self.threads) is not int or not 1 <= self.threads <= 64:
            raise LedgerError(f"AuditLimits.threads={self.threads!r} is not between 1 and 64", "pass a small thread count, e.g. 2")
        if not isinstance(self.timeout_s, int | float) or not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise LedgerError(f"AuditLimits.timeout_s={self.timeout_s!r} is not a positive number of seconds", "pass e.g. 30")
        if type(self.max_rows) is not int or self.max_rows < 1:
            raise LedgerError(f"AuditLimits.max_rows={self.max_rows!r} is not a positive row count", "pass e.g. 100_000")

    def per_query(self, max_rows: int | None, timeout_s: float | None) -> tuple[int, float]:
        """The row and time limits of one query: the defaults, or lower ones it asks for."""
        rows = self.max_rows if max_rows is None else max_rows
        seconds = self.timeout_s if timeout_s is None else timeout_s
        if type(rows) is not int or rows < 1:
            raise LedgerError(f"max_rows={rows!r} is not a positive row count", f"ask for at most {self.max_rows} rows")
        if rows > self.max_rows:
            raise LedgerError(f"the query asks for up to {rows} rows, more than the sandbox's limit of {self.max_rows}", _LIMITS_HINT)
        if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds <= 0:
            raise LedgerError(f"timeout_s={seconds!r} is not a positive number of seconds", f"ask for at most {self.timeout_s:g} s")
        if seconds > self.timeout_s:
            raise LedgerError(f"the query asks for {seconds:g} s, more than the sandbox's limit of {self.timeout_s:g} s", _LIMITS_HINT)
        return rows, float(seconds)


def _connect(database: str, limits: AuditLimits, **extra: object) -> duckdb.DuckDBPyConnection:
    """A DuckDB instance with the sandbox's limits; the caller fences it with `_fence`."""
    config: dict[str, object] = {
        "memory_limit": f"{limits.memory_limit}B",
        "threads": limits.threads,
        # No temp directory: nothing spills, and there is no directory DuckDB would let SQL read.
        "temp_directory": "",
        "max_temp_directory_size": "0B",
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_persistent_secrets": False,
        # Python variables must never become tables (DuckDB scans them by name otherwise).
        "python_enable_replacements": False,
        **extra,
    }
    try:
        return duckdb.connect(database, config=config)  # type: ignore[arg-type]
    except duckdb.Error as exc:
        raise LedgerError(f"cannot start the audit sandbox: {exc}", "check the disk and the sandbox's work directory") from None


def _fence(con: duckdb.DuckDBPyConnection) -> None:
    # External access off first (it refuses changes to the temp directory from then on),
    # the configuration locked last, so that nothing after can undo either.
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


# -------------------------------------------------------------------- the watch


def _rss_bytes() -> int | None:
    """Resident memory of this process (Linux), or None where /proc cannot tell."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _Running:
    __slots__ = ("cursor", "deadline", "rss_ceiling", "reason")

    def __init__(self, cursor: duckdb.DuckDBPyConnection, deadline: float, rss_ceiling: int | None) -> None:
        self.cursor = cursor
        self.deadline = deadline
        self.rss_ceiling = rss_ceiling
        self.reason: str | None = None


class _Watch:
    """One thread that interrupts audit queries past their deadline or memory allowance.

    DuckDB checks for an interrupt between vectors, so a query stops within milliseconds of
    its turn; memory is sampled every 20 ms, so a query stops soon after the process grew
    past its allowance (one vector's worth of a huge scalar result can come first).
    """

    _PERIOD_S = 0.02

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: set[_Running] = set()
        self._thread: threading.Thread | None = None

    def start(self, cursor: duckdb.DuckDBPyConnection, timeout_s: float, memory_limit: int) -> _Running:
        rss = _rss_bytes()
        running = _Running(cursor, time.monotonic() + timeout_s, None if rss is None else rss + memory_limit)
        with self._cond:
            self._running.add(running)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="audit-query-watch", daemon=True)
                self._thread.start()
            self._cond.notify()
        return running

    def stop(self, running: _Running) -> None:
        # Under the lock: once this returns, the watch never interrupts this cursor again.
        with self._cond:
            self._running.discard(running)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._running:
                    self._cond.wait()
                now = time.monotonic()
                rss = _rss_bytes()
                for running in self._running:
                    if running.reason is not None:
                        continue
                    if now >= running.deadline:
                        running.reason = "time"
                    elif rss is not None and running.rss_ceiling is not None and rss > running.rss_ceiling:
                        running.reason = "memory"
                    else:
                        continue
                    try:
                        running.cursor.interrupt()
                    except duckdb.Error:
                        pass  # the query ended (its cursor closed) between the check and now
                wait = min([self._PERIOD_S] + [r.deadline - now for r in self._running if r.reason is None])
                self._cond.wait(timeout=max(wait, 0.001))


_WATCH = _Watch()


def _size(n: int) -> str:
    return f"{n / (1 << 30):.4g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.4g} MiB"


def run_select(
    cur: duckdb.DuckDBPyConnection,
    statement: duckdb.Statement,
    *,
    source: str,
    max_rows: int,
    timeout_s: float,
    memory_limit: int,
) -> tuple[list[str], list[tuple]]:
    """Execute a checked statement on a sandbox cursor; return (column names, rows).

    ``source`` names the ledger in error messages. More than ``max_rows`` rows, a run longer
    than ``timeout_s``, or memory past ``memory_limit`` is an error, never a silently cut
    result. The caller owns the transaction around it (and rolls it back).
    """
    running = _WATCH.start(cur, timeout_s, memory_limit)
    try:
        result = cur.execute(statement)
        columns = [d[0] for d in (result.description or [])]
        rows = result.fetchmany(max_rows + 1)
    except duckdb.InterruptException:
        if running.reason == "memory":
            raise _memory_error(source, memory_limit) from None
        if running.reason == "time":
            raise LedgerError(
                f"query on ledger {source} ran longer than {timeout_s:g} s and was stopped",
                "narrow it (a WHERE clause, a LIMIT) or ask for a longer time limit",
            ) from None
        raise LedgerError(f"query on ledger {source} was interrupted (the ledger is closing)", "run it again") from None
    except duckdb.OutOfMemoryException:
        raise _memory_error(source, memory_limit) from None
    except duckdb.PermissionException as exc:
        raise LedgerError(f"query on ledger {source} was refused: {exc}", ONLY_SELECT) from None
    except duckdb.Error as exc:
        raise LedgerError(f"query on ledger {source} failed: {exc}", ONLY_SELECT) from None
    finally:
        _WATCH.stop(running)
    if running.reason == "memory":
        # The watch saw the process pass the allowance just as the query ended: the result
        # is whole, but its cost broke the limit, and a limit only holds if it always holds.
        raise _memory_error(source, memory_limit)
    if len(rows) > max_rows:
        raise LedgerError(
            f"query on ledger {source} returns more than {max_rows} rows",
            "add a LIMIT or aggregate, or ask for a larger row limit",
        )
    return columns, rows


def _memory_error(source: str, memory_limit: int) -> LedgerError:
    return LedgerError(
        f"query on ledger {source} ran past the memory limit of {_size(memory_limit)} and was stopped",
        "aggregate or filter earlier (GROUP BY, WHERE, LIMIT), select fewer or shorter columns, "
        "or raise AuditLimits.memory_limit in the service's configuration",
    )


def _run_in_rollback(
    cur: duckdb.DuckDBPyConnection,
    statement: duckdb.Statement,
    *,
    source: str,
    max_rows: int,
    timeout_s: float,
    memory_limit: int,
) -> tuple[list[str], list[tuple]]:
    cur.begin()
    try:
        # A transaction that is always rolled back: even a statement that slipped past the
        # check could not leave a change behind.
        return run_select(cur, statement, source=source, max_rows=max_rows, timeout_s=timeout_s, memory_limit=memory_limit)
    finally:
        try:
            cur.rollback()
        except duckdb.Error:
            pass  # interrupted or failed: DuckDB has already ended the transaction


# -------------------------------------------------------------------- the mirror

ReadSince = Callable[[int], Iterable["pa.RecordBatch"]]


class AuditSandbox:
    """A private, separately fenced DuckDB copy of a ledger's events, for auditor SQL.

    ``read_since(seq)`` yields, as Arrow record batches in seq order, the ledger's events
    with a greater seq (the ledger reads them on a cursor of its own connection). Use
    `query`; `close` removes the copy.
    """

    def __init__(self, source: str, read_since: ReadSince, limits: AuditLimits, work_dir: Path, prefix: str) -> None:
        self.source = source
        self.limits = limits
        self._read_since = read_since
        self._seq = 0
        self._sync_lock = threading.Lock()
        # Guards _closed and _active, the cursors of queries now running (close stops them).
        self._cond = threading.Condition()
        self._closed = False
        self._active: set[duckdb.DuckDBPyConnection] = set()
        # mkdtemp makes it 0700 and new: nobody else can have planted a link in it.
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))
        except OSError as exc:
            raise LedgerError(f"cannot make the audit sandbox's directory in {work_dir}: {exc.strerror}", "pass a writable AuditLimits(work_dir=...)") from None
        # Held while the mirror lives, so that clearing stale mirrors never takes a live one.
        self._lock_fd = os.open(self.dir / _LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            # The mirror is rebuilt at every open, so a crash may lose it: no fsync.
            self._con = _connect(str(self.dir / "mirror.duckdb"), limits, fsync_mode="NONE")
            _fence(self._con)
            self._con.begin()
            for statement in schema.schema_statements():
                self._con.execute(statement)
            self._con.execute("INSERT INTO ledger_meta VALUES ('schema_version', ?)", [str(schema.SCHEMA_VERSION)])
            self._con.commit()
        except (duckdb.Error, LedgerError) as exc:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.close(self._lock_fd)
            message = exc.message if isinstance(exc, LedgerError) else str(exc)
            raise LedgerError(f"cannot set up the audit sandbox for ledger {source}: {message}", "check the disk and the sandbox's work directory") from None

    @property
    def seq(self) -> int:
        """The last seq the copy holds."""
        return self._seq

    def catch_up(self, upto: int) -> None:
        """Copy the ledger's events up to at least ``upto`` (its last committed seq)."""
        if self._seq >= upto:
            return
        with self._sync_lock:
            if self._seq >= upto:
                return
            cur = self._cursor()
            batches = iter(self._read_since(self._seq))
            try:
                for batch in batches:
                    if batch.num_rows == 0:
                        continue
                    # One transaction per batch, in seq order: a query sees a gap-free prefix.
                    import pyarrow as pa  # loaded on the first query only: the service starts without it

                    cur.register("incoming_events", pa.Table.from_batches([batch]))
                    try:
                        cur.execute("INSERT INTO events SELECT * FROM incoming_events")
                    finally:
                        cur.unregister("incoming_events")
                    self._seq = int(batch.column("seq")[-1].as_py())
            except duckdb.Error as exc:
                raise LedgerError(
                    f"the audit sandbox of ledger {self.source} could not copy events after seq {self._seq}: {exc}",
                    "the ledger itself is unharmed; retry the query, and if it fails again free disk space or memory, or restart the service",
                ) from None
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()  # ends the ledger's read cursor now, not at garbage collection
                self._release(cur)

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        with self._cond:
            if self._closed:
                raise LedgerError(f"the audit sandbox of ledger {self.source} is closed", "open the ledger again")
            cur = self._con.cursor()
            self._active.add(cur)
            return cur

    def _release(self, cur: duckdb.DuckDBPyConnection) -> None:
        with self._cond:
            self._active.discard(cur)
            cur.close()
            self._cond.notify_all()

    def query(self, sql: str, *, upto: int, max_rows: int | None = None, timeout_s: float | None = None) -> tuple[list[str], list[tuple]]:
        """Run an auditor's single SELECT on events up to at least seq ``upto``; return (columns, rows)."""
        statement = single_select(sql)
        rows, seconds = self.limits.per_query(max_rows, timeout_s)
        self.catch_up(upto)
        # One cursor per query: queries from several threads run side by side.
        cur = self._cursor()
        try:
            return _run_in_rollback(cur, statement, source=self.source, max_rows=rows, timeout_s=seconds, memory_limit=self.limits.memory_limit)
        finally:
            self._release(cur)

    def close(self) -> None:
        """Stop running queries, close the instance and remove the copy."""
        with self._sync_lock, self._cond:
            if self._closed:
                return
            self._closed = True
            for cur in self._active:
                try:
                    cur.interrupt()
                except duckdb.Error:
                    pass  # it ended between the look and now
            # Interrupted queries end within milliseconds; the bound only guards a DuckDB bug.
            self._cond.wait_for(lambda: not self._active, timeout=10)
            self._con.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock_fd)


def default_work_dir(ledger_path: Path) -> Path:
    """Beside the ledger if that directory is writable, else the system temp directory."""
    parent = ledger_path.resolve().parent
    return parent if os.access(parent, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())


def remove_stale_mirrors(work_dir: Path, prefix: str) -> None:
    """Remove the mirrors named ``prefix…`` in ``work_dir`` that no live sandbox holds (a crash left them)."""
    for stale in work_dir.glob(f"{prefix}*"):
        if not stale.is_dir() or stale.is_symlink():
            continue
        try:
            fd = os.open(stale / _LOCK_FILE, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # no lock file: one being made this instant, or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(stale, ignore_errors=True)
        except BlockingIOError:
            pass  # a live sandbox (this process or another) holds it
        finally:
            os.close(fd)


# -------------------------------------------------------------------- a file nobody holds


def query_file(
    path: Path,
    sql: str,
    *,
    limits: AuditLimits | None = None,
    max_rows: int | None = None,
    timeout_s: float | None = None,
) -> tuple[list[str], list[tuple]]:
    """Run an auditor's single SELECT over the ledger file at ``path``, which no process holds."""
    statement = single_select(sql)  # refuse before touching the file
    limits = limits or AuditLimits()
    rows, seconds = limits.per_query(max_rows, timeout_s)
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"ledger {path} does not exist", "pass the ledger file of the appliance home (ledger.duckdb)")
    con = _connect(":memory:", limits)
    try:
        literal = str(path.resolve()).replace("'", "''")
        try:
            con.execute(f"ATTACH '{literal}' AS ledger (READ_ONLY)")
        except duckdb.Error as exc:
            raise LedgerError(
                f"cannot open ledger {path} read-only: {exc}",
                "while the appliance service holds the ledger, no other process can read it: "
                "ask the service (`appliance ledger query`); within the service's own process "
                "pass the open Ledger instead of the path",
            ) from None
        # The audit macros bind their tables in the current catalog: USE before fencing.
        con.execute("USE ledger")
        _fence(con)
        # On the connection itself, not a cursor: USE holds for this connection only.
        return _run_in_rollback(con, statement, source=str(path), max_rows=rows, timeout_s=seconds, memory_limit=limits.memory_limit)
    finally:
        con.close()
