"""What an auditor's query may be: exactly one SELECT that reads, and nothing else.

A query is accepted only if it is exactly ONE statement whose type is SELECT (WITH…SELECT,
FROM-first, VALUES, DESCRIBE and SUMMARIZE parse as SELECT too) AND its parse tree holds no
data-changing part and calls no table function outside a short list:

- DuckDB 2.0.1 parses ``WITH d AS (DELETE FROM events RETURNING *) SELECT * FROM d`` as a
  SELECT and runs the DELETE (so do UPDATE and INSERT … RETURNING in a CTE). The tree that
  ``json_serialize_sql`` returns names such a CTE body a ``DELETE_QUERY_NODE``: only the
  query nodes of a pure read pass.
- Table functions may act: ``json_execute_serialized_sql('…')`` runs a serialized statement
  (a DELETE CTE included) that no check of the text sees, ``query('…')`` runs SQL held in a
  string, ``checkpoint()``, ``enable_logging()``, ``create_external_resource()`` … change
  state. Only the ledger's macros and a few pure generators and catalog readers pass.
- ``FROM '/path/file.csv'`` names a file as a table (a replacement scan): a table name that
  looks like a path is refused (the instance's closed file access would stop it anyway).

Anything the check cannot read (``json_serialize_sql`` refuses the statement) is refused:
the check fails closed. Where the statement runs is `registry.audit_sandbox`'s business.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import duckdb

from registry.errors import LedgerError

# 100k rows is more than a screen or a CSV excerpt needs and small enough to hold in memory.
DEFAULT_MAX_ROWS = 100_000
# Every audit view over a large ledger answers in well under a second; 30 s is room for the
# odd full scan, and short enough that a runaway query does not hold a thread for long.
DEFAULT_TIMEOUT_S = 30.0

ONLY_SELECT = (
    "the auditor's SQL sandbox runs exactly one SELECT statement over the ledger's "
    "tables and views (events, artifacts, lineage, runs, stages, metrics, decisions, "
    "ledger_keys, ancestors(digest), descendants(digest)); it cannot change the ledger, "
    "change settings, or read or write files"
)

# Query nodes of a statement that only reads. DELETE_/UPDATE_/INSERT_QUERY_NODE (a
# data-changing CTE) and any kind a later DuckDB adds are refused.
_READING_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})

# Table functions an auditor may call: the ledger's lineage macros, pure generators, JSON
# walkers and catalog readers that show the schema. Not duckdb_settings/duckdb_databases
# (they show the sandbox's paths), not query/json_execute_serialized_sql (SQL in a string
# escapes this check), not checkpoint/logging/profiling/external resources (they act).
ALLOWED_TABLE_FUNCTIONS = frozenset(
    {
        "ancestors",
        "descendants",
        "range",
        "generate_series",
        "unnest",
        "json_each",
        "json_tree",
        "duckdb_tables",
        "duckdb_views",
        "duckdb_columns",
        "duckdb_constraints",
        "duckdb_functions",
        "duckdb_types",
        "duckdb_keywords",
        "pragma_table_info",
    }
)

_parser_lock = threading.Lock()
_parser: duckdb.DuckDBPyConnection | None = None


def single_select(sql: str) -> duckdb.Statement:
    """Parse ``sql`` and return its one reading SELECT statement; raise LedgerError for anything else."""
    if not isinstance(sql, str) or not sql.strip():
        raise LedgerError("the query is empty", ONLY_SELECT)
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise LedgerError(f"the query does not parse: {exc}", ONLY_SELECT) from None
    if len(statements) != 1:
        raise LedgerError(
            f"the query holds {len(statements)} statements; exactly one is allowed",
            ONLY_SELECT,
        )
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        kind = statement.type.name if hasattr(statement.type, "name") else str(statement.type)
        raise LedgerError(f"{kind} statements are refused; only SELECT is allowed", ONLY_SELECT)
    check_reads_only(statement.query)
    return statement


def check_reads_only(sql: str) -> None:
    """Raise LedgerError unless the one statement in ``sql`` only reads (see the module doc)."""
    tree = _serialize(sql)
    if tree.get("error") or len(tree.get("statements") or []) != 1:
        detail = tree.get("error_message") or "it is not one statement"
        raise LedgerError(f"the query cannot be checked, so it is refused: {detail}", ONLY_SELECT)
    for node_type in _query_node_types(tree):
        if node_type not in _READING_NODES:
            what = node_type.removesuffix("_QUERY_NODE").removesuffix("_NODE")
            raise LedgerError(
                f"the query holds a data-changing part ({what} inside a WITH clause); it is refused",
                ONLY_SELECT,
            )
    for name in _base_table_names(tree):
        if any(c in name for c in "/\\.:~"):
            raise LedgerError(f"the query reads the file {name!r} as a table; it is refused", ONLY_SELECT)
    for name in _table_function_names(tree):
        if name not in ALLOWED_TABLE_FUNCTIONS:
            raise LedgerError(
                f"table function {name}() is not allowed in an audit query",
                f"allowed table functions: {', '.join(sorted(ALLOWED_TABLE_FUNCTIONS))}; {ONLY_SELECT}",
            )


def _serialize(sql: str) -> dict:
    global _parser
    with _parser_lock:
        if _parser is None:
            # A private instance only ever asked to parse: no file access, nothing to load.
            _parser = duckdb.connect(
                ":memory:",
                config={"autoinstall_known_extensions": False, "autoload_known_extensions": False, "temp_directory": ""},
            )
            _parser.execute("SET enable_external_access = false")
            _parser.execute("SET lock_configuration = true")
        cur = _parser.cursor()
    try:
        row = cur.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
    except duckdb.Error as exc:
        raise LedgerError(f"the query cannot be checked, so it is refused: {exc}", ONLY_SELECT) from None
    finally:
        cur.close()
    if row is None or not isinstance(row[0], str):
        raise LedgerError("the query cannot be checked, so it is refused", ONLY_SELECT)
    tree = json.loads(row[0])
    if not isinstance(tree, dict):
        raise LedgerError("the query cannot be checked, so it is refused", ONLY_SELECT)
    return tree


def _dicts(node: object) -> Iterator[dict]:
    # Iterative walk: a deeply nested query must not hit Python's recursion limit.
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _query_node_types(tree: dict) -> Iterator[str]:
    for d in _dicts(tree):
        kind = d.get("type")
        if isinstance(kind, str) and kind.endswith("_NODE"):
            yield kind


def _base_table_names(tree: dict) -> Iterator[str]:
    for d in _dicts(tree):
        if d.get("type") == "BASE_TABLE":
            name = d.get("table_name")
            yield name if isinstance(name, str) else "<unnamed>"


def _table_function_names(tree: dict) -> Iterator[str]:
    for d in _dicts(tree):
        if d.get("type") == "TABLE_FUNCTION":
            function = d.get("function")
            name = function.get("function_name") if isinstance(function, dict) else None
            # DuckDB looks function names up case-insensitively; an unreadable one is refused.
            yield name.lower() if isinstance(name, str) else "<unnamed>"
