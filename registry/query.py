"""The auditor's SQL, by ledger file or by open `Ledger`: one SELECT, read-only, no file access.

DuckDB lets a writing process lock every other process out, and one process cannot hold the
same file read-write and read-only at once. So while the service owns the ledger, queries
go to it: pass the open `Ledger` (``query(ledger, sql)`` calls `Ledger.query`, which runs on
the ledger's audit sandbox). A path is for a ledger file no process holds: a fresh,
separately fenced DuckDB instance attaches it READ_ONLY (`registry.audit_sandbox.query_file`).
Both apply the same statement check and the same `AuditLimits`.
"""

from __future__ import annotations

from pathlib import Path

from registry.audit_sandbox import AuditLimits, query_file
from registry.ledger import Ledger

__all__ = ["AuditLimits", "query"]


def query(
    source: Path | Ledger,
    sql: str,
    *,
    max_rows: int | None = None,
    timeout_s: float | None = None,
    limits: AuditLimits | None = None,
) -> tuple[list[str], list[tuple]]:
    """Run ONE reading SELECT over a ledger (a file path, or an open `Ledger`); return (columns, rows).

    Anything else — several statements, COPY, ATTACH, SET, INSTALL, DELETE, a data-changing
    WITH clause, a table function that reads a file or runs SQL from a string — raises
    LedgerError saying what is allowed. More than ``max_rows`` rows, more than ``timeout_s``
    seconds or memory past the limit is an error, not a silently cut result. ``limits``
    applies to a path; an open `Ledger` has its own (``Ledger.open(..., audit=...)``).
    """
    if isinstance(source, Ledger):
        return source.query(sql, max_rows=max_rows, timeout_s=timeout_s)
    return query_file(Path(source), sql, limits=limits, max_rows=max_rows, timeout_s=timeout_s)
