"""Shared parquet I/O: fixed writer options and readers that name the missing column.

parquet-cpp writes no timestamps, so with the options below equal rows give byte-identical
files: every stage's outputs can be compared by digest across runs and machines.

Files that hold document text are written through `keys.sealed.open_write`, so a job told to
seal them (``seal_path``) never writes their text in the clear, and read through
`open_parquet`, which opens sealed and plain files alike (plain ones memory-mapped, as before).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from keys.files import fsync_dir, fsync_path
from keys.sealed import is_sealed, open_read, open_write
from pipeline.errors import DataError

PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "version": "2.6",
    "use_dictionary": True,
    "write_statistics": True,
}
# Rows per row group: small enough to stream, large enough that zstd has context.
ROWS_PER_GROUP = 4096
# A row group is also cut once its text passes this many characters, so a run of
# multi-megabyte documents cannot hold gigabytes in the buffer before 4096 rows are reached.
GROUP_TEXT_CHARS = 64 << 20


class ParquetSink:
    """Buffered parquet writer whose file appears at ``path`` only when the block succeeds, fsynced.

    Row groups are cut after ``ROWS_PER_GROUP`` rows or ``GROUP_TEXT_CHARS`` characters of
    string values, whichever comes first: both depend only on the rows, so the file stays
    deterministic. On an exception the partial file (and ``path``'s folder, if this created
    it and it is empty) is removed, so a failed stage leaves nothing behind.
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = Path(path)
        self.schema = schema
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.rows: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.count = 0
        self.chars = 0
        self.writer: pq.ParquetWriter | None = None
        self.file: BinaryIO | None = None
        self.created_dir = False

    def __enter__(self) -> ParquetSink:
        self.created_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Sealed as the final name would be: the .partial must never hold the text in the clear.
        self.file = open_write(self.tmp, like=self.path)
        try:
            self.writer = pq.ParquetWriter(self.file, self.schema, **PARQUET_OPTIONS)
        except BaseException:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            raise
        return self

    def add(self, **row: Any) -> None:
        for name, column in self.rows.items():
            value = row[name]
            column.append(value)
            if type(value) is str:
                self.chars += len(value)
        self.count += 1
        if self.count >= ROWS_PER_GROUP or self.chars >= GROUP_TEXT_CHARS:
            self._flush()

    def _flush(self) -> None:
        if self.writer is not None and self.count:
            self.writer.write_table(pa.table(self.rows, schema=self.schema))
            self.rows = {name: [] for name in self.schema.names}
            self.count = 0
            self.chars = 0

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self._flush()
        finally:
            try:
                if self.writer is not None:
                    self.writer.close()
            finally:
                if self.file is not None:
                    self.file.close()  # pyarrow leaves a file object it was given open
        if kind is None:
            # A streamed file cannot be one atomic_write; the same steps by hand: data on disk
            # before the name points at it, and the new name on disk before the stage reports it.
            fsync_path(self.tmp)
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
            return
        self.tmp.unlink(missing_ok=True)
        if self.created_dir and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


def open_parquet(path: Path, columns: list[str], hint: str) -> pq.ParquetFile:
    """Open ``path`` (plain or sealed) as parquet holding ``columns``; DataError naming the file otherwise.

    A plain file is memory-mapped where the platform allows, so reading it batch by batch
    leaves its pages to the OS cache instead of copying them into the process; a sealed one
    is decrypted as pyarrow reads it. Close the result (it is a context manager).
    ``hint`` tells the user what to do (e.g. "run the clean stage first"). A sealed file whose
    key this process lacks raises `keys.sealed.SealedDataError`, which names file and key.
    """
    path = Path(path)
    try:
        pf = _open_sealed_parquet(path) if is_sealed(path) else map_parquet(path)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist", hint) from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc})", hint) from None
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        pf.close()
        raise DataError(f"{path} has no column '{missing[0]}' (columns: {', '.join(pf.schema_arrow.names)})", hint)
    return pf


class _SealedParquetFile(pq.ParquetFile):
    """A ParquetFile over a sealed file's plaintext stream, which its ``close`` also closes."""

    def __init__(self, source: BinaryIO) -> None:
        super().__init__(source)
        self._stream = source

    def close(self, force: bool = False) -> None:
        # pyarrow closes only sources it opened itself; this one it was handed.
        try:
            super().close(force=True)
        finally:
            self._stream.close()


def _open_sealed_parquet(path: Path) -> pq.ParquetFile:
    stream = open_read(path)
    try:
        return _SealedParquetFile(stream)
    except BaseException:
        stream.close()
        raise


def map_parquet(path: Path) -> pq.ParquetFile:
    """``path`` opened as parquet, memory-mapped where possible; pyarrow's errors pass through."""
    try:
        return pq.ParquetFile(path, memory_map=True)
    except FileNotFoundError:
        raise
    except OSError:
        # Some file systems (FUSE mounts, special files) cannot be mapped; plain reads still work.
        return pq.ParquetFile(path)


def iter_rows(pf: pq.ParquetFile, columns: list[str], batch_size: int = 2048) -> Iterator[dict[str, list[Any]]]:
    """Column-major batches of ``columns`` as Python lists."""
    for batch in pf.iter_batches(columns=columns, batch_size=batch_size):
        yield {name: batch.column(name).to_pylist() for name in columns}
