"""Clean: ``raw.parquet`` -> ``dataset.parquet``, normalised, filtered and exact-deduplicated.

``clean_text`` is the normaliser; its steps run in an order that makes it idempotent
(clean(clean(x)) == clean(x), checked by a property test):

1. ``\\r\\n`` and lone ``\\r`` become ``\\n``.
2. Control characters (Unicode Cc) other than ``\\n`` and ``\\t`` are removed — before
   normalising, because a control character between a letter and a combining mark blocks
   composition, and removing it afterwards would leave un-normalised text.
3. Unicode normalisation (NFC by default).
4. Per line: trailing spaces/tabs removed; runs of 2+ spaces/tabs after the first
   non-blank character become one space (leading indentation is kept: code in docs).
5. Three or more newlines (two or more blank lines) become one blank line; blank lines at
   the start and end of the document are removed.

Documents are then dropped if shorter than ``min_chars`` (or longer than ``max_chars``),
and exact duplicates (same sha256 of the cleaned text) are dropped, keeping the first by
doc_id. The output is byte-identical on a re-run (fixed parquet options, no timestamps).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from keys.errors import DataError
from pipeline.config import check
from pipeline.ingest import ParquetSink, iter_rows, open_parquet
from pipeline.result import ProgressFn, StageResult, no_progress

DATASET_SCHEMA = pa.schema(
    [("doc_id", pa.int64()), ("source", pa.string()), ("text", pa.string()), ("sha256", pa.string())]
)

# Unicode category Cc except \t and \n (\r is turned into \n before this runs).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
# A run inside a line: preceded by a non-blank character on the same line, so indentation is never touched.
_INNER_RUN = re.compile(r"(?<=[^ \t\n])[ \t]{2,}")
_BLANK_RUN = re.compile(r"\n{3,}")


@dataclass(kw_only=True)
class CleanConfig:
    # NFC merges "e" + combining accent into "é" without changing meaning; NFKC would also
    # fold "²" to "2" or "ﬁ" to "fi" — a choice for the data steward, not a default.
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    # Shorter fragments (page numbers, "OK", stray headings) teach little and waste context.
    min_chars: int = 32
    # Off by default: long documents are usually the valuable ones; set it to drop dumps/logs.
    max_chars: int = 0
    # Control characters are invisible, break tokenizers and are never meant as content.
    strip_control: bool = True
    # Runs of spaces inside a line are almost always layout (justified text, aligned tables).
    collapse_whitespace: bool = True
    # Duplicated documents make a small model memorise them and leak into validation.
    dedup_exact: bool = True

    def __post_init__(self) -> None:
        check(self.min_chars >= 0, "min_chars must be >= 0")
        check(self.max_chars >= 0, "max_chars must be >= 0 (0 = no limit)")
        check(
            self.max_chars == 0 or self.max_chars >= self.min_chars,
            f"max_chars ({self.max_chars}) must be 0 or at least min_chars ({self.min_chars})",
        )


def clean_text(text: str, cfg: CleanConfig) -> str:
    """The normalised form of one document (see the module docstring for the rules)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.strip_control:
        text = _CONTROL.sub("", text)
    if cfg.normalization != "none":
        text = unicodedata.normalize(cfg.normalization, text)
    text = _TRAILING.sub("", text)
    if cfg.collapse_whitespace:
        text = _INNER_RUN.sub(" ", text)
    text = _BLANK_RUN.sub("\n\n", text)
    return text.strip("\n")


def run_clean(raw_parquet: Path, out_dir: Path, cfg: CleanConfig, progress: ProgressFn = no_progress) -> StageResult:
    """Clean, filter and deduplicate the ingest stage's ``raw.parquet`` into ``out_dir/dataset.parquet``."""
    raw_parquet, out_dir = Path(raw_parquet), Path(out_dir)
    hint = "point at the ingest stage's raw.parquet (re-run ingest if it is damaged)"
    pf = open_parquet(raw_parquet, ["doc_id", "source", "text"], hint)
    total = pf.metadata.num_rows
    seen: set[bytes] = set()
    stats: dict[str, Any] = dict.fromkeys(
        ("documents_in", "documents_out", "dropped_short", "dropped_long", "dropped_duplicate", "chars_out", "bytes_out"), 0
    )
    last_id: int | None = None
    out = out_dir / "dataset.parquet"
    with ParquetSink(out, DATASET_SCHEMA) as sink:
        for rows in iter_rows(pf, ["doc_id", "source", "text"]):
            for doc_id, source, raw in zip(rows["doc_id"], rows["source"], rows["text"]):
                # "First occurrence" must mean lowest doc_id, so the order is checked, not assumed.
                if doc_id is None or raw is None or (last_id is not None and doc_id <= last_id):
                    raise DataError(
                        f"{raw_parquet} row {stats['documents_in']}: doc_id {doc_id!r} is null, repeated or out of order",
                        hint,
                    )
                last_id = doc_id
                stats["documents_in"] += 1
                text = clean_text(raw, cfg)
                if len(text) < cfg.min_chars:
                    stats["dropped_short"] += 1
                    continue
                if cfg.max_chars and len(text) > cfg.max_chars:
                    stats["dropped_long"] += 1
                    continue
                data = text.encode("utf-8")
                digest = hashlib.sha256(data).digest()
                if cfg.dedup_exact:
                    if digest in seen:
                        stats["dropped_duplicate"] += 1
                        continue
                    seen.add(digest)
                sink.add(doc_id=doc_id, source=source, text=text, sha256=digest.hex())
                stats["documents_out"] += 1
                stats["chars_out"] += len(text)
                stats["bytes_out"] += len(data)
            progress(stats["documents_in"], total, {"documents_out": stats["documents_out"]})
        if stats["documents_out"] == 0:
            # An empty dataset would only fail later, in the tokenizer, further from the cause.
            raise DataError(
                f"no documents left after cleaning {raw_parquet}: {stats['documents_in']} in, "
                f"{stats['dropped_short']} shorter than clean.min_chars = {cfg.min_chars}, "
                f"{stats['dropped_long']} longer than clean.max_chars = {cfg.max_chars}",
                "lower clean.min_chars / raise clean.max_chars, or add documents to the source folder",
            )
    return StageResult(
        outputs={"dataset": out},
        stats=stats,
    )
