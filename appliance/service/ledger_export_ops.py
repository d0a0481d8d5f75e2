"""`ledger.export`: the service copies its ledger for an auditor and streams the copy as a tar.

The service owns the ledger file (DuckDB lets one process hold it while it writes), so the
copy is made here, from the ledger's own reads, up to a head signed for the occasion; it is
then checked with the very function an auditor runs (`registry.ledger_export.verify_export`)
before a byte leaves. The client writes the files it receives with its own rights: the
service never writes where a caller names.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from appliance.service.caller import Caller
from pipeline.errors import ConfigError
from registry.errors import LedgerError, LedgerIntegrityError
from registry.ledger_export import DUCKDB_FILE, FORMATS, HEAD_FILE, PARQUET_FILE, head_text, verify_export, write_duckdb, write_parquet

CHUNK = 1 << 20
_BLOCK = 512


def ledger_export(svc: Any, caller: Caller, *, format: str) -> Iterator[bytes]:
    """The ledger up to a freshly signed head, verified, as a tar stream of plain files:
    ``ledger.duckdb`` + ``head.json`` (format duckdb) or ``events.parquet`` + ``head.json``
    (format parquet). The authorization decision is itself in the copy (it is recorded first)."""
    svc.authorize(caller, "ledger.export", format[:40])
    if format not in FORMATS:
        raise ConfigError(f"ledger export format {format[:40]!r} is not one of {', '.join(FORMATS)}", "pass --duckdb FILE or --parquet DIR")
    svc.home.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ledger-export-", dir=svc.home.work_dir))
    try:
        if format == "duckdb":
            target = work / DUCKDB_FILE
            head = write_duckdb(svc.ledger, target)
            (work / HEAD_FILE).write_text(head_text(head), encoding="utf-8")
            names = [DUCKDB_FILE, HEAD_FILE]
        else:
            target = work
            write_parquet(svc.ledger, work)
            names = [PARQUET_FILE, HEAD_FILE]
        try:
            # Every node key of the root-signed trust store: a rotated-out key still verifies its rows.
            verify_export(target, svc.trusted)
        except LedgerIntegrityError as exc:
            raise LedgerIntegrityError(
                exc.seq,
                f"the copy of ledger {svc.home.ledger_file} does not verify, so nothing was sent: {exc.message}",
                "run `appliance ledger verify` to find the first broken event, and report the incident",
            ) from None
        # Open now, remove the folder at once: the open files stream on, and nothing is left
        # behind in the home however the stream ends (finished, dropped, never read).
        files = [(name, (work / name).open("rb")) for name in names]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _tar(files)


def _tar(files: Sequence[tuple[str, IO[bytes]]]) -> Iterator[bytes]:
    """A ustar/pax stream of open files, written block by block (no thread, no whole file in memory)."""
    try:
        for name, f in files:
            info = tarfile.TarInfo(name)
            info.size = _size(f)
            # Private until its holder decides otherwise: a ledger names people, their decisions and files.
            info.mode = 0o600
            info.mtime = int(time.time())
            yield info.tobuf(tarfile.PAX_FORMAT)
            left = info.size
            while left > 0 and (chunk := f.read(min(CHUNK, left))):
                left -= len(chunk)
                yield chunk
            if left:  # the file is unlinked and private to this stream: only a failing disk gets here
                raise LedgerError(f"ledger export file {name} could not be read to its end", "check the service's disk, then export again")
            yield b"\0" * (-info.size % _BLOCK)
        yield b"\0" * (2 * _BLOCK)  # the end-of-archive marker
    finally:
        for _, f in files:
            f.close()


def _size(f: IO[bytes]) -> int:
    return os.fstat(f.fileno()).st_size
