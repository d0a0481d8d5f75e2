"""Ingest: a folder of source files -> ``raw.parquet``, one row per document.

Formats, chosen by extension: ``.jsonl``/``.ndjson`` give one document per non-blank line
(the string in ``jsonl_field``); ``.parquet`` one per row of ``parquet_column``; any other
listed extension (``.txt``, ``.md``, …) is read as one UTF-8 document per file.
``record`` says where in its file a document came from: the 1-based line for JSONL (what an
editor shows), the 0-based row for parquet (what pyarrow, pandas and DuckDB index), 0 for
whole-file documents.

Bad input stops the stage before anything appears in ``out_dir``: the message names the
file (and line or row) and the hint says how to fix it. Ingest stays faithful to its
sources; normalising and filtering are the clean stage's job.

The parquet helpers at the bottom (``ParquetSink``, ``open_parquet``) are shared by the
later stages so every dataset file is written with the same deterministic options.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from keys.digest import sha256_file
from keys.errors import DataError
from pipeline.config import check
from pipeline.result import ProgressFn, StageResult, no_progress

JSONL_EXTENSIONS = frozenset({".jsonl", ".ndjson"})
PARQUET_EXTENSIONS = frozenset({".parquet"})

RAW_SCHEMA = pa.schema(
    [
        ("doc_id", pa.int64()),
        ("source", pa.string()),
        ("source_sha256", pa.string()),
        ("record", pa.int64()),
        ("text", pa.string()),
    ]
)


@dataclass(kw_only=True)
class IngestConfig:
    # The formats the appliance reads; anything not .jsonl/.parquet is read as plain UTF-8 text.
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".jsonl", ".parquet"])
    # "text" is the field name most JSONL corpora (and HF dataset exports) use.
    jsonl_field: str = "text"
    # Same convention as jsonl_field, for parquet exports of the same datasets.
    parquet_column: str = "text"
    # Corpora are usually trees (one folder per team or source); flat folders work either way.
    recursive: bool = True
    # Dotfiles are editor, VCS and OS artefacts (.git, macOS "._x.txt" forks), not corpus.
    include_hidden: bool = False
    # Text files are read whole; 1 GiB bounds memory and catches a misplaced dump. 0 = no limit.
    max_file_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        check(len(self.extensions) > 0, "extensions must list at least one extension, e.g. [\".txt\"]")
        for ext in self.extensions:
            check(ext.startswith(".") and len(ext) > 1, f"extension {ext!r} must start with a dot, e.g. \".txt\"")
        check(bool(self.jsonl_field), "jsonl_field must not be empty")
        check(bool(self.parquet_column), "parquet_column must not be empty")
        check(self.max_file_bytes >= 0, "max_file_bytes must be >= 0 (0 = no limit)")


def run_ingest(source_dir: Path, out_dir: Path, cfg: IngestConfig, progress: ProgressFn = no_progress) -> StageResult:
    """Read every matching file under ``source_dir`` into ``out_dir/raw.parquet``."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    files, ignored = _find_files(source_dir, cfg)
    inputs: list[dict[str, Any]] = []
    total_bytes = 0
    doc_id = 0
    with ParquetSink(out_dir / "raw.parquet", RAW_SCHEMA) as sink:
        for i, path in enumerate(files):
            rel = path.relative_to(source_dir).as_posix()
            size = _checked_size(path, cfg)
            digest, docs = _read_documents(path, cfg)
            first = doc_id
            for record, text in docs:
                sink.add(doc_id=doc_id, source=rel, source_sha256=digest, record=record, text=text)
                doc_id += 1
            inputs.append({"path": rel, "sha256": digest, "bytes": size, "documents": doc_id - first})
            total_bytes += size
            progress(i + 1, len(files), {"file": rel, "documents": doc_id})
    return StageResult(
        outputs={"raw": out_dir / "raw.parquet"},
        stats={"files": len(files), "documents": doc_id, "bytes": total_bytes, "files_ignored": ignored},
        inputs=inputs,
    )


def _find_files(source_dir: Path, cfg: IngestConfig) -> tuple[list[Path], int]:
    """Matching files in sorted order (by UTF-8 path, so the doc_ids never depend on the file system)."""
    if not source_dir.is_dir():
        raise DataError(f"source folder {source_dir} does not exist or is not a folder", "point ingest at the folder that holds the documents")
    wanted = {e.lower() for e in cfg.extensions}

    def walk_error(exc: OSError) -> None:
        raise DataError(f"cannot list {exc.filename}: {exc.strerror}", "make the folder readable by the appliance, or remove it from the source folder")

    found: list[Path] = []
    ignored = 0
    for root, dirs, names in os.walk(source_dir, onerror=walk_error):
        if not cfg.include_hidden:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        if not cfg.recursive:
            dirs.clear()
        for name in names:
            if (name.startswith(".") and not cfg.include_hidden) or Path(name).suffix.lower() not in wanted:
                ignored += 1
                continue
            found.append(Path(root) / name)
    if not found:
        looked = ", ".join(cfg.extensions)
        raise DataError(
            f"no files with extensions {looked} in {source_dir}" + ("" if cfg.recursive else " (not searching subfolders)"),
            "put the documents there, or set ingest.extensions (and ingest.recursive) to match them",
        )
    found.sort(key=lambda p: p.relative_to(source_dir).as_posix().encode("utf-8"))
    return found, ignored


def _checked_size(path: Path, cfg: IngestConfig) -> int:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}", _UNREADABLE_HINT) from None
    if cfg.max_file_bytes and size > cfg.max_file_bytes:
        raise DataError(
            f"{path} is {size} bytes, more than ingest.max_file_bytes = {cfg.max_file_bytes}",
            "raise ingest.max_file_bytes (0 = no limit), or move the file out of the source folder",
        )
    return size


_UNREADABLE_HINT = "check that it exists and is readable by the appliance, or remove it from the source folder"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}", _UNREADABLE_HINT) from None


def _read_documents(path: Path, cfg: IngestConfig) -> tuple[str, Iterable[tuple[int, str]]]:
    """(sha256 of the file, its (record, text) pairs); parquet rows are streamed, not listed."""
    ext = path.suffix.lower()
    if ext in PARQUET_EXTENSIONS:
        return _parquet_documents(path, cfg.parquet_column)
    data = _read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    text = _decode(data, path)
    if ext in JSONL_EXTENSIONS:
        return digest, _jsonl_documents(text, path, cfg.jsonl_field)
    return digest, [(0, text)]


def _decode(data: bytes, path: Path) -> str:
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"{path} is a binary file, not text (NUL byte at offset {nul})",
            "remove it from the source folder; if it is UTF-16 text, convert it to UTF-8 (iconv -f utf-16 -t utf-8)",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}) cannot be decoded",
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or remove it from the source folder",
        ) from None
    # A byte-order mark is an encoding artefact (Windows editors), not part of the document.
    return text.removeprefix("\ufeff")


def _jsonl_documents(text: str, path: Path, key: str) -> list[tuple[int, str]]:
    docs = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) are not records
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {number}: malformed JSON: {exc.msg} (column {exc.colno})",
                "fix or delete that line; each line of a .jsonl file must be one JSON object",
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{path} line {number}: expected a JSON object with a '{key}' field, got a JSON {_json_type(obj)}",
                "each line of a .jsonl file must be one JSON object",
            )
        if key not in obj:
            fields = ", ".join(sorted(obj)[:10]) or "none"
            raise DataError(
                f"{path} line {number}: no '{key}' field (fields: {fields})",
                "set ingest.jsonl_field to the field that holds the text, or fix the line",
            )
        value = obj[key]
        if not isinstance(value, str):
            raise DataError(
                f"{path} line {number}: field '{key}' is a JSON {_json_type(value)}, not a string",
                "the text field must be a string; fix the line or set ingest.jsonl_field",
            )
        if "\\u" in line and not _encodable(value):
            raise DataError(
                f"{path} line {number}: field '{key}' contains an unpaired surrogate escape (\\ud800–\\udfff), which is not text",
                "fix the line: JSON escapes for characters outside the BMP must come in high+low pairs",
            )
        docs.append((number, value))
    return docs


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, as the user sees it in the file."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _parquet_documents(path: Path, column: str) -> tuple[str, Iterator[tuple[int, str]]]:
    # Hashed in chunks: parquet is read in batches, so its bytes are never all in memory.
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}", _UNREADABLE_HINT) from None
    pf = open_parquet(path, [], "re-export it as parquet, or remove it from the source folder")
    schema = pf.schema_arrow
    if column not in schema.names:
        raise DataError(
            f"{path} has no column '{column}' (columns: {', '.join(schema.names[:20])})",
            "set ingest.parquet_column to the column that holds the text",
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path} column '{column}' holds {kind}, not strings", "set ingest.parquet_column to a text column")
    return digest, _parquet_rows(pf, path, column)


def _parquet_rows(pf: pq.ParquetFile, path: Path, column: str) -> Iterator[tuple[int, str]]:
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=8192):
        for value in batch.column(0).to_pylist():
            if value is None:
                raise DataError(
                    f"{path} row {row} (0-based): column '{column}' is null",
                    "drop rows without text before ingesting (e.g. in DuckDB: WHERE text IS NOT NULL)",
                )
            yield row, value
            row += 1


# ---------------------------------------------------------------------------------------
# Shared parquet I/O: fixed writer options (no timestamps exist in parquet-cpp output, so
# equal rows give byte-identical files), and readers that name the missing column.

PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "version": "2.6",
    "use_dictionary": True,
    "write_statistics": True,
}
# Rows per row group: small enough to stream, large enough that zstd has context.
ROWS_PER_GROUP = 4096


class ParquetSink:
    """Buffered parquet writer whose file appears at ``path`` only when the block succeeds.

    On an exception the partial file (and ``path``'s folder, if this created it and it is
    empty) is removed, so a failed stage leaves nothing behind.
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = Path(path)
        self.schema = schema
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.rows: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.writer: pq.ParquetWriter | None = None
        self.created_dir = False

    def __enter__(self) -> ParquetSink:
        self.created_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(self.tmp, self.schema, **PARQUET_OPTIONS)
        return self

    def add(self, **row: Any) -> None:
        for name, column in self.rows.items():
            column.append(row[name])
        if len(self.rows[self.schema.names[0]]) >= ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.writer is not None and self.rows[self.schema.names[0]]:
            self.writer.write_table(pa.table(self.rows, schema=self.schema))
            self.rows = {name: [] for name in self.schema.names}

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self._flush()
        finally:
            if self.writer is not None:
                self.writer.close()
        if kind is None:
            os.replace(self.tmp, self.path)
            return
        self.tmp.unlink(missing_ok=True)
        if self.created_dir and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


def open_parquet(path: Path, columns: list[str], hint: str) -> pq.ParquetFile:
    """Open ``path`` as parquet holding ``columns``; DataError naming the file otherwise.

    ``hint`` tells the user what to do (e.g. "run the clean stage first").
    """
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist", hint) from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc})", hint) from None
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise DataError(f"{path} has no column '{missing[0]}' (columns: {', '.join(pf.schema_arrow.names)})", hint)
    return pf


def iter_rows(pf: pq.ParquetFile, columns: list[str], batch_size: int = 2048) -> Iterator[dict[str, list[Any]]]:
    """Column-major batches of ``columns`` as Python lists."""
    for batch in pf.iter_batches(columns=columns, batch_size=batch_size):
        yield {name: batch.column(name).to_pylist() for name in columns}
