"""The ``[ingest]`` recipe table: which files of the source folder become documents, and how.

Loads without pyarrow (``pipeline.ingest`` and ``pipeline.readers`` need it), so a recipe is
checked before any stage runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import check
from pipeline.globs import glob_regex

# Suffix (lower case) -> format name: what pipeline.readers reads (it imports this table).
FORMATS: dict[str, str] = {
    ".txt": "txt",
    ".md": "md",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl.gz",
    ".ndjson.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst",
    ".ndjson.zst": "jsonl.zst",
    ".parquet": "parquet",
    ".csv": "csv",
    ".html": "html",
    ".htm": "html",
}
_COMPRESSED = (".gz", ".zst", ".bz2", ".xz", ".zip", ".7z")
_SPLIT_MODES = ("file", "paragraphs", "max_chars")
# The lower bound of split_chars; why is said at the field.
_MIN_SPLIT_CHARS = 200


@dataclass(kw_only=True)
class IngestConfig:
    # Every format the appliance reads; another suffix here (".rst") is read as plain UTF-8 text.
    extensions: list[str] = field(default_factory=lambda: list(FORMATS))
    # Everything under the source folder; narrow it ("docs/**", "**/*.md") rather than moving files.
    include: list[str] = field(default_factory=lambda: ["**"])
    # Nothing by default: what is not wanted is better removed from the folder, where others see it.
    exclude: list[str] = field(default_factory=list)
    # "text" is the field name most JSONL corpora (and HF dataset exports) use.
    jsonl_field: str = "text"
    # Same convention as jsonl_field, for parquet exports of the same datasets.
    parquet_column: str = "text"
    # Same convention again, for spreadsheet and database exports.
    csv_column: str = "text"
    # Corpora are usually trees (one folder per team or source); flat folders work either way.
    recursive: bool = True
    # Dotfiles are editor, VCS and OS artefacts (.git, macOS "._x.txt" forks), not corpus.
    include_hidden: bool = False
    # A document over 64 MiB is almost always a misplaced dump or log, and whole-file formats
    # are held in memory while read. 0 = no limit. With ``split`` it still applies to the
    # whole file, not to each piece: the file is read whole before it is cut, so this is
    # what bounds memory (raise it for a big book or log export you mean to split).
    max_document_bytes: int = 64 << 20
    # How a whole-text file (.txt, .md, another plain-text suffix, .html after its text is
    # extracted) becomes documents. "file": one document per file, as always. A book, manual
    # or chat/log export is one file but no one document: "paragraphs" cuts at blank lines
    # and merges neighbouring paragraphs up to split_chars; "max_chars" cuts pieces of at
    # most split_chars at the best boundary (blank line, line break, sentence end, space).
    # JSONL, CSV and parquet are already one record per document: split leaves them alone.
    split: Literal["file", "paragraphs", "max_chars"] = "file"
    # About 1k tokens (English averages ~4 characters a token): a piece fits a 1024- or
    # 2048-token training window whole, with paragraphs of context around each sentence.
    # At least 200: smaller pieces are sentence fragments, which clean.min_chars and the
    # Gopher quality filter (min_doc_words = 50, ~300 characters) drop anyway, and a value
    # like 4 is a typo for 4000 that would shred the corpus.
    split_chars: int = 4000
    # Fail: a steward looks at bad data before training on the rest. Skip: big, messy corpora,
    # where every skipped item is still listed in rejects.parquet and the ledger.
    on_error: Literal["fail", "skip"] = "fail"

    def __post_init__(self) -> None:
        check(len(self.extensions) > 0, 'extensions must list at least one extension, e.g. [".txt"]')
        for ext in self.extensions:
            check(ext.startswith(".") and len(ext) > 1, f'extension {ext!r} must start with a dot, e.g. ".txt"')
            check(
                ext.lower() in FORMATS or not ext.lower().endswith(_COMPRESSED),
                f"extension {ext!r}: compressed files are read only as .jsonl.gz, .ndjson.gz, .jsonl.zst or .ndjson.zst",
            )
        check(len(self.include) > 0, 'include must list at least one glob, e.g. ["**"] for everything')
        for key, globs in (("include", self.include), ("exclude", self.exclude)):
            for glob in globs:
                check(bool(glob) and not glob.startswith("/"), f"{key} glob {glob!r} must be a path relative to the source folder")
                check(not glob.endswith("/"), f"{key} glob {glob!r} ends with '/': write {glob + '**'!r} for everything under a folder")
                try:
                    glob_regex(glob)
                except re.error as exc:
                    check(False, f"{key} glob {glob!r} is not a valid pattern ({exc})")
        check(bool(self.jsonl_field), "jsonl_field must not be empty")
        check(bool(self.parquet_column), "parquet_column must not be empty")
        check(bool(self.csv_column), "csv_column must not be empty")
        check(self.max_document_bytes >= 0, "max_document_bytes must be >= 0 (0 = no limit)")
        check(self.on_error in ("fail", "skip"), f'on_error is {self.on_error!r}: use "fail" or "skip"')
        check(self.split in _SPLIT_MODES, f'split is {self.split!r}: use "file", "paragraphs" or "max_chars"')
        check(
            type(self.split_chars) is int and self.split_chars >= _MIN_SPLIT_CHARS,
            f"split_chars must be an integer >= {_MIN_SPLIT_CHARS} (about 1k tokens is 4000), got {self.split_chars!r}",
        )
