"""The words the quality filters count: a small imitation of spaCy's English tokenizer.

The text is split at whitespace into chunks, then leading and trailing punctuation is split
off each chunk and a few infixes are split (hyphens and ``:<>=/`` between letters, commas
between letters, ``..``), so ``utf-8``, ``3.5``, ``sizeof(struct`` and ``--flag`` stay one
word as they do in spaCy (see ``pipeline.filters`` for why).

Speed: a chunk's words depend on the chunk alone, and prose repeats a small vocabulary of
chunks ("the", "word,", "end."), so each distinct chunk is split once per process and cached
with a record per word (an id, its length, what Gopher quality asks of it). A document then
costs a dictionary lookup per chunk, in C (``map``), instead of up to five regex calls per
chunk, and its records are one numpy array that the n-gram rules and the word counts read.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections.abc import Iterator
from itertools import chain
from operator import itemgetter

import numpy as np

from pipeline.filters_ngrams import NgramIndex

# datatrove's PUNCTUATION (utils/text.py) plus the C0/C1 controls it appends.
_PUNCTUATION = "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»" + "".join(
    map(chr, (*range(0, 9), 11, 12, *range(13, 32), *range(127, 160)))
)
# datatrove's TERMINAL_PUNCTUATION: sentence-final marks of many scripts, one character each.
TERMINAL_PUNCTUATION: frozenset[str] = frozenset(
    "!.?։؝؞؟۔܀܁܂߹࠷࠹࠽࠾।॥၊။።፧፨᙮᜵᜶។៕៖៙៚᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᭽᭾᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼⹓⹔。꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？｡"
    "𐩖𐩗𐽕𐽖𐽗𐽘𐽙𐾆𐾇𐾈𐾉𑁇𑁈𑂾𑂿𑃀𑃁𑅁𑅂𑅃𑇅𑇆𑇍𑇞𑇟𑈸𑈹𑈻𑈼𑊩𑑋𑑌𑗂𑗃𑗉𑗊𑗋𑗌𑗍𑗎𑗏𑗐𑗑𑗒𑗓𑗔𑗕𑗖𑗗𑙁𑙂𑜼𑜽𑜾𑥄𑥆𑩂𑩃𑪛𑪜𑱁𑱂𑻷𑻸\U00011f43\U00011f44"
    "𖩮𖩯𖫵𖬷𖬸𖭄𖺘𛲟𝪈"
)
PUNCTUATION: frozenset[str] = frozenset(_PUNCTUATION) | TERMINAL_PUNCTUATION

# spaCy-like prefix, suffix and infix rules (a subset of spaCy's English punctuation rules).
_PREFIX = re.compile(r"""^(?:\.\.\.+|…|[§%=—–+'"“”‘’`(\[{<*$£€¥#&~¿¡«»‹›„‚])""")
_SUFFIX = re.compile(r"""(?:\.\.\.+|…|'s|'S|’s|’S|n't|N'T|[)\]}>"'“”‘’`*!?,:;%‰°»›]|(?<=[0-9])\+|(?<=[\w)\]"'%])\.)$""")
_INFIX = re.compile(
    r"""\.\.+|…|(?<=[0-9])[+\-*^](?=[0-9-])|(?<=[a-z)\]"'`])\.(?=[A-Z"'`])|(?<=[A-Za-z]),(?=[A-Za-z])"""
    r"""|(?<=[A-Za-z0-9])(?:---|--|-|–|—|~)(?=[A-Za-z])|(?<=[A-Za-z0-9])[:<>=/](?=[A-Za-z])"""
)

# Distinct chunks kept per process (~150 bytes each): prose needs far fewer to hit nearly always.
_CACHE_MAX = 1 << 18
# Per word, three int64: its id (equal ids: equal words), its length, and its flags.
_ID, _LENGTH, _FLAGS = 0, 1, 2
_ALPHA, _NON_SYMBOL = 1, 2  # flags: it contains a letter / it is not all punctuation

_words_of = itemgetter(0)
_records_of = itemgetter(1)


def _split_chunk(chunk: str) -> tuple[str, ...]:
    """The words of one whitespace-free chunk (the rules in the module docstring)."""
    if chunk.isalnum():
        return (chunk,)  # most words of prose: nothing to split off
    out: list[str] = []
    add = out.append
    suffixes: list[str] = []
    while chunk:
        m = _PREFIX.match(chunk)
        if m and m.end() < len(chunk):
            add(m.group())
            chunk = chunk[m.end() :]
            continue
        m = _SUFFIX.search(chunk)
        if m and m.start() > 0:
            suffixes.append(m.group())
            chunk = chunk[: m.start()]
            continue
        break
    start = 0
    for m in _INFIX.finditer(chunk):
        if m.start() > start:
            add(chunk[start : m.start()])
        add(m.group())
        start = m.end()
    if start < len(chunk):
        add(chunk[start:])
    out.extend(reversed(suffixes))
    return tuple(out)


class _ChunkCache(dict[str, tuple[tuple[str, ...], bytes]]):
    """chunk -> (its words, their records as int64 bytes), split on the first lookup.

    ``map(cache.__getitem__, chunks)`` is then one C-level pass per document, with Python
    only for chunks never seen. Equal word ids mean equal words (one vocabulary per cache),
    which lets the n-gram rules compare integers; bytes make a document's records one
    b"".join (a memcpy per chunk) and an np.frombuffer.
    """

    def __init__(self) -> None:
        super().__init__()
        self._vocabulary: dict[str, int] = {}
        # Two threads numbering two new words at once must not give them the same id.
        self._lock = threading.Lock()

    def __missing__(self, chunk: str) -> tuple[tuple[str, ...], bytes]:
        words = _split_chunk(chunk)
        records = array("q")
        for word in words:
            alpha = _ALPHA if any(map(str.isalpha, word)) else 0
            non_symbol = 0 if all(map(PUNCTUATION.__contains__, word)) else _NON_SYMBOL
            with self._lock:
                word_id = self._vocabulary.setdefault(word, len(self._vocabulary))
            records.extend((word_id, len(word), alpha | non_symbol))
        entry = self[chunk] = (words, records.tobytes())
        return entry


# Replaced, never cleared, when full: a reader holds its own reference, so another thread
# starting a new cache cannot empty it mid-way.
_cache = _ChunkCache()


class WordStats:
    """Gopher quality's word counts of one text."""

    __slots__ = ("words", "alpha", "non_symbol", "non_symbol_chars")

    def __init__(self, records: np.ndarray) -> None:
        flags = records[:, _FLAGS]
        non_symbol = (flags & _NON_SYMBOL).astype(bool)
        self.words = len(records)
        self.alpha = int(np.count_nonzero(flags & _ALPHA))
        self.non_symbol = int(np.count_nonzero(non_symbol))
        self.non_symbol_chars = int(records[non_symbol, _LENGTH].sum())


class TextWords:
    """The words of one text, split on first use and shared by the filters that read it."""

    __slots__ = ("text", "_chunks", "_entries", "_records", "_stats")

    def __init__(self, text: str) -> None:
        self.text = text
        self._chunks: list[str] = []
        self._entries: list[tuple[tuple[str, ...], bytes]] | None = None
        self._records: np.ndarray | None = None
        self._stats: WordStats | None = None

    def _split(self) -> list[tuple[tuple[str, ...], bytes]]:
        global _cache
        if self._entries is None:
            cache = _cache
            if len(cache) > _CACHE_MAX:
                cache = _cache = _ChunkCache()
            self._chunks = self.text.split()
            self._entries = list(map(cache.__getitem__, self._chunks))
        return self._entries

    def _words(self) -> Iterator[str]:
        return chain.from_iterable(map(_words_of, self._split()))

    def words(self) -> list[str]:
        """The word list (see the module docstring)."""
        return list(self._words())

    def records(self) -> np.ndarray:
        """One row per word: id, length, flags."""
        if self._records is None:
            data = b"".join(map(_records_of, self._split()))
            self._records = np.frombuffer(data, np.int64).reshape(-1, 3)
        return self._records

    def count(self) -> int:
        """The number of words."""
        return len(self.records())

    def stats(self) -> WordStats:
        """Gopher quality's counts of the words."""
        if self._stats is None:
            self._stats = WordStats(self.records())
        return self._stats

    def distinct_of(self, words: frozenset[str]) -> int:
        """How many of ``words`` occur in the text."""
        return len(words.intersection(self._words()))

    def ngrams(self, dup_ns: tuple[int, ...]) -> NgramIndex:
        """The words prepared for the n-gram rules (``dup_ns``: see ``NgramIndex``)."""
        records = self.records()
        # A chunk's words are consecutive slices of it, so the words concatenated are the chunks concatenated.
        return NgramIndex(records[:, _ID], records[:, _LENGTH], "".join(self._chunks), dup_ns)


def count_words(chunks: list[str]) -> int:
    """How many words the whitespace-separated ``chunks`` hold."""
    return sum(map(len, map(_words_of, map(_cache.__getitem__, chunks))))


def split_words(text: str) -> list[str]:
    """The words of ``text`` as the filters count them (see the module docstring)."""
    return TextWords(text).words()
