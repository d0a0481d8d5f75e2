"""Ingest: a folder of source files -> ``raw.parquet``, one row per document.

Formats are chosen by (case-insensitive) suffix; ``pipeline.readers`` reads each one:
``.txt``/``.md`` (and any other suffix listed in ``extensions``) and ``.html``/``.htm``
give one document per file, or with ``split`` one per piece of the file's text
(``pipeline.text_split``); ``.jsonl``/``.ndjson``, also gzip- or zstd-compressed, one per
line; ``.csv`` one per record; ``.parquet`` one per row. Record formats are streamed, so
memory stays flat whatever the size of the corpus.

The folder is walked recursively (``recursive``), keeping files whose POSIX path relative
to the source folder matches an ``include`` glob and no ``exclude`` glob (``*`` stays
inside a folder, ``**`` spans any number of them); hidden files and folders are skipped
unless ``include_hidden``. Files are read in the sorted order of their UTF-8 paths, so
doc_ids (0.., in file then record order) never depend on the file system. Within a file a
document is named by its ``record``: the line (JSONL, CSV), the row (parquet), 0 for a
whole file, or the piece index 0.. when ``split`` cuts it; the pieces depend only on the
file's bytes and the two split settings, so the same corpus and recipe give the same ids
and the same ``raw.parquet``. Each whole-text file's entry in the result's ``inputs`` (the
ledger's source record) carries the ``split`` mode and ``split_chars`` next to its
``documents``, when ``split`` is not ``"file"``.

Every file is resolved to its real path, and what lies outside the real source folder is
never read: a symbolic link (to a file or a folder) that leads out of it is refused as
``symlink_outside_corpus``, naming the link and its target. FIFOs, sockets and devices are
refused as ``special_file`` (a FIFO would block the reader forever). Both are reported like
any unreadable file below: the stage fails, or with ``"skip"`` they are listed and counted
(a refused link to a folder with the format ``folder``).
Links that stay inside are followed, links to folders too; each real folder is walked once,
so a loop of links ends there. A file reachable by several paths (symbolic or hard links) is
read once: under its own path when the walk takes that path, else under the first of its
links in sorted order; its other paths count as ignored. The reader opens the file's
link-free real path and reads it only if it is still the file (device, inode) the walk
found, so a file swapped for a link after the walk is not read either.

Every problem names the file, the line (1-based; for CSV where the record starts) or row
(0-based, parquet) and a stable reason kind (``pipeline.readers.REASONS``). With
``on_error = "fail"`` (the default) the first one stops the stage with nothing left in
``out_dir``. With ``"skip"`` a bad record is left out and the rest of its file kept; a
file that cannot be read at all (unreadable, binary, not parquet, wrong schema, too large,
a whole-file format that is not UTF-8) is left out whole; a compressed file that is cut
short or damaged keeps the records read before the damage, and the damage is recorded
as one ``truncated`` item. Nothing is dropped silently: each skipped item is a row of
``rejects.parquet`` and is counted in the result's ``skipped`` and ``stats``.

Ingest stays faithful to its sources; normalising and filtering are the clean stage's job.
"""

from __future__ import annotations

import os
import stat
from collections import Counter, deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import DataError
from pipeline.globs import glob_regex
from pipeline.parquet_io import PARQUET_OPTIONS, ROWS_PER_GROUP, ParquetSink, iter_rows, open_parquet
from pipeline.readers import RECORD_FORMATS, Problem, ReadOptions, SourceFile, format_of
from pipeline.result import ProgressFn, StageResult, no_progress

# The [ingest] table lives in a module without pyarrow, so a recipe loads without it; its names stay importable from here.
from pipeline.settings.ingest import IngestConfig

__all__ = [
    "PARQUET_OPTIONS",
    "RAW_SCHEMA",
    "REJECTS_SCHEMA",
    "ROWS_PER_GROUP",
    "IngestConfig",
    "ParquetSink",
    "Source",
    "find_sources",
    "glob_regex",
    "iter_rows",
    "open_parquet",
    "run_ingest",
]

RAW_SCHEMA = pa.schema(
    [
        ("doc_id", pa.int64()),
        ("source", pa.string()),
        ("source_sha256", pa.string()),
        ("record", pa.int64()),
        ("text", pa.string()),
    ]
)
# One row per skipped item; record -1 is a whole file.
REJECTS_SCHEMA = pa.schema([("path", pa.string()), ("record", pa.int64()), ("reason", pa.string()), ("detail", pa.string())])

# Enough to see the pattern of a file's problems; the full list is in rejects.parquet.
MAX_EXAMPLES = 20
# Records between progress reports inside a file: often enough for a live bar, rare enough to cost nothing.
PROGRESS_EVERY = 1000


@dataclass(frozen=True, slots=True)
class Source:
    """One file the walk selected: to be read, or (``refused``) to be reported without being opened."""

    # POSIX path relative to the source folder, as the walk reached it (a link's own name).
    rel: str
    # ``source_dir / rel``: the name messages give.
    path: Path
    format: str
    # The file's link-free path inside the real source folder, its (st_dev, st_ino) and size
    # there: the reader opens that path and reads it only if it is still that file.
    real: Path | None = None
    identity: tuple[int, int] | None = None
    size: int = 0
    refused: Problem | None = None


def find_sources(source_dir: Path, cfg: IngestConfig) -> tuple[list[Source], int]:
    """Every matching file in sorted order of its relative path, and how many were ignored.

    Ignored: files seen in the walk but not taken (hidden, unknown suffix, not included or
    excluded, another path to a file already taken); folders that are hidden, excluded with
    ``dir/**`` or below a non-recursive walk are not entered, so their files are not counted.
    Links out of the folder and special files come back with ``refused`` set.
    """
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise DataError(f"source folder {source_dir} does not exist or is not a folder", "point ingest at the folder that holds the documents")
    found, ignored = _Walk(source_dir, cfg).run()
    if not found:
        filters = "" if cfg.include == ["**"] and not cfg.exclude else f", include {cfg.include}, exclude {cfg.exclude}"
        raise DataError(
            f"no files with extensions {', '.join(cfg.extensions)} in {source_dir}{filters}" + ("" if cfg.recursive else " (not searching subfolders)"),
            "put the documents there, or set ingest.extensions (and ingest.include / exclude / recursive) to match them",
        )
    return found, ignored


_SPECIAL = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


class _Walk:
    """The folder walk behind ``find_sources`` (rules in the module docstring).

    Each folder is opened from the real source folder one component at a time, never through
    a symbolic link, and listed through that descriptor, so what it holds is inside the
    folder even if links are changed while the walk runs. Folder links are followed after the
    plain tree, so a file reachable both ways keeps its own name.
    """

    def __init__(self, source_dir: Path, cfg: IngestConfig) -> None:
        self.source_dir, self.cfg = source_dir, cfg
        self.root = os.path.realpath(source_dir)
        self.suffixes = sorted({e.lower() for e in cfg.extensions}, key=len, reverse=True)
        self.include = [glob_regex(g) for g in cfg.include]
        self.exclude = [glob_regex(g) for g in cfg.exclude]
        # "dir/**" excludes everything below dir, so the walk need not go there.
        self.pruned = [glob_regex(g[:-3]) for g in cfg.exclude if g.endswith("/**")]
        self.ignored = 0
        # (reached through a link, source)
        self.found: list[tuple[bool, Source]] = []
        self.visited: set[tuple[int, int]] = set()
        # (relative prefix, real folder) of links to folders inside, walked after the plain tree.
        self.links: deque[tuple[str, str]] = deque()

    def run(self) -> tuple[list[Source], int]:
        self._tree("", self.root, via_link=False)
        while self.links:
            prefix, real = self.links.popleft()
            self._tree(prefix, real, via_link=True)
        return self._one_path_per_file(), self.ignored

    def _tree(self, prefix: str, real: str, *, via_link: bool) -> None:
        stack = [(prefix, real)]
        while stack:
            prefix, real = stack.pop()
            try:
                fd = _open_beneath(self.root, real)
            except OSError as exc:
                shown = self.source_dir / prefix if prefix else self.source_dir
                raise DataError(
                    f"cannot list {shown}: {exc.strerror or exc}", "make the folder readable by the appliance, or remove it from the source folder"
                ) from None
            try:
                folder = os.fstat(fd)
                if (folder.st_dev, folder.st_ino) in self.visited:
                    continue  # a second way into a folder already walked (a link, a bind mount): no loop, no double reading
                self.visited.add((folder.st_dev, folder.st_ino))
                subfolders = []
                with os.scandir(fd) as listing:
                    entries = sorted(listing, key=lambda e: os.fsencode(e.name))
                for entry in entries:
                    rel, path = prefix + entry.name, os.path.join(real, entry.name)
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed since the listing
                    if stat.S_ISDIR(st.st_mode):
                        if self._enters(entry.name, rel):
                            subfolders.append((rel + "/", path))
                    elif stat.S_ISLNK(st.st_mode):
                        self._link(fd, entry.name, rel, path)
                    elif (fmt := self._selected(entry.name, rel)) is not None:
                        self._file(rel, fmt, path, st, via_link=via_link)
            finally:
                os.close(fd)
            stack.extend(reversed(subfolders))

    def _enters(self, name: str, rel: str) -> bool:
        return self.cfg.recursive and (self.cfg.include_hidden or not name.startswith(".")) and not any(p.fullmatch(rel) for p in self.pruned)

    def _selected(self, name: str, rel: str) -> str | None:
        """The format of a file the filters take, or None (counted as ignored)."""
        lower = name.lower()
        suffix = next((s for s in self.suffixes if lower.endswith(s)), None)
        if (
            suffix is None
            or (name.startswith(".") and not self.cfg.include_hidden)
            or not any(p.fullmatch(rel) for p in self.include)
            or any(p.fullmatch(rel) for p in self.exclude)
        ):
            self.ignored += 1
            return None
        return format_of(suffix)

    def _inside(self, real: str) -> bool:
        return os.path.commonpath([self.root, real]) == self.root

    def _file(self, rel: str, fmt: str, real: str, st: os.stat_result, *, via_link: bool, link: str | None = None) -> None:
        if stat.S_ISREG(st.st_mode):
            source = Source(rel, self.source_dir / rel, fmt, real=Path(real), identity=(st.st_dev, st.st_ino), size=st.st_size)
            self.found.append((via_link, source))
            return
        kind = _SPECIAL.get(stat.S_IFMT(st.st_mode), "not a file")
        what = f"is a symbolic link to {link}, which is {kind}" if link is not None else f"is {kind}"
        self._refuse(rel, fmt, "special_file", f"{what}, not a regular file")

    def _link(self, dir_fd: int, name: str, rel: str, path: str) -> None:
        target = os.readlink(name, dir_fd=dir_fd)
        real = os.path.realpath(path)
        try:
            pointed: os.stat_result | OSError = os.stat(path)
        except OSError as exc:  # dangling, or a loop of links
            pointed = exc
        if isinstance(pointed, os.stat_result) and stat.S_ISDIR(pointed.st_mode):
            if not self._enters(name, rel):
                return
            if not self._inside(real):
                self._refuse(
                    rel, "folder", "symlink_outside_corpus", f"is a symbolic link to the folder {target}, outside the source folder (it resolves to {real})"
                )
            else:
                self.links.append((rel + "/", real))
            return
        fmt = self._selected(name, rel)
        if fmt is None:
            return
        if not self._inside(real):
            self._refuse(rel, fmt, "symlink_outside_corpus", f"is a symbolic link to {target}, outside the source folder (it resolves to {real})")
            return
        try:
            if isinstance(pointed, OSError):
                raise pointed
            # What the link names now, reached without following any link: no swap after the check.
            st = _lstat_beneath(self.root, real)
        except OSError as exc:
            self._refuse(rel, fmt, "unreadable", f"cannot be read: {exc.strerror or exc}")
            return
        self._file(rel, fmt, real, st, via_link=True, link=target)

    def _refuse(self, rel: str, fmt: str, reason: str, detail: str) -> None:
        self.found.append((True, Source(rel, self.source_dir / rel, fmt, refused=Problem(-1, reason, detail))))

    def _one_path_per_file(self) -> list[Source]:
        """Each real file once: under its own path if the walk took it, else its first link in sorted order."""
        best: dict[tuple[int, int], tuple[tuple[bool, bytes], Source]] = {}
        out: list[Source] = []
        for via_link, source in self.found:
            if source.identity is None:
                out.append(source)
                continue
            key = (via_link, os.fsencode(source.rel))
            held = best.get(source.identity)
            if held is not None:
                self.ignored += 1
                if held[0] <= key:
                    continue
            best[source.identity] = (key, source)
        out.extend(source for _, source in best.values())
        out.sort(key=lambda f: os.fsencode(f.rel))
        return out


def _open_beneath(root: str, real: str) -> int:
    """A descriptor of the folder ``real`` opened from ``root`` one component at a time, following no link."""
    rel = os.path.relpath(real, root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for part in [] if rel == "." else rel.split(os.sep):
        try:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = child
    return fd


def _lstat_beneath(root: str, real: str) -> os.stat_result:
    """lstat of ``real`` (inside ``root``), reached without following any link."""
    fd = _open_beneath(root, os.path.dirname(real))
    try:
        return os.stat(os.path.basename(real), dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


@dataclass
class _FileTally:
    """What became of one source file."""

    documents: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    whole_file: str | None = None

    def add(self, problem: Problem, name: str) -> None:
        self.reasons[problem.reason] += 1
        if problem.record < 0:
            self.whole_file = problem.reason
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"record": problem.record, "reason": problem.reason, "detail": f"{name} {problem.detail}"})

    @property
    def records_skipped(self) -> int:
        return sum(self.reasons.values()) - (1 if self.whole_file else 0)


def run_ingest(source_dir: Path, out_dir: Path, cfg: IngestConfig, progress: ProgressFn = no_progress) -> StageResult:
    """Read every matching file under ``source_dir`` into ``out_dir/raw.parquet``.

    Skipped items (``on_error = "skip"``) go to ``out_dir/rejects.parquet``, which exists
    only when something was skipped. Raises DataError on the first problem under
    ``on_error = "fail"``, and when no document at all could be read.
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    files, ignored = find_sources(source_dir, cfg)
    total = sum(f.size for f in files)
    opts = ReadOptions(
        jsonl_field=cfg.jsonl_field,
        parquet_column=cfg.parquet_column,
        csv_column=cfg.csv_column,
        max_document_bytes=cfg.max_document_bytes,
        split=cfg.split,
        split_chars=cfg.split_chars,
    )
    raw_path, rejects_path = out_dir / "raw.parquet", out_dir / "rejects.parquet"
    inputs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    by_format: dict[str, dict[str, int]] = {}
    doc_id = done = 0
    with ExitStack() as stack:
        sink = stack.enter_context(ParquetSink(raw_path, RAW_SCHEMA))
        rejects: ParquetSink | None = None
        for file in files:
            name, fmt, size = _printable(file.rel), file.format, file.size
            source = SourceFile(file.real or file.path, fmt, opts, identity=file.identity)
            tally = _FileTally()
            # A refused file (a link out of the folder, a FIFO) is never opened: its one problem is all there is.
            items = source.items() if file.refused is None else iter((file.refused,))
            for item in items:
                if isinstance(item, tuple):
                    sink.add(doc_id=doc_id, source=name, source_sha256=source.sha256, record=item[0], text=item[1])
                    doc_id += 1
                    tally.documents += 1
                    if tally.documents % PROGRESS_EVERY == 0:
                        progress(done + min(source.position, size), total, {"file": name, "documents": doc_id})
                    continue
                if cfg.on_error == "fail":
                    raise DataError(
                        f"{file.path} {item.detail} [{item.reason}]",
                        f'{item.hint}; or set ingest.on_error = "skip" to leave it out and list it in rejects.parquet',
                    )
                if rejects is None:
                    rejects = stack.enter_context(ParquetSink(rejects_path, REJECTS_SCHEMA))
                rejects.add(path=name, record=item.record, reason=item.reason, detail=f"{name} {item.detail}")
                tally.add(item, name)
            done += size
            progress(done, total, {"file": name, "documents": doc_id})
            nbytes = source.size or size
            entry = {
                "path": name,
                "sha256": source.sha256,
                "bytes": nbytes,
                "format": fmt,
                "documents": tally.documents,
                "records_skipped": tally.records_skipped,
                "skipped": tally.whole_file,
            }
            if cfg.split != "file" and file.refused is None and fmt not in RECORD_FORMATS:
                # So an auditor reads "book.txt: 312 documents (paragraphs, 4000)" in the ledger;
                # left out under "file", so that a recipe without split records what it always did.
                entry |= {"split": cfg.split, "split_chars": cfg.split_chars}
            inputs.append(entry)
            if tally.reasons:
                skipped.append(
                    {
                        "path": name,
                        "sha256": source.sha256,
                        "whole_file": tally.whole_file is not None,
                        "reasons": dict(sorted(tally.reasons.items())),
                        "records_skipped": tally.records_skipped,
                        "examples": tally.examples,
                    }
                )
            counts = by_format.setdefault(fmt, {"files": 0, "documents": 0, "bytes": 0})
            counts["files"] += 1
            counts["documents"] += tally.documents
            counts["bytes"] += nbytes
        stats = _stats(inputs, skipped, by_format, ignored)
        if doc_id == 0:
            raise _nothing_read(source_dir, stats, skipped)
    if rejects is None:
        rejects_path.unlink(missing_ok=True)  # a previous run's list would describe other data
    outputs = {"raw": raw_path} | ({"rejects": rejects_path} if rejects is not None else {})
    return StageResult(outputs=outputs, stats=stats, inputs=inputs, skipped=skipped)


def _stats(inputs: list[dict[str, Any]], skipped: list[dict[str, Any]], by_format: dict[str, dict[str, int]], ignored: int) -> dict[str, Any]:
    by_reason: Counter[str] = Counter()
    for entry in skipped:
        by_reason.update(entry["reasons"])
    whole = sum(1 for x in inputs if x["skipped"])
    return {
        "files": len(inputs),
        "files_read": len(inputs) - whole,
        "files_skipped": whole,
        "files_ignored": ignored,
        "documents": sum(x["documents"] for x in inputs),
        "records_skipped": sum(x["records_skipped"] for x in inputs),
        "bytes": sum(x["bytes"] for x in inputs),
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "by_format": dict(sorted(by_format.items())),
    }


def _nothing_read(source_dir: Path, stats: dict[str, Any], skipped: list[dict[str, Any]]) -> DataError:
    # An empty corpus would only fail later, in clean or the tokenizer, further from the cause.
    reasons = ", ".join(f"{kind}: {n}" for kind, n in stats["skipped_by_reason"].items()) or "none"
    first = f"; first: {skipped[0]['examples'][0]['detail']}" if skipped else ""
    return DataError(
        f"no documents read from {source_dir}: {stats['files']} files, {stats['files_skipped']} skipped whole, "
        f"{stats['records_skipped']} records skipped (reasons: {reasons}){first}",
        "fix or replace the files named above, or point ingest at the folder that holds the documents",
    )


def _printable(rel: str) -> str:
    """``rel`` as valid text: a file name that is not UTF-8 keeps its odd bytes as \\x escapes."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")
    return rel
