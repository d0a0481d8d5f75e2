"""Frozen copy of pipeline/filters.py's filter implementation as of commit 2dc18da (issue 17, part 3).

The oracle for the faster filters: tests/test_filters_speed.py checks that the product chain
gives the same verdict as this one, document by document, and bench/bench_filters.py measures
both in the same run. Do not edit it to match a change in pipeline/filters.py: a verdict
that differs from this copy is a behaviour change, and must be made (and reviewed) as one.
Only the config dataclasses and Verdict are shared with the product module. ``corpus_documents``
(at the end) is the document list the test and the benchmark share.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import accumulate, compress
from operator import itemgetter, ne
from pathlib import Path

from pipeline.filters import (
    FILTER_NAMES,
    C4Config,
    FiltersConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    Verdict,
)
from pipeline.text_split import split_text

_TOP_N = (2, 3, 4)
_DUP_N = (5, 6, 7, 8, 9, 10)

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
_SENTENCE_BREAK = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+(?=\S)")
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAK = re.compile(r"\n+")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
_BULLETS = ("•", "-")
_ELLIPSES = ("...", "…")

_ALPHA, _NON_SYMBOL = 1, 2
# Per-token classification, shared across documents: most tokens are common words.
_FLAGS: dict[str, int] = {}
_FLAGS_MAX = 1 << 20


def split_words(text: str) -> list[str]:
    """The words of ``text`` as the filters count them (see the module docstring)."""
    out: list[str] = []
    add = out.append
    for chunk in text.split():
        if chunk.isalnum():
            add(chunk)  # most words of prose: nothing to split off
            continue
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
    return out


def count_sentences(line: str) -> int:
    """Sentences in one stripped line; never less than 1, as spaCy's span count in datatrove."""
    return len(_SENTENCE_BREAK.findall(line)) + 1


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(elements, characters) that repeat an earlier element, as datatrove's find_duplicates."""
    counts = Counter(items)
    if len(counts) == len(items):
        return 0, 0
    return len(items) - len(counts), sum(len(k) * (c - 1) for k, c in counts.items() if c > 1)


def _word_flags(word: str) -> int:
    flags = _FLAGS.get(word)
    if flags is None:
        flags = (_ALPHA if any(map(str.isalpha, word)) else 0) | (0 if all(map(PUNCTUATION.__contains__, word)) else _NON_SYMBOL)
        if len(_FLAGS) >= _FLAGS_MAX:
            _FLAGS.clear()
        _FLAGS[word] = flags
    return flags


def _repeated_ngram_chars(cat: str, cum: list[int], n: int, size: int, frac: float) -> int:
    """datatrove's find_all_duplicate on the words concatenated (no separator) in ``cat``.

    datatrove walks the n-grams left to right: one seen before (at a walked position) adds its
    length and the walk jumps n words ahead; otherwise it is remembered and the walk moves one
    word on. Here only the positions whose n-gram occurred earlier at all ("candidates") are
    visited in Python; every other position is new by construction, remembered unless a jump
    skipped it. ``cum`` holds the word offsets in ``cat``. Returns as soon as the total alone
    exceeds ``frac`` of ``size`` (the caller's test, so the verdict is the same).
    """
    keys = list(map(cat.__getitem__, map(slice, cum, cum[n:])))
    m = len(keys)
    first = dict(zip(reversed(keys), range(m - 1, -1, -1)))
    if len(first) == m:
        return 0
    firsts = list(map(first.__getitem__, keys))
    candidates = compress(range(m), map(ne, firsts, range(m)))
    # Keys whose first occurrence a jump skipped, and keys remembered at a candidate position.
    skipped_first: set[str] = set()
    remembered: set[str] = set()
    repeated = 0
    walk_from = 0
    for pos in candidates:
        if pos < walk_from:
            continue
        key = keys[pos]
        if key in remembered or key not in skipped_first:
            repeated += len(key)
            if repeated / size > frac:
                return repeated
            walk_from = pos + n
            for skipped in range(pos + 1, min(walk_from, m)):
                if firsts[skipped] == skipped:
                    skipped_first.add(keys[skipped])
        else:
            remembered.add(key)
    return repeated


class _Words:
    """The words of one text, split on first use and shared by the filters that read it."""

    __slots__ = ("text", "_words")

    def __init__(self, text: str) -> None:
        self.text = text
        self._words: list[str] | None = None

    def get(self) -> list[str]:
        if self._words is None:
            self._words = split_words(self.text)
        return self._words


def _gopher_repetition(
    text: str,
    words: _Words,
    cfg: GopherRepetitionConfig,
    top: tuple[tuple[int, float], ...],
    dup: tuple[tuple[int, float], ...],
) -> str | None:
    if not text:
        return "empty"
    size = len(text)
    paragraphs = _PARAGRAPH_BREAK.split(text.strip())
    n_dup, dup_chars = _duplicates(paragraphs)
    if cfg.dup_para_frac and n_dup / len(paragraphs) > cfg.dup_para_frac:
        return "dup_para_frac"
    if cfg.dup_para_char_frac and dup_chars / size > cfg.dup_para_char_frac:
        return "dup_para_char_frac"
    lines = _LINE_BREAK.split(text)
    n_dup, dup_chars = _duplicates(lines)
    if cfg.dup_line_frac and n_dup / len(lines) > cfg.dup_line_frac:
        return "dup_line_frac"
    if cfg.dup_line_char_frac and dup_chars / size > cfg.dup_line_char_frac:
        return "dup_line_char_frac"
    if not (top or dup):
        return None
    w = words.get()
    if top:
        for n, frac in top:
            if len(w) < n:
                continue
            # Words hold no whitespace, so equal word tuples are exactly equal " ".join n-grams;
            # most_common keeps the first-seen n-gram among ties, as datatrove's does.
            ngram, count = Counter(zip(*(w[i:] for i in range(n)))).most_common(1)[0]
            if (sum(map(len, ngram)) + n - 1) * count / size > frac:
                return f"top_{n}_gram"
    if dup:
        # Word i spans cum[i]:cum[i+1] of the concatenation, so each n-gram is one slice.
        cum = list(accumulate(map(len, w), initial=0))
        cat = "".join(w)
        for n, frac in dup:
            if _repeated_ngram_chars(cat, cum, n, size, frac) / size > frac:
                return f"dup_{n}_gram"
    return None


def _gopher_quality(text: str, words: _Words, cfg: GopherQualityConfig, stop_words: frozenset[str]) -> str | None:
    w = words.get()
    n_words = len(w)
    # Symbol-only words are a subset of all words: too few words settles it without counting.
    if cfg.min_doc_words and n_words < cfg.min_doc_words:
        return "short_doc"
    counts = Counter(w)
    n_non_symbol = non_symbol_chars = n_alpha = 0
    for word, count in counts.items():
        flags = _word_flags(word)
        if flags & _NON_SYMBOL:
            n_non_symbol += count
            non_symbol_chars += count * len(word)
        if flags & _ALPHA:
            n_alpha += count
    if cfg.min_doc_words and n_non_symbol < cfg.min_doc_words:
        return "short_doc"
    if cfg.max_doc_words and n_non_symbol > cfg.max_doc_words:
        return "long_doc"
    if n_words == 0:
        return "empty"
    # Without any non-symbol word datatrove's mean is NaN and both comparisons are false.
    if n_non_symbol:
        avg = non_symbol_chars / n_non_symbol
        if cfg.min_avg_word_length and avg < cfg.min_avg_word_length:
            return "below_avg_word_length"
        if cfg.max_avg_word_length and avg > cfg.max_avg_word_length:
            return "above_avg_word_length"
    ratio = cfg.max_symbol_word_ratio
    if ratio and text.count("#") / n_words > ratio:
        return "too_many_hashes"
    if ratio and (text.count("...") + text.count("…")) / n_words > ratio:
        return "too_many_ellipsis"
    if cfg.max_bullet_lines_ratio or cfg.max_ellipsis_lines_ratio:
        lines = text.splitlines()
        bullets = cfg.max_bullet_lines_ratio
        if bullets and sum(1 for line in lines if line.lstrip().startswith(_BULLETS)) / len(lines) > bullets:
            return "too_many_bullets"
        ellipses = cfg.max_ellipsis_lines_ratio
        if ellipses and sum(1 for line in lines if line.rstrip().endswith(_ELLIPSES)) / len(lines) > ellipses:
            return "too_many_end_ellipsis"
    if cfg.min_alpha_words_ratio and n_alpha / n_words < cfg.min_alpha_words_ratio:
        return "below_alpha_words_ratio"
    if cfg.min_stop_words and len(stop_words.intersection(counts)) < cfg.min_stop_words:
        return "too_few_stop_words"
    return None


def _c4(text: str, cfg: C4Config, policy: re.Pattern[str] | None) -> tuple[str | None, str, int]:
    """(rule that dropped the page or None, kept text, lines removed)."""
    lines = text.splitlines()
    kept: list[str] = []
    sentences = 0
    max_len = cfg.max_word_length
    for line in lines:
        line = line.strip()
        words = line.split()
        # A line no longer than the limit cannot hold a longer word.
        if max_len and len(line) > max_len and any(len(word) > max_len for word in words):
            continue
        if cfg.remove_citations and "[" in line:
            line = _CITATION.sub("", line)
        if cfg.filter_no_terminal_punct and (not line.endswith(_C4_END_PUNCTUATION) or line.endswith("...")):
            continue
        if len(words) < cfg.min_words_per_line:
            continue
        lower = line.lower()
        if cfg.filter_lorem_ipsum and "lorem ipsum" in lower:
            return "lorem_ipsum", "", 0
        if cfg.filter_javascript_lines and "javascript" in lower:
            continue
        if cfg.filter_curly_bracket and "{" in line:
            return "curly_bracket", "", 0
        if policy is not None and policy.search(lower):
            continue
        # Only "at least min_num_sentences" matters, so counting stops once it is reached.
        if sentences < cfg.min_num_sentences:
            sentences += count_sentences(line)
        kept.append(line)
    if sentences < cfg.min_num_sentences:
        return "too_few_sentences", "", 0
    return None, "\n".join(kept).strip(), len(lines) - len(kept)


def _fineweb(text: str, words: _Words, cfg: FineWebConfig) -> str | None:
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return "empty"
    n = len(lines)
    # Every terminal mark is one character, so endswith(marks) is a set lookup of the last one.
    ratio = sum(map(TERMINAL_PUNCTUATION.__contains__, map(itemgetter(-1), lines))) / n
    if ratio < cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
        return "line_punct_ratio"
    if sum(map(cfg.short_line_length.__ge__, map(len, lines))) / n > cfg.short_line_thr:
        return "short_line_ratio"
    newlines = text.count("\n")
    if _duplicates(lines)[1] / (len(text) - newlines) > cfg.char_duplicates_ratio:
        return "char_dup_ratio"
    # A non-blank line always yields a word, so the count is never 0 here.
    if newlines / len(words.get()) > cfg.new_line_ratio:
        return "list_ratio"
    return None


class ReferenceChain:
    """The frozen chain: same interface as ``pipeline.filters.FilterChain``."""

    def __init__(self, cfg: FiltersConfig) -> None:
        self.cfg = cfg
        rep = cfg.gopher_repetition
        self._top = tuple((n, f) for n, f in zip(_TOP_N, rep.top_ngram_max_fractions) if f > 0)
        self._dup = tuple((n, f) for n, f in zip(_DUP_N, rep.dup_ngram_max_fractions) if f > 0)
        self._stop_words = frozenset(cfg.gopher_quality.stop_words)
        # The phrases are looked for in the lower-cased line, so they must be lower case too;
        # one alternation finds any of them in a single scan.
        phrases = [re.escape(p.lower()) for p in cfg.c4.policy_phrases]
        self._policy = re.compile("|".join(phrases)) if cfg.c4.filter_policy_lines and phrases else None
        self._names = tuple(name for name in FILTER_NAMES if getattr(cfg, name).enabled)

    @property
    def names(self) -> tuple[str, ...]:
        """The enabled filters, in the order they run."""
        return self._names

    def apply(self, text: str) -> Verdict:
        """Run the enabled filters on one document; the first rule that fires drops it."""
        cfg = self.cfg
        words = _Words(text)
        if cfg.gopher_repetition.enabled:
            rule = _gopher_repetition(text, words, cfg.gopher_repetition, self._top, self._dup)
            if rule:
                return Verdict(text=None, filter="gopher_repetition", rule=rule)
        if cfg.gopher_quality.enabled:
            rule = _gopher_quality(text, words, cfg.gopher_quality, self._stop_words)
            if rule:
                return Verdict(text=None, filter="gopher_quality", rule=rule)
        removed = 0
        if cfg.c4.enabled:
            rule, kept, removed = _c4(text, cfg.c4, self._policy)
            if rule:
                return Verdict(text=None, filter="c4", rule=rule)
            if kept != text:
                text, words = kept, _Words(kept)
        if cfg.fineweb.enabled:
            rule = _fineweb(text, words, cfg.fineweb)
            if rule:
                return Verdict(text=None, filter="fineweb", rule=rule)
        return Verdict(text=text, filter=None, rule=None, lines_removed=removed)


def corpus_documents(corpus: Path, piece_chars: int = 2000) -> list[str]:
    """The documents of a stdlib docs corpus (``appliance.demo.build_stdlib_corpus``) as the
    speed test and the benchmark read them: each module's docstrings and each pydoc topic
    whole, then the same texts cut at blank lines into pieces of at most ``piece_chars``
    (as ``[ingest] split = "paragraphs"`` would), so both long and short documents occur."""
    texts = [json.loads(line)["text"] for line in (corpus / "docstrings.jsonl").read_text(encoding="utf-8").splitlines()]
    texts += [p.read_text(encoding="utf-8") for p in sorted((corpus / "topics").glob("*.txt"))]
    return texts + [piece for text in texts for piece in split_text(text, "paragraphs", piece_chars)]
