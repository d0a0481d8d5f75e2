"""The checks every auditor query passes, shared by `query()` and `Ledger.query()`.

A query is accepted only if it is exactly ONE statement whose type is SELECT (WITH…SELECT,
FROM-first, VALUES, DESCRIBE and SUMMARIZE parse as SELECT too). The statement object that
was checked is the one executed, never the text re-parsed. It runs with a row cap and a
time limit (DuckDB's ``interrupt``), on a connection whose database has external access
disabled — the caller guarantees that part.
"""

from __future__ import annotations

import threading

import duckdb

from registry.errors import LedgerError

DEFAULT_MAX_ROWS = 100_000
DEFAULT_TIMEOUT_S = 60.0

_ONLY_SELECT = (
    "the auditor's SQL sandbox runs exactly one SELECT statement over the ledger's "
    "tables and views (events, artifacts, lineage, runs, stages, metrics, decisions, "
    "ledger_keys, ancestors(digest), descendants(digest)); it cannot change the ledger, "
    "change settings, or read or write files"
)


def single_select(sql: str) -> duckdb.Statement:
    """Parse ``sql`` and return its one SELECT statement; raise LedgerError for anything else."""
    if not isinstance(sql, str) or not sql.strip():
        raise LedgerError("the query is empty", _ONLY_SELECT)
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise LedgerError(f"the query does not parse: {exc}", _ONLY_SELECT) from None
    if len(statements) != 1:
        raise LedgerError(
            f"the query holds {len(statements)} statements; exactly one is allowed",
            _ONLY_SELECT,
        )
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        kind = statement.type.name if hasattr(statement.type, "name") else str(statement.type)
        raise LedgerError(f"{kind} statements are refused; only SELECT is allowed", _ONLY_SELECT)
    return statement


def run_select(
    con: duckdb.DuckDBPyConnection,
    statement: duckdb.Statement,
    *,
    source: str,
    max_rows: int = DEFAULT_MAX_ROWS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[list[str], list[tuple]]:
    """Execute a checked statement on ``con``; return (column names, rows).

    ``source`` names the ledger in error messages. More than ``max_rows`` rows, or a run
    longer than ``timeout_s``, is an error rather than a silently cut result.
    """
    timer = threading.Timer(timeout_s, con.interrupt)
    timer.daemon = True
    timer.start()
    try:
        result = con.execute(statement)
        columns = [d[0] for d in (result.description or [])]
        rows = result.fetchmany(max_rows + 1)
    except duckdb.InterruptException:
        raise LedgerError(
            f"query on ledger {source} ran longer than {timeout_s:g} s and was stopped",
            "narrow it (a WHERE clause, a LIMIT) or ask for a longer time limit",
        ) from None
    except duckdb.PermissionException as exc:
        raise LedgerError(f"query on ledger {source} was refused: {exc}", _ONLY_SELECT) from None
    except duckdb.Error as exc:
        raise LedgerError(f"query on ledger {source} failed: {exc}", _ONLY_SELECT) from None
    finally:
        timer.cancel()
    if len(rows) > max_rows:
        raise LedgerError(
            f"query on ledger {source} returns more than {max_rows} rows",
            "add a LIMIT or aggregate, or ask for a larger row limit",
        )
    return columns, rows
