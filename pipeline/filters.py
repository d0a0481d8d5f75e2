"""Document quality filters: Gopher repetition, Gopher quality, C4 and FineWeb, in FineWeb's order.

The rules, their order, ratios, denominators and strict/non-strict comparisons follow the
published FineWeb pipeline (datatrove 0.10.1: ``GopherRepetitionFilter``,
``GopherQualityFilter``, ``C4QualityFilter(filter_no_terminal_punct=False)``,
``FineWebQualityFilter``), with three deliberate differences:

* Words come from a small imitation of spaCy's English tokenizer (which datatrove uses):
  the text is split at whitespace, then leading and trailing punctuation is split off and
  a few infixes are split (hyphens and ``:<>=/`` between letters, commas between letters,
  ``..``), so ``utf-8``, ``3.5``, ``sizeof(struct`` and ``--flag`` stay one word as they do
  in spaCy (``pipeline.filters_words``). On the benchmark corpus it agrees with spaCy on the
  Gopher alpha-ratio verdict for ~95 % of documents (a single regex agreed for ~91 %). The
  text is split once and shared by the filters that need words.
* Everything English-specific (stop words, policy phrases) is a recipe setting, and every
  filter can be switched off.

Rule names (``RULES``) are datatrove's without its ``gopher_`` prefixes, except where its name
misleads in a report: ``too_few_stop_words`` (its ``gopher_enough_stop_words``),
``below/above_avg_word_length``, ``below_alpha_words_ratio`` and ``dup_{n}_gram`` (its
``duplicated_{n}_n_grams``).

A threshold of 0 turns a Gopher or C4 rule off (datatrove treats 0/None the same way; for
C4 it uses -1). FineWeb's thresholds are compared literally, as datatrove does.

Degenerate input never divides by zero: an empty text is dropped by Gopher repetition as
``empty`` (as datatrove does); Gopher quality drops a text without any word as ``empty``
(datatrove would divide by zero when ``min_doc_words`` is 0); FineWeb drops a text without a
non-blank line as ``empty`` (as datatrove does). C4 keeps nothing of a text without lines, so
with ``min_num_sentences`` > 0 it is dropped as ``too_few_sentences``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter, methodcaller

# PUNCTUATION and split_words were defined here before the word rules got their own module.
from pipeline.filters_words import PUNCTUATION as PUNCTUATION
from pipeline.filters_words import TERMINAL_PUNCTUATION, TextWords, count_words
from pipeline.filters_words import split_words as split_words

# The tables live in a numpy-free module, so a recipe loads without numpy; their names stay importable from here.
from pipeline.settings.filters import _DUP_N, _TOP_N, FILTER_NAMES
from pipeline.settings.filters import RULES as RULES
from pipeline.settings.filters import C4Config as C4Config
from pipeline.settings.filters import FiltersConfig as FiltersConfig
from pipeline.settings.filters import FineWebConfig as FineWebConfig
from pipeline.settings.filters import GopherQualityConfig as GopherQualityConfig
from pipeline.settings.filters import GopherRepetitionConfig as GopherRepetitionConfig

_SENTENCE_BREAK = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+(?=\S)")
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
_BULLETS = ("•", "-")
_ELLIPSES = ("...", "…")
_starts_with_bullet = methodcaller("startswith", _BULLETS)
_ends_with_ellipsis = methodcaller("endswith", _ELLIPSES)


@dataclass(frozen=True)
class Verdict:
    # The (possibly C4-rewritten) text when kept; None when dropped.
    text: str | None
    # The filter that dropped the document (one of FILTER_NAMES); None when kept.
    filter: str | None
    # The rule that dropped it (one of RULES[filter]); None when kept.
    rule: str | None
    # Lines C4 removed from a kept document.
    lines_removed: int = 0


def count_sentences(line: str) -> int:
    """Sentences in one stripped line; never less than 1, as spaCy's span count in datatrove."""
    return len(_SENTENCE_BREAK.findall(line)) + 1


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(elements, characters) that repeat an earlier element, as datatrove's find_duplicates."""
    counts = Counter(items)
    if len(counts) == len(items):
        return 0, 0
    return len(items) - len(counts), sum(len(k) * (c - 1) for k, c in counts.items() if c > 1)


def _split_newline_runs(text: str) -> list[str]:
    """``re.split(r"\n+", text)`` by str.split (several times faster): the runs of newlines
    inside become empty parts, which are dropped; the first and last part stay even when empty."""
    parts = text.split("\n")
    if len(parts) <= 2:
        return parts
    return [parts[0], *filter(None, parts[1:-1]), parts[-1]]


def _gopher_repetition(
    text: str,
    words: TextWords,
    cfg: GopherRepetitionConfig,
    top: tuple[tuple[int, float], ...],
    dup: tuple[tuple[int, float], ...],
) -> str | None:
    if not text:
        return "empty"
    size = len(text)
    stripped = text.strip()
    # One paragraph repeats nothing (both ratios are 0, never above a threshold): skip the split.
    if "\n\n" in stripped:
        paragraphs = _PARAGRAPH_BREAK.split(stripped)
        n_dup, dup_chars = _duplicates(paragraphs)
        if cfg.dup_para_frac and n_dup / len(paragraphs) > cfg.dup_para_frac:
            return "dup_para_frac"
        if cfg.dup_para_char_frac and dup_chars / size > cfg.dup_para_char_frac:
            return "dup_para_char_frac"
    lines = _split_newline_runs(text)
    n_dup, dup_chars = _duplicates(lines)
    if cfg.dup_line_frac and n_dup / len(lines) > cfg.dup_line_frac:
        return "dup_line_frac"
    if cfg.dup_line_char_frac and dup_chars / size > cfg.dup_line_char_frac:
        return "dup_line_char_frac"
    if not (top or dup):
        return None
    index = words.ngrams(tuple(n for n, _ in dup))
    n_words = words.count()
    for n, frac in top:
        if n_words >= n and index.top_ngram_chars(n, size, frac) / size > frac:
            return f"top_{n}_gram"
    if dup and n_words > _DUP_N[0]:  # fewer words hold no two 5-grams, let alone longer ones
        for n, frac in dup:
            if index.repeated_ngram_chars(n, size, frac) / size > frac:
                return f"dup_{n}_gram"
    return None


def _gopher_quality(text: str, words: TextWords, cfg: GopherQualityConfig, stop_words: frozenset[str]) -> str | None:
    stats = words.stats()
    n_words = stats.words
    n_non_symbol = stats.non_symbol
    # Symbol-only words are a subset of all words, so n_non_symbol < min_doc_words covers n_words too.
    if cfg.min_doc_words and n_non_symbol < cfg.min_doc_words:
        return "short_doc"
    if cfg.max_doc_words and n_non_symbol > cfg.max_doc_words:
        return "long_doc"
    if n_words == 0:
        return "empty"
    # Without any non-symbol word datatrove's mean is NaN and both comparisons are false.
    if n_non_symbol:
        avg = stats.non_symbol_chars / n_non_symbol
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
        if bullets and sum(map(_starts_with_bullet, map(str.lstrip, lines))) / len(lines) > bullets:
            return "too_many_bullets"
        ellipses = cfg.max_ellipsis_lines_ratio
        if ellipses and sum(map(_ends_with_ellipsis, map(str.rstrip, lines))) / len(lines) > ellipses:
            return "too_many_end_ellipsis"
    if cfg.min_alpha_words_ratio and stats.alpha / n_words < cfg.min_alpha_words_ratio:
        return "below_alpha_words_ratio"
    if cfg.min_stop_words and words.distinct_of(stop_words) < cfg.min_stop_words:
        return "too_few_stop_words"
    return None


def _c4(text: str, cfg: C4Config, policy: re.Pattern[str] | None) -> tuple[str | None, str, int, list[str], list[str]]:
    """(rule that dropped the page or None, kept text, lines removed, chunks lost, chunks gained).

    The whitespace-separated chunks of the kept text are those of the text less the chunks
    lost (removed lines, lines before their citations went) plus those gained (the same
    lines after), so FineWeb can count the kept words without splitting the kept text again.
    """
    lines = text.splitlines()
    kept: list[str] = []
    lost: list[str] = []
    gained: list[str] = []
    sentences = 0
    max_len = cfg.max_word_length
    for line in lines:
        line = line.strip()
        words = line.split()
        # A line no longer than the limit cannot hold a longer word.
        if max_len and len(line) > max_len and any(len(word) > max_len for word in words):
            lost += words
            continue
        cited = line
        if cfg.remove_citations and "[" in line:
            line = _CITATION.sub("", line)
        if cfg.filter_no_terminal_punct and (not line.endswith(_C4_END_PUNCTUATION) or line.endswith("...")):
            lost += words
            continue
        if len(words) < cfg.min_words_per_line:
            lost += words
            continue
        lower = line.lower()
        if cfg.filter_lorem_ipsum and "lorem ipsum" in lower:
            return "lorem_ipsum", "", 0, [], []
        if cfg.filter_javascript_lines and "javascript" in lower:
            lost += words
            continue
        if cfg.filter_curly_bracket and "{" in line:
            return "curly_bracket", "", 0, [], []
        if policy is not None and policy.search(lower):
            lost += words
            continue
        # Only "at least min_num_sentences" matters, so counting stops once it is reached.
        if sentences < cfg.min_num_sentences:
            sentences += count_sentences(line)
        if line is not cited:
            lost += words
            gained += line.split()
        kept.append(line)
    if sentences < cfg.min_num_sentences:
        return "too_few_sentences", "", 0, [], []
    return None, "\n".join(kept).strip(), len(lines) - len(kept), lost, gained


def _fineweb(text: str, n_words: int, cfg: FineWebConfig) -> str | None:
    parts = text.split("\n")
    lines = list(compress(parts, map(str.strip, parts)))
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
    if newlines / n_words > cfg.new_line_ratio:
        return "list_ratio"
    return None


class FilterChain:
    """The enabled filters of a ``FiltersConfig``, run in FineWeb's order; the first drop wins."""

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
        words = TextWords(text)
        if cfg.gopher_repetition.enabled:
            rule = _gopher_repetition(text, words, cfg.gopher_repetition, self._top, self._dup)
            if rule:
                return Verdict(text=None, filter="gopher_repetition", rule=rule)
        if cfg.gopher_quality.enabled:
            rule = _gopher_quality(text, words, cfg.gopher_quality, self._stop_words)
            if rule:
                return Verdict(text=None, filter="gopher_quality", rule=rule)
        removed = 0
        lost: list[str] = []
        gained: list[str] = []
        if cfg.c4.enabled:
            rule, kept, removed, lost, gained = _c4(text, cfg.c4, self._policy)
            if rule:
                return Verdict(text=None, filter="c4", rule=rule)
            text = kept
        if cfg.fineweb.enabled:
            n_words = words.count() - count_words(lost) + count_words(gained)
            rule = _fineweb(text, n_words, cfg.fineweb)
            if rule:
                return Verdict(text=None, filter="fineweb", rule=rule)
        return Verdict(text=text, filter=None, rule=None, lines_removed=removed)
