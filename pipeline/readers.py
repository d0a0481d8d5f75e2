"""Per-format readers: one source file -> its documents, and a ``Problem`` for each thing that is wrong.

A reader yields ``(record, text)`` for every document and a ``Problem`` for every record it
cannot use; it never raises for bad data, so the caller decides between failing and
skipping. ``record`` is where an editor or a dataframe would point: the 1-based line for
JSONL and CSV (for CSV the line where the record starts), the 0-based row for parquet, 0
for whole-file documents, or with ``[ingest] split`` the 0-based index of the piece
(``pipeline.text_split``). A ``Problem`` with ``record == -1`` means the whole file is
unusable and nothing else comes from it; one whose reason is ``truncated`` (or
``unreadable``, ``not_parquet`` on a record) ends the file after the documents already read.

Record formats (JSONL, plain or compressed, CSV, parquet) are streamed, so memory does not
grow with the file. Their sha256 is taken in a first pass, because every row of
``raw.parquet`` carries it, and checked again in the reading pass (over the bytes the
parser actually saw): a file that changes while it is read stops the stage.
"""

from __future__ import annotations

import codecs
import csv
import errno
import gzip
import hashlib
import io
import json
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import zstandard

from pipeline.errors import DataError
from pipeline.html_text import html_to_text
from pipeline.parquet_io import map_parquet

# Suffix (lower case) -> format name; the [ingest] table's list, which loads without pyarrow.
# Any other suffix listed in ingest.extensions is read as plain text.
from pipeline.settings.ingest import FORMATS
from pipeline.text_split import split_text

# Stable reason kinds: they appear in rejects.parquet, the ledger and the run summary.
REASONS = (
    "unreadable",
    "binary",
    "not_utf8",
    "truncated",
    "malformed_json",
    "not_object",
    "missing_field",
    "not_string",
    "null_text",
    "unpaired_surrogate",
    "wrong_schema",
    "malformed_csv",
    "too_large",
    "not_parquet",
    # Refused by the folder walk (pipeline.ingest) before anything is opened.
    "symlink_outside_corpus",
    "special_file",
)

_STREAMED = frozenset({"jsonl", "jsonl.gz", "jsonl.zst", "csv"})
# Already one record per document: ``[ingest] split`` leaves them alone.
RECORD_FORMATS = _STREAMED | {"parquet"}

# What the user can do about each kind of problem (the ingest stage adds the on_error option).
HINTS: dict[str, str] = {
    "unreadable": "check that it exists and is readable by the appliance, or remove it from the source folder",
    "binary": "remove it from the source folder; if it is UTF-16 text, convert it to UTF-8 (iconv -f utf-16 -t utf-8)",
    "not_utf8": "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or remove it from the source folder",
    "truncated": "the compressed file is cut short or damaged: copy it again from its origin",
    "malformed_json": "fix or delete that line; each line of a .jsonl file must be one JSON object",
    "not_object": "each line of a .jsonl file must be one JSON object",
    "missing_field": "set ingest.jsonl_field to the field that holds the text, or fix the line",
    "not_string": "the text field must be a string; fix the line or set ingest.jsonl_field",
    "null_text": "drop records without text before ingesting (e.g. in DuckDB: WHERE text IS NOT NULL)",
    "unpaired_surrogate": "fix the line: JSON escapes for characters outside the BMP must come in high+low pairs",
    "wrong_schema": "set ingest.parquet_column / ingest.csv_column to the column that holds the text",
    "malformed_csv": "fix the record (quotes must be doubled inside quoted fields), or re-export the CSV",
    "too_large": "raise ingest.max_document_bytes (0 = no limit), or move the file out of the source folder",
    "not_parquet": "re-export it as parquet, or remove it from the source folder",
    "symlink_outside_corpus": (
        "ingest never reads through a link out of the source folder: copy the file (or folder) into the source folder"
        " if it belongs to the corpus, and remove the link"
    ),
    "special_file": "remove it from the source folder: ingest reads regular files only (a FIFO would block it, a device or socket is no document)",
}

_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20
# Enough to see a NUL in any binary format's header, cheap to scan.
_SNIFF = 8192


@dataclass(frozen=True, slots=True)
class ReadOptions:
    jsonl_field: str
    parquet_column: str
    csv_column: str
    # 0 = no limit.
    max_document_bytes: int
    # How a whole-file format becomes documents ("file", "paragraphs", "max_chars"): IngestConfig.split.
    split: str = "file"
    split_chars: int = 4000


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing a reader could not use: ``record`` -1 is the whole file."""

    record: int
    reason: str
    # Human message, to be read after the file's name ("line 3: malformed JSON: …").
    detail: str

    @property
    def hint(self) -> str:
        return HINTS[self.reason]


Item = tuple[int, str] | Problem


def format_of(suffix: str) -> str:
    """The format name of a (lower-case) suffix such as ``.ndjson.gz``."""
    return FORMATS.get(suffix, suffix.lstrip("."))


class HashingReader(io.RawIOBase):
    """Passes a file's bytes through while hashing and counting them (and checking zstd framing)."""

    def __init__(self, raw: io.RawIOBase, frames: ZstdFrames | None = None) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0
        self.frames = frames

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        if n:
            view = memoryview(buffer)[:n]
            self.sha.update(view)
            self.count += n
            if self.frames is not None:
                self.frames.feed(view)
        return n or 0

    def drain(self) -> str:
        """Hash what is left unread; the hex digest of the whole file."""
        buffer = bytearray(_CHUNK)
        while self.readinto(buffer):
            pass
        return self.sha.hexdigest()


class ZstdFrames:
    """Walks zstd frame and block headers as the compressed bytes go by.

    python-zstandard's ``stream_reader`` reports a clean end of file when its input stops in
    the middle of a frame, so a cut-off download would pass as a shorter corpus. The zstd
    format (RFC 8878) makes the end of a frame visible from its headers alone: this follows
    them and says whether the input ended exactly on a frame boundary.
    """

    _MAGIC = 0xFD2FB528

    def __init__(self) -> None:
        self.state = "magic"
        self.need = 4
        self.pending = bytearray()
        self.skip = 0
        self.checksum = False

    def feed(self, data: memoryview) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self.skip:
                step = min(self.skip, end - pos)
                self.skip -= step
                pos += step
                continue
            step = min(self.need - len(self.pending), end - pos)
            self.pending += data[pos : pos + step]
            pos += step
            if len(self.pending) == self.need:
                header = bytes(self.pending)
                self.pending.clear()
                self._header(header)

    def _header(self, header: bytes) -> None:
        if self.state == "magic":
            magic = int.from_bytes(header, "little")
            if magic == self._MAGIC:
                self.state, self.need = "frame", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self.state, self.need = "skippable", 4
            else:
                # Not zstd: the decompressor reports it; never call this stream complete.
                self.state, self.need = "invalid", 1 << 62
        elif self.state == "skippable":
            self.skip = int.from_bytes(header, "little")
            self.state, self.need = "magic", 4
        elif self.state == "frame":
            descriptor = header[0]
            single_segment = (descriptor >> 5) & 1
            self.checksum = bool(descriptor & 4)
            window = 0 if single_segment else 1
            dict_id = (0, 1, 2, 4)[descriptor & 3]
            content_size = (single_segment, 2, 4, 8)[descriptor >> 6]
            self.skip = window + dict_id + content_size
            self.state, self.need = "block", 3
        elif self.state == "block":
            block = int.from_bytes(header, "little")
            # An RLE block (type 1) stores its one repeated byte; the others store their size.
            self.skip = 1 if (block >> 1) & 3 == 1 else block >> 3
            if block & 1:
                self.skip += 4 if self.checksum else 0
                self.state, self.need = "magic", 4

    @property
    def complete(self) -> bool:
        return self.state == "magic" and not self.pending and not self.skip


class _OneRead(io.RawIOBase):
    """A decompressor seen through ``readinto1``: one read of compressed input per call.

    Their ``readinto`` loops until the buffer is full, so an error found by a later loop
    (a CRC mismatch, a cut-off frame) would discard the good data decoded before it.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return int(self.stream.readinto1(buffer))


class _Truncated(Exception):
    """The compressed stream ended before its last frame did."""


class SourceFile:
    """One source file: ``items()`` yields its documents and problems; ``sha256`` and
    ``size`` describe the bytes read (None / stat size when the file could not be read)."""

    def __init__(self, path: Path, fmt: str, opts: ReadOptions, identity: tuple[int, int] | None = None) -> None:
        self.path = path
        self.format = fmt
        self.opts = opts
        # (st_dev, st_ino) the folder walk found at ``path``: any other file there is not read.
        self.identity = identity
        self.sha256: str | None = None
        self.size = 0
        self._hashing: HashingReader | None = None
        self._rows_done = 0
        self._rows_total = 0

    @property
    def position(self) -> int:
        """Bytes of the file consumed so far (for progress)."""
        if self._hashing is not None:
            return self._hashing.count
        if self._rows_total:
            return self.size * self._rows_done // self._rows_total
        return 0

    def items(self) -> Iterator[Item]:
        if self.format == "parquet":
            return self._parquet()
        if self.format in _STREAMED:
            return self._streamed()
        return self._whole_file()

    # -- whole-file formats ------------------------------------------------------------

    def _whole_file(self) -> Iterator[Item]:
        limit = self.opts.max_document_bytes
        try:
            # Buffered, because one raw read may return less than asked for.
            with io.BufferedReader(_open_regular(self.path, self.identity)) as f:
                data = f.read(limit + 1) if limit else f.read()
            if limit and len(data) > limit:
                self.sha256, self.size = _hash_file(self.path, self.identity)
                yield Problem(-1, "too_large", f"is {self.size} bytes, more than ingest.max_document_bytes = {limit}")
                return
        except OSError as exc:
            yield _unreadable(exc)
            return
        self.sha256, self.size = hashlib.sha256(data).hexdigest(), len(data)
        nul = data.find(b"\x00")
        if nul >= 0:
            yield Problem(-1, "binary", f"is a binary file, not text (NUL byte at offset {nul})")
            return
        if self.format == "html":
            result = _decode_html(data)
            if isinstance(result, Problem):
                yield result
                return
            # Split after extraction: the pieces are cut at the paragraphs a reader sees, never inside a tag.
            text = html_to_text(result)
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = data.count(b"\n", 0, exc.start) + 1
                yield Problem(-1, "not_utf8", f"is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}) cannot be decoded")
                return
            # A byte-order mark is an encoding artefact (Windows editors), not part of the document.
            text = text.removeprefix("\ufeff")
        del data  # the bytes are hashed and decoded: while the pieces go out, hold the text only
        if self.opts.split == "file":
            yield 0, text
            return
        # Whitespace-only pieces are not documents, so an empty file gives none (unsplit, one empty document).
        yield from enumerate(split_text(text, self.opts.split, self.opts.split_chars))

    # -- streamed formats ----------------------------------------------------------------

    def _streamed(self) -> Iterator[Item]:
        try:
            self.sha256, self.size = _hash_file(self.path, self.identity)
            raw = _open_regular(self.path, self.identity)
        except OSError as exc:
            yield _unreadable(exc)
            return
        frames = ZstdFrames() if self.format == "jsonl.zst" else None
        self._hashing = hashing = HashingReader(raw, frames)
        with raw:
            decoded: Any = hashing
            if self.format == "jsonl.gz":
                decoded = _OneRead(gzip.GzipFile(fileobj=hashing, mode="rb"))
            elif self.format == "jsonl.zst":
                decoded = _OneRead(zstandard.ZstdDecompressor().stream_reader(hashing, read_across_frames=True, closefd=False))
            stream = io.BufferedReader(decoded, buffer_size=_CHUNK)
            cursor = _Cursor(stream, self.opts.max_document_bytes, frames)
            try:
                head = stream.peek(_SNIFF)[:_SNIFF]
                nul = head.find(b"\x00")
                if nul >= 0:
                    yield Problem(
                        -1, "binary", f"is a binary file, not text (NUL byte at offset {nul}{' after decompression' if decoded is not hashing else ''})"
                    )
                elif self.format == "csv":
                    yield from _csv_records(cursor, self.opts)
                else:
                    yield from _jsonl_records(cursor, self.opts.jsonl_field)
            except _Truncated:
                yield Problem(
                    cursor.number + 1, "truncated", f"line {cursor.number + 1}: the zstd stream ends in the middle of a frame (the file is cut short)"
                )
            except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as exc:
                kind = "gzip" if self.format == "jsonl.gz" else "zstd"
                yield Problem(cursor.number + 1, "truncated", f"line {cursor.number + 1}: the {kind} stream is cut short or damaged ({exc})")
            except OSError as exc:
                yield Problem(cursor.number + 1, "unreadable", f"line {cursor.number + 1}: read error ({exc.strerror or exc})")
                return
            try:
                after = hashing.drain()
            except OSError as exc:
                yield Problem(cursor.number + 1, "unreadable", f"line {cursor.number + 1}: read error ({exc.strerror or exc})")
                return
        _same_bytes(self.path, self.sha256, after)

    # -- parquet -------------------------------------------------------------------------

    def _parquet(self) -> Iterator[Item]:
        column = self.opts.parquet_column
        try:
            self.sha256, self.size = _hash_file(self.path, self.identity)
        except OSError as exc:
            yield _unreadable(exc)
            return
        try:
            pf = self._map_parquet()
        except OSError as exc:
            yield _unreadable(exc)
            return
        except pa.ArrowException as exc:
            yield Problem(-1, "not_parquet", f"is not a readable parquet file ({exc})")
            return
        schema = pf.schema_arrow
        if column not in schema.names:
            yield Problem(-1, "wrong_schema", f"has no column '{column}' (columns: {', '.join(schema.names[:20])})")
            return
        kind = schema.field(column).type
        if not _is_text(kind):
            yield Problem(-1, "wrong_schema", f"column '{column}' holds {kind}, not strings")
            return
        self._rows_total = pf.metadata.num_rows
        row = 0
        try:
            # Small batches: a batch of multi-megabyte documents is held whole while it is read.
            for batch in pf.iter_batches(columns=[column], batch_size=1024):
                for value in _strings(batch.column(0)):
                    if value is None:
                        yield Problem(row, "null_text", f"row {row}: column '{column}' is null")
                    elif isinstance(value, bytes):
                        yield Problem(row, "not_utf8", f"row {row}: column '{column}' is not valid UTF-8")
                    else:
                        yield row, value
                    row += 1
                self._rows_done = row
        except (pa.ArrowException, OSError) as exc:
            yield Problem(row, "not_parquet", f"row {row}: the parquet file is damaged ({exc})")
            return
        _same_bytes(self.path, self.sha256, _hash_file(self.path, self.identity)[0])

    def _map_parquet(self) -> Any:
        if not os.path.isdir(_PROC_FD):
            return map_parquet(self.path)
        # pyarrow opens by name: hand it this very file (checked like every open) through /proc.
        with _open_regular(self.path, self.identity) as f:
            return map_parquet(Path(_PROC_FD) / str(f.fileno()))


_PROC_FD = "/proc/self/fd"


def _open_regular(path: Path, identity: tuple[int, int] | None = None) -> io.FileIO:
    """``path`` opened for reading, if it is a regular file (and the file ``identity`` names, when given)."""
    # Opening a FIFO would wait for a writer forever, and a device is not a document: look first,
    # then open without blocking and look again at what was opened (it may have been swapped).
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)")
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise OSError(errno.ESTALE, "it was replaced after the folder walk found it (not the same file any more)")
    except BaseException:
        os.close(fd)
        raise
    return io.FileIO(fd, "rb", closefd=True)


def _hash_file(path: Path, identity: tuple[int, int] | None = None) -> tuple[str, int]:
    """(sha256, size) of the bytes read, which may differ from an earlier stat."""
    sha, size = hashlib.sha256(), 0
    with _open_regular(path, identity) as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def _same_bytes(path: Path, before: str | None, after: str) -> None:
    if before != after:
        # Rows already carry the first digest; going on would record a provenance that is false.
        raise DataError(
            f"{path} changed while ingest was reading it (sha256 {before} before, {after} after)",
            "stop whatever is writing into the source folder, then run ingest again",
        )


def _unreadable(exc: OSError) -> Problem:
    return Problem(-1, "unreadable", f"cannot be read: {exc.strerror or exc}")


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _strings(array: pa.Array) -> list[Any]:
    """The column as Python values; invalid UTF-8 (parquet does not check it) comes back as bytes."""
    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        values = array.cast(pa.large_binary()).to_pylist()
        return [_try_utf8(v) for v in values]


def _try_utf8(value: bytes | None) -> str | bytes | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


# -- line-oriented formats ------------------------------------------------------------------


class _LineTooLong(Exception):
    pass


class _Cursor:
    """Physical lines of a decompressed stream, numbered as an editor does, none longer than the limit.

    An over-long line is read to its end without being kept, then reported; a last line
    without a newline is checked against the zstd framing first, so the tail of a cut-off
    file is never taken for a record.
    """

    def __init__(self, stream: io.BufferedReader, limit: int, frames: ZstdFrames | None) -> None:
        self.stream = stream
        # The line may hold the document plus its newline; one byte more proves it too long.
        self.cap = limit + 2 if limit else -1
        self.frames = frames
        self.number = 0

    def next_line(self) -> bytes:
        """The next line (b"" at the end); raises _LineTooLong after counting it."""
        line = self.stream.readline(self.cap)
        if not line.endswith(b"\n"):
            if self.cap > 0 and len(line) == self.cap:
                self.number += 1
                while (rest := self.stream.readline(self.cap)) and not rest.endswith(b"\n"):
                    pass
                raise _LineTooLong
            if self.frames is not None and not self.frames.complete:
                raise _Truncated
            if not line:
                return line
        self.number += 1
        if self.number == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        return line


def _jsonl_records(cursor: _Cursor, key: str) -> Iterator[Item]:
    limit = cursor.cap - 2
    while True:
        try:
            line = cursor.next_line()
        except _LineTooLong:
            yield Problem(cursor.number, "too_large", f"line {cursor.number}: longer than ingest.max_document_bytes = {limit} bytes")
            continue
        if not line:
            return
        number = cursor.number
        if line.isspace():
            continue  # blank lines (a trailing newline, spacing) are not records
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Problem(number, "not_utf8", f"line {number}: not UTF-8: byte 0x{line[exc.start]:02x} at column {exc.start + 1} cannot be decoded")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Problem(number, "malformed_json", f"line {number}: malformed JSON: {exc.msg} (column {exc.colno})")
            continue
        except RecursionError:
            # A line of a hundred thousand nested brackets is not a document: a malformed line,
            # skipped and counted like any other in skip mode, never a crash.
            yield Problem(number, "malformed_json", f"line {number}: JSON nested too deeply to read (a record is one object of text fields)")
            continue
        if type(obj) is not dict:
            yield Problem(number, "not_object", f"line {number}: expected a JSON object with a '{key}' field, got a JSON {_json_type(obj)}")
            continue
        value = obj.get(key, _MISSING)
        if type(value) is str:
            if "\\u" in text and not _encodable(value):
                yield Problem(
                    number, "unpaired_surrogate", f"line {number}: field '{key}' contains an unpaired surrogate escape (\\ud800–\\udfff), which is not text"
                )
            else:
                yield number, value
        elif value is _MISSING:
            fields = ", ".join(sorted(obj)[:10]) or "none"
            yield Problem(number, "missing_field", f"line {number}: no '{key}' field (fields: {fields})")
        elif value is None:
            yield Problem(number, "null_text", f"line {number}: field '{key}' is null")
        else:
            yield Problem(number, "not_string", f"line {number}: field '{key}' is a JSON {_json_type(value)}, not a string")


_MISSING = object()


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


class _CsvLines:
    """The cursor's lines as text for ``csv.reader``; bytes that are not UTF-8 survive as
    surrogate escapes so that only the record holding them is refused, not the rest of the file."""

    def __init__(self, cursor: _Cursor) -> None:
        self.cursor = cursor

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        line = self.cursor.next_line()
        if not line:
            raise StopIteration
        return line.decode("utf-8", "surrogateescape")


def _csv_records(cursor: _Cursor, opts: ReadOptions) -> Iterator[Item]:
    column, limit = opts.csv_column, opts.max_document_bytes
    # The csv module refuses fields over 128 KiB by default; documents are bounded by our own limit.
    csv.field_size_limit(limit if limit else 2**62)
    lines = _CsvLines(cursor)
    reader = csv.reader(lines, strict=True)
    header: list[str] | None = []
    try:
        while header == []:  # blank lines before the header
            header = next(reader, None)
    except csv.Error as exc:
        yield Problem(-1, "wrong_schema", f"line {cursor.number}: the header row is not valid CSV ({exc})")
        return
    except _LineTooLong:
        yield Problem(-1, "wrong_schema", f"line {cursor.number}: the header row is longer than ingest.max_document_bytes = {limit}")
        return
    if header is None:
        yield Problem(-1, "wrong_schema", "has no header row (the file is empty); CSV files need one naming the columns")
        return
    where = f"line {cursor.number}"
    if not all(map(_encodable, header)):
        yield Problem(-1, "not_utf8", f"{where}: the header row is not UTF-8")
        return
    if header.count(column) != 1:
        names = ", ".join(header[:20])
        problem = "names it more than once" if column in header else "has no such column"
        yield Problem(-1, "wrong_schema", f"{where}: the header row {problem}: '{column}' (columns: {names})")
        return
    index, width = header.index(column), len(header)
    while True:
        start = cursor.number + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except _LineTooLong:
            yield Problem(start, "too_large", f"line {start}: a line of the record is longer than ingest.max_document_bytes = {limit} bytes")
            # The record's remaining lines would be read out of context: start afresh after it.
            reader = csv.reader(lines, strict=True)
            continue
        except csv.Error as exc:
            kind = "too_large" if "field larger than field limit" in str(exc) else "malformed_csv"
            yield Problem(
                start,
                kind,
                f"line {start}: malformed CSV: {exc}" if kind == "malformed_csv" else f"line {start}: field longer than ingest.max_document_bytes = {limit}",
            )
            continue
        if not row:
            continue  # a blank line
        if len(row) != width:
            yield Problem(start, "malformed_csv", f"line {start}: record has {len(row)} fields, the header has {width}")
            continue
        value = row[index]
        if not _encodable(value):
            yield Problem(start, "not_utf8", f"line {start}: column '{column}' is not UTF-8")
            continue
        yield start, value


# -- HTML -----------------------------------------------------------------------------------

_META_CHARSET = re.compile(rb"""<meta[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
# WHATWG Encoding: every latin-1 label means windows-1252, whose undefined bytes map to C1 controls.
_LATIN1_LABELS = frozenset(
    {"iso-8859-1", "iso8859-1", "iso_8859-1", "latin1", "latin-1", "l1", "cp819", "ibm819", "windows-1252", "cp1252", "x-cp1252", "ascii", "us-ascii"}
)
_CP1252 = {i: bytes([i]).decode("cp1252") for i in range(0x80, 0xA0) if i not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)}


def _decode_html(data: bytes) -> str | Problem:
    """The page as text, in the charset its ``<meta>`` declares (UTF-8 when none does)."""
    match = None if data.startswith(_BOM) else _META_CHARSET.search(data, 0, 4096)
    label = match.group(1).decode("ascii").lower() if match else "utf-8"
    if label in _LATIN1_LABELS:
        return data.decode("latin-1").translate(_CP1252)
    try:
        codec = codecs.lookup(label).name
    except LookupError:
        codec = "utf-8"  # an unknown label is ignored, as browsers do
    if codec.startswith("utf-16") or codec.startswith("utf-32"):
        codec = "utf-8"  # a page that could say so in ASCII is not UTF-16 (WHATWG)
    try:
        return data.decode(codec).removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        name = "UTF-8" if codec == "utf-8" else f"{label} (its declared charset)"
        return Problem(-1, "not_utf8", f"is not {name}: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}) cannot be decoded")
