"""Clean: the text normaliser and the size limits, the first step of curation.

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

Documents are then dropped if shorter than ``min_chars`` (or longer than ``max_chars``).
``pipeline.curate`` runs this, the quality filters, redaction and deduplication in worker
processes.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from pipeline.config import check

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
    # Worker processes for curation; 0 = one per core. The output is the same for any value.
    workers: int = 0
    # Dropped documents kept per (filter, rule) so a data steward can see what a rule removes.
    dropped_samples: int = 20

    def __post_init__(self) -> None:
        check(self.min_chars >= 0, "min_chars must be >= 0")
        check(self.max_chars >= 0, "max_chars must be >= 0 (0 = no limit)")
        check(self.workers >= 0, "workers must be >= 0 (0 = one per core)")
        check(self.dropped_samples >= 0, "dropped_samples must be >= 0")
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
