"""Path globs for the ingest stage's ``include`` / ``exclude``: ``*``, ``?``, ``[...]`` and ``**``.

Torch- and pyarrow-free, because the ``[ingest]`` recipe table validates its globs when a
recipe loads.
"""

from __future__ import annotations

import re


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A compiled regex that fully matches the POSIX relative paths ``pattern`` selects.

    ``*`` and ``?`` never match ``/``; a ``**`` segment matches any number of folders
    (``**/x`` also matches a top-level ``x``; a final ``**`` matches everything below);
    ``[abc]`` and ``[!abc]`` are character classes.
    """
    parts = pattern.split("/")
    out: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:.*/)?")
        else:
            out.append(_segment_regex(part) + ("" if last else "/"))
    return re.compile("".join(out), re.DOTALL)


def _segment_regex(part: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(part):
        c = part[i]
        if c == "*":
            while i + 1 < len(part) and part[i + 1] == "*":
                i += 1
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (close := _class_end(part, i)) > 0:
            negate = part[i + 1] in "!^"
            body = part[i + 2 if negate else i + 1 : close]
            escaped = "".join("\\" + ch if ch in "\\^[]" else ch for ch in body)
            out.append(f"[^/{escaped}]" if negate else f"(?!/)[{escaped}]")
            i = close
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _class_end(part: str, start: int) -> int:
    """Index of the ``]`` closing the class opened at ``start`` (-1: none, so ``[`` is literal).

    As in POSIX globs, a ``]`` right after ``[`` or ``[!`` belongs to the class.
    """
    first = start + 1
    if part[first : first + 1] in ("!", "^"):
        first += 1
    return part.find("]", first + 1)
