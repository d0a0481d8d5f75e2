"""Cutting one long text into documents: ``[ingest] split`` for the whole-file formats.

A book, a manual or a chat export read as one document is one training example far longer
than any context window, and deduplication and the quality filters judge it as one unit:
one bad page drops the whole book. ``paragraphs`` cuts the text at blank lines and merges
consecutive paragraphs up to ``limit`` characters; a paragraph longer than that is cut as
``max_chars`` cuts. ``max_chars`` cuts pieces of at most ``limit`` characters, each at the
best boundary inside it: the last blank line, else the last line break, else the last
sentence end (". ", "! ", "? ", or "。", "！", "？" in text without spaces), else the last
whitespace, else a hard cut.

What is guaranteed (``tests/test_ingest_split.py`` checks it):

- The pieces are, in order, non-overlapping slices ``text[start:end]`` of the text, and
  what lies before, between and after them is whitespace only. Nothing but whitespace at
  the cuts is lost or repeated: joining the pieces with the whitespace that separated them
  gives back the text exactly.
- A piece is at most ``limit`` characters, never empty or whitespace only and never ends
  with whitespace. It begins at its first non-space character, except that a piece that
  starts a line keeps the spaces and tabs indenting it (markdown code blocks).
- The pieces depend only on the text, the mode and the limit.

Pyarrow-free and small, so it can be tested (and reused) on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# One or more blank (empty or whitespace-only) lines: the paragraph break of plain text,
# markdown and of pipeline.html_text's output.
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")
# A greedy ``(?s:.*)`` first makes the match back off from the end of the window, so one
# scan in C finds the *last* boundary of a kind (Python has no reverse search).
_LAST_BLANK_LINE = re.compile(r"(?s:.*)(\n)[^\S\n]*\n")
# A full stop needs the space after it ("3.14", "e.g.x" are not sentence ends); CJK text has
# no spaces, so its full-width stops count alone.
_LAST_SENTENCE_END = re.compile(r"(?s:.*)(?:[.!?](?=\s)|[。！？](?=[\s\S]))")
_LAST_SPACE = re.compile(r"(?s:.*)(\s)")
_NOT_SPACE = re.compile(r"\S")


def split_spans(text: str, mode: str, limit: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each piece of ``text``, in order (``mode`` "paragraphs" or "max_chars")."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if mode == "paragraphs":
        return _paragraphs(text, limit)
    if mode == "max_chars":
        return _cut(text, 0, len(text), limit)
    raise ValueError(f"unknown split mode {mode!r}")


def split_text(text: str, mode: str, limit: int) -> Iterator[str]:
    """The pieces of ``text`` themselves (see ``split_spans``)."""
    for start, end in split_spans(text, mode, limit):
        yield text[start:end]


def _paragraphs(text: str, limit: int) -> Iterator[tuple[int, int]]:
    group: tuple[int, int] | None = None
    for start, end in _paragraph_spans(text):
        if end - start > limit:
            # Alone: merging the tail of a cut paragraph with the next one would blur where it ended.
            if group is not None:
                yield group
                group = None
            yield from _cut(text, start, end, limit)
        elif group is not None and end - group[0] <= limit:
            group = (group[0], end)  # the blank lines between stay in the piece, as written
        else:
            if group is not None:
                yield group
            group = (start, end)
    if group is not None:
        yield group


def _paragraph_spans(text: str) -> Iterator[tuple[int, int]]:
    """Each paragraph, its surrounding whitespace trimmed (whitespace-only ones left out)."""
    pos = 0
    for match in _BLANK_LINES.finditer(text):
        yield from _trimmed(text, pos, match.start())
        pos = match.end()
    yield from _trimmed(text, pos, len(text))


def _trimmed(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    start = _piece_start(text, start, end)
    end = _piece_end(text, start, end)
    if end > start:
        yield start, end


def _cut(text: str, start: int, end: int, limit: int) -> Iterator[tuple[int, int]]:
    """Pieces of at most ``limit`` characters covering ``text[start:end]``, each cut at its best boundary."""
    start = _piece_start(text, start, end)
    while start < end:
        cut = end if end - start <= limit else _boundary(text, start, limit)
        stop = _piece_end(text, start, cut)
        if stop > start:  # a piece of indentation alone (before a cut at a space) is no document
            yield start, stop
        start = _piece_start(text, cut, end)


def _boundary(text: str, start: int, limit: int) -> int:
    """Where the piece starting at ``start`` ends: ``start < cut <= start + limit``.

    The caller guarantees ``text`` goes on past ``start + limit``, so the window may include
    the character just after the limit: a separator there still ends a full-size piece.
    """
    # From start + 1: a boundary at the very start would give an empty piece and no progress.
    window = start + limit + 1
    match = _LAST_BLANK_LINE.match(text, start + 1, window)
    if match:
        return match.start(1)
    newline = text.rfind("\n", start + 1, window)
    if newline >= 0:
        return newline
    match = _LAST_SENTENCE_END.match(text, start + 1, window)
    if match:
        return match.end()
    match = _LAST_SPACE.match(text, start + 1, window)
    if match:
        return match.start(1)
    return start + limit


def _piece_start(text: str, pos: int, end: int) -> int:
    """Where the next piece begins at or after ``pos``: at its first non-space character, or
    at the spaces and tabs before it when they indent a line. ``end`` when only whitespace is left."""
    match = _NOT_SPACE.search(text, pos, end)
    if match is None:
        return end
    first = match.start()
    # Never before pos (the cut): indentation is only what the last piece did not take.
    indent = pos + len(text[pos:first].rstrip(" \t"))
    if indent == 0 or text[indent - 1] == "\n":
        return indent
    return first


def _piece_end(text: str, start: int, end: int) -> int:
    """``end`` moved back over trailing whitespace (and ``start`` for whitespace only)."""
    return start + len(text[start:end].rstrip())
