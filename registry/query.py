"""The auditor's SQL sandbox: one SELECT, read-only, no file access from SQL.

For a ledger file no process holds open, `query(path, sql)` uses a fresh in-memory DuckDB,
``ATTACH``es the file ``READ_ONLY``, ``USE``s it (the audit macros bind their tables in the
current catalog), and only then ``SET enable_external_access=false`` and
``SET lock_configuration=true`` — in that order, because with external access off DuckDB
refuses to ATTACH the file itself, and with the configuration locked nothing can turn
external access back on.

DuckDB lets a writing process lock every other process out, and one process cannot hold the
same file read-write and read-only at once. So while the service owns the ledger, queries
go to it: pass the open `Ledger` (``query(ledger, sql)`` calls `Ledger.query`, which runs the
same statement check on a cursor of a connection that never had external access).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from registry.errors import LedgerError
from registry.ledger import Ledger
from registry.sql_sandbox import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S, run_select, single_select


def query(
    source: Path | Ledger,
    sql: str,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[list[str], list[tuple]]:
    """Run ONE SELECT over a ledger (a file path, or an open `Ledger`); return (columns, rows).

    Anything else — several statements, COPY, ATTACH, SET, INSTALL, DELETE, a table function
    reading a file — raises LedgerError saying what is allowed. More than ``max_rows`` rows
    or more than ``timeout_s`` seconds is an error, not a silently cut result.
    """
    if isinstance(source, Ledger):
        return source.query(sql, max_rows=max_rows, timeout_s=timeout_s)
    statement = single_select(sql)  # refuse before touching the file
    path = Path(source)
    if not path.is_file():
        raise LedgerError(f"ledger {path} does not exist", "pass the ledger file of the appliance home (ledger.duckdb)")
    con = duckdb.connect(
        ":memory:",
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        },
    )
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
        con.execute("USE ledger")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        return run_select(con, statement, source=str(path), max_rows=max_rows, timeout_s=timeout_s)
    finally:
        con.close()
