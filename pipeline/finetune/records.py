"""Example files -> records: one JSON object, CSV row or Parquet row per example, or a ``Skip``.

Like ``pipeline.readers`` for ingest, a reader never raises for one bad record: it yields a
``Skip`` naming the file, the line (JSONL, CSV: 1-based, where an editor points) or row
(Parquet: 0-based, where a dataframe points), the field and the reason, and the caller picks
between failing and skipping (``[finetune] on_error``). A file that cannot be read at all is
a ``DataError`` in either mode: the recipe names it, so training on the others would quietly
drop data the user asked for.

Torch-free; transformers-free.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError

# Deeper than any real example (messages -> tool call -> arguments -> a few levels of JSON),
# far below Python's recursion limit, so nothing later (Jinja's tojson, json.dumps) can recurse
# its way into a RecursionError on a record that happened to parse.
MAX_DEPTH = 64

# Suffix -> reader; .ndjson is the same thing under another name (as ingest accepts it).
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True, slots=True)
class Skip:
    """One example that could not be used: where it is, which field, and why."""

    file: str
    # 1-based line (JSONL, CSV: where the record starts) or 0-based row (Parquet).
    line: int
    # The recipe's name for the field (e.g. "messages"), or "" for the whole record.
    field: str
    # A stable kind: malformed_json, not_object, missing_field, wrong_type, empty, unknown_role,
    # bad_message, bad_tool_call, too_deep, not_utf8, malformed_csv, no_loss, template_mismatch.
    reason: str
    # Human message, read after "file: line N: ".
    detail: str
    unit: str = "line"

    def text(self) -> str:
        field = f"field '{self.field}': " if self.field and f"'{self.field}'" not in self.detail else ""
        return f"{self.file}: {self.unit} {self.line}: {field}{self.detail}"

    def as_dict(self) -> dict[str, Any]:
        """For the ledger and the run summary."""
        return {"file": self.file, "line": self.line, "unit": self.unit, "field": self.field, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Record:
    """One example as read: its fields (JSON values; CSV gives strings) and where it came from."""

    file: str
    line: int
    fields: dict[str, Any]
    unit: str = "line"


class Malformed(Exception):
    """Raised by the field checks (``pipeline.finetune.formats``); turned into a ``Skip``."""

    def __init__(self, field: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.reason = reason
        self.detail = detail


def kind_of(path: Path) -> str:
    name = path.name.lower()
    for suffix, kind in SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    raise DataError(
        f"{path}: not an example file this appliance reads (.jsonl, .jsonl.gz, .parquet or .csv)",
        "convert it to JSONL (one JSON object per line) or Parquet, and name that file in [[finetune.datasets]] path",
    )


def read_records(path: Path, label: str | None = None) -> Iterator[Record | Skip]:
    """Every record of ``path`` (or a ``Skip`` for one that is not a record); ``label`` names the file in messages."""
    name = label or str(path)
    kind = kind_of(path)
    if not path.is_file():
        raise DataError(f"{name}: no such example file", "fix [[finetune.datasets]] path (it is relative to the recipe), or copy the file there")
    try:
        if kind == "parquet":
            yield from _parquet(path, name)
        elif kind == "csv":
            yield from _csv(path, name)
        else:
            yield from _jsonl(path, name, kind == "jsonl.gz")
    except OSError as exc:
        raise DataError(f"{name}: cannot be read: {exc.strerror or exc}", "check that the file exists and is readable, or copy it again") from exc


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, as the user sees it in the file."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests lists/objects deeper than ``limit`` (iterative: never recurses)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_json(text: str, field: str) -> Any:
    """A JSON value held as text (a CSV cell, a JSONL line, a Parquet string column); raises ``Malformed``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Malformed(field, "malformed_json", f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        # Thousands of nested brackets are no example: malformed, skipped in skip mode, never a crash.
        raise Malformed(field, "too_deep", "JSON nested too deeply to read") from None
    if too_deep(value):
        raise Malformed(field, "too_deep", f"JSON nested deeper than {MAX_DEPTH} levels (an example is a few levels of messages and fields)")
    return value


def _jsonl(path: Path, name: str, compressed: bool) -> Iterator[Record | Skip]:
    raw: Any = gzip.open(path, "rb") if compressed else open(path, "rb")  # closed by the with below
    number = 0
    try:
        with raw:
            for number, line in enumerate(raw, start=1):
                if number == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")
                if not line.strip():
                    continue  # blank lines (a trailing newline, spacing) are not examples
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield Skip(name, number, "", "not_utf8", f"not UTF-8: byte 0x{line[exc.start]:02x} at column {exc.start + 1}")
                    continue
                try:
                    value = parse_json(text, "")
                except Malformed as bad:
                    yield Skip(name, number, "", bad.reason, bad.detail)
                    continue
                if type(value) is not dict:
                    yield Skip(name, number, "", "not_object", f"expected a JSON object (one example per line), got a JSON {json_type(value)}")
                    continue
                yield Record(name, number, value)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{name}: line {number + 1}: the gzip stream is cut short or damaged ({exc})", "copy the file again from its origin") from exc


def _csv(path: Path, name: str) -> Iterator[Record | Skip]:
    # Examples are bounded by seq_len after tokenising, not by the csv module's 128 KiB default.
    csv.field_size_limit(1 << 30)
    with open(path, "rb") as f:
        # Bytes that are not UTF-8 survive as surrogate escapes, so only the row holding them is refused.
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text, strict=True)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise DataError(f"{name}: line 1: the header row is not valid CSV ({exc})", "re-export the CSV with a header row naming the columns") from exc
        if not header:
            raise DataError(f"{name}: has no header row; CSV example files need one naming the columns", "add a header row (e.g. instruction,input,output)")
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Skip(name, start, "", "malformed_csv", f"malformed CSV: {exc}")
                continue
            if not row:
                continue
            if len(row) != len(header):
                yield Skip(name, start, "", "malformed_csv", f"record has {len(row)} fields, the header has {len(header)}")
                continue
            try:
                fields = {key: value.encode("utf-8").decode("utf-8") for key, value in zip(header, row, strict=True)}
            except UnicodeEncodeError:
                yield Skip(name, start, "", "not_utf8", "the record is not UTF-8")
                continue
            yield Record(name, start, fields)


def _parquet(path: Path, name: str) -> Iterator[Record | Skip]:
    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as exc:
        raise DataError(f"{name}: not a readable Parquet file ({exc})", "re-export it as Parquet, or convert it to JSONL") from exc
    row = 0
    try:
        # Small batches: examples can be long, and a batch is held whole while it is read.
        for batch in pf.iter_batches(batch_size=256):
            for fields in batch.to_pylist():
                if too_deep(fields):
                    yield Skip(name, row, "", "too_deep", f"nested deeper than {MAX_DEPTH} levels", unit="row")
                else:
                    yield Record(name, row, fields, unit="row")
                row += 1
    except (pa.ArrowException, UnicodeDecodeError) as exc:
        raise DataError(f"{name}: row {row}: the Parquet file is damaged or not UTF-8 ({exc})", "re-export it as Parquet, or convert it to JSONL") from exc
