"""The ``[filters.*]`` recipe tables: Gopher repetition, Gopher quality, C4 and FineWeb.

Loads without numpy (``pipeline.filters``, which applies them, needs it), so a recipe is
checked without it; their names stay importable from ``pipeline.filters``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import check

FILTER_NAMES: tuple[str, ...] = ("gopher_repetition", "gopher_quality", "c4", "fineweb")

# n of the top-n-gram rules (list position 0, 1, 2) and of the duplicated-n-gram rules (0..5).
_TOP_N = (2, 3, 4)
_DUP_N = (5, 6, 7, 8, 9, 10)

# Stable names: each one becomes a dataset-card column and a ledger field.
RULES: dict[str, tuple[str, ...]] = {
    "gopher_repetition": (
        "empty",
        "dup_para_frac",
        "dup_para_char_frac",
        "dup_line_frac",
        "dup_line_char_frac",
        *(f"top_{n}_gram" for n in _TOP_N),
        *(f"dup_{n}_gram" for n in _DUP_N),
    ),
    "gopher_quality": (
        "short_doc",
        "long_doc",
        "empty",
        "below_avg_word_length",
        "above_avg_word_length",
        "too_many_hashes",
        "too_many_ellipsis",
        "too_many_bullets",
        "too_many_end_ellipsis",
        "below_alpha_words_ratio",
        "too_few_stop_words",
    ),
    "c4": ("lorem_ipsum", "curly_bracket", "too_few_sentences"),
    "fineweb": ("empty", "line_punct_ratio", "short_line_ratio", "char_dup_ratio", "list_ratio"),
}


@dataclass(kw_only=True)
class GopherRepetitionConfig:
    # Machine-made pages (link farms, templated lists) repeat themselves; real prose rarely does.
    enabled: bool = True
    # Gopher table A1: at most 30 % of the lines may be copies of an earlier line.
    dup_line_frac: float = 0.3
    # Gopher table A1: at most 30 % of the paragraphs may be copies of an earlier one.
    dup_para_frac: float = 0.3
    # Gopher table A1: duplicated lines may hold at most 20 % of the characters.
    dup_line_char_frac: float = 0.2
    # Gopher table A1: duplicated paragraphs may hold at most 20 % of the characters.
    dup_para_char_frac: float = 0.2
    # Gopher table A1, n = 2, 3, 4: the most frequent n-gram may cover at most this share of
    # the characters (0 or a shorter list turns an n off).
    top_ngram_max_fractions: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    # Gopher table A1, n = 5..10: n-grams seen before may cover at most this share of the
    # characters (0 or a shorter list turns an n off).
    dup_ngram_max_fractions: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])

    def __post_init__(self) -> None:
        for name in ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"{name} must be between 0 and 1 (0 = off), got {value}")
        _check_fractions("top_ngram_max_fractions", self.top_ngram_max_fractions, _TOP_N)
        _check_fractions("dup_ngram_max_fractions", self.dup_ngram_max_fractions, _DUP_N)


@dataclass(kw_only=True)
class GopherQualityConfig:
    # Gopher's heuristics reject boilerplate, tables of numbers and non-prose pages.
    enabled: bool = True
    # Gopher: fewer than 50 words is a fragment, not a document (0 = off).
    min_doc_words: int = 50
    # Gopher: more than 100 000 words is almost always a dump or a log (0 = off).
    max_doc_words: int = 100_000
    # Gopher: a mean word length under 3 characters means symbols, codes or broken text (0 = off).
    min_avg_word_length: float = 3.0
    # Gopher: over 10 characters means URLs, hashes or text without spaces (0 = off).
    max_avg_word_length: float = 10.0
    # Gopher: more '#' or ellipses than 1 per 10 words is hashtag spam or teasers (0 = off).
    max_symbol_word_ratio: float = 0.1
    # Gopher: a page of which over 90 % of the lines are bullets is a menu or a list (0 = off).
    max_bullet_lines_ratio: float = 0.9
    # Gopher: over 30 % of lines cut short with an ellipsis means truncated snippets (0 = off).
    max_ellipsis_lines_ratio: float = 0.3
    # Gopher: at least 80 % of the words must contain a letter (0 = off).
    min_alpha_words_ratio: float = 0.8
    # Gopher: real English prose uses at least 2 of the stop words below; set 0 for other languages.
    min_stop_words: int = 2
    # Gopher's English stop words, matched case-sensitively as whole words, as datatrove does.
    stop_words: list[str] = field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])

    def __post_init__(self) -> None:
        check(self.min_doc_words >= 0, f"min_doc_words must be >= 0 (0 = off), got {self.min_doc_words}")
        check(self.max_doc_words >= 0, f"max_doc_words must be >= 0 (0 = off), got {self.max_doc_words}")
        check(
            self.max_doc_words == 0 or self.max_doc_words >= self.min_doc_words,
            f"max_doc_words ({self.max_doc_words}) must be 0 or at least min_doc_words ({self.min_doc_words})",
        )
        check(self.min_avg_word_length >= 0, f"min_avg_word_length must be >= 0, got {self.min_avg_word_length}")
        check(self.max_avg_word_length >= 0, f"max_avg_word_length must be >= 0, got {self.max_avg_word_length}")
        check(
            self.max_avg_word_length == 0 or self.max_avg_word_length >= self.min_avg_word_length,
            f"max_avg_word_length ({self.max_avg_word_length}) must be 0 or at least min_avg_word_length ({self.min_avg_word_length})",
        )
        for name in (
            "max_symbol_word_ratio",
            "max_bullet_lines_ratio",
            "max_ellipsis_lines_ratio",
            "min_alpha_words_ratio",
        ):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"{name} must be between 0 and 1 (0 = off), got {value}")
        check(all(w and not w.isspace() for w in self.stop_words), "stop_words must not contain empty words")
        distinct = len(set(self.stop_words))
        check(
            0 <= self.min_stop_words <= distinct,
            f"min_stop_words must be between 0 and the {distinct} distinct stop_words, got {self.min_stop_words}",
        )


@dataclass(kw_only=True)
class C4Config:
    # C4's clean-up: drops boilerplate lines and pages that are code or placeholders.
    enabled: bool = True
    # C4: "lorem ipsum" marks a template that was never filled in; the whole page goes.
    filter_lorem_ipsum: bool = True
    # C4: a '{' means code or CSS/JSON on the page; the whole page goes.
    filter_curly_bracket: bool = True
    # C4: lines mentioning "javascript" are "please enable JavaScript" notices.
    filter_javascript_lines: bool = True
    # C4: cookie and terms-of-use banners repeat on every page of a site.
    filter_policy_lines: bool = True
    # datatrove's six C4 phrases, matched in the lower-cased line.
    policy_phrases: list[str] = field(
        default_factory=lambda: [
            "terms of use",
            "privacy policy",
            "cookie policy",
            "uses cookies",
            "use of cookies",
            "use cookies",
        ]
    )
    # C4: a "word" over 1000 characters is an encoded blob; its line goes (0 = off).
    max_word_length: int = 1000
    # C4: "[1]", "[edit]", "[citation needed]" are Wikipedia markup, not text.
    remove_citations: bool = True
    # Off as in FineWeb, whose ablations found it removed the most tokens of all C4 rules for little gain.
    filter_no_terminal_punct: bool = False
    # C4: lines of fewer than 3 whitespace-separated words are menus and buttons (0 = off).
    min_words_per_line: int = 3
    # C4: a page with fewer than 5 sentences left is not a document (0 = off).
    min_num_sentences: int = 5

    def __post_init__(self) -> None:
        check(self.max_word_length >= 0, f"max_word_length must be >= 0 (0 = off), got {self.max_word_length}")
        check(self.min_words_per_line >= 0, f"min_words_per_line must be >= 0 (0 = off), got {self.min_words_per_line}")
        check(self.min_num_sentences >= 0, f"min_num_sentences must be >= 0 (0 = off), got {self.min_num_sentences}")
        check(all(p.strip() for p in self.policy_phrases), "policy_phrases must not contain empty phrases")


@dataclass(kw_only=True)
class FineWebConfig:
    # FineWeb's own rules, tuned on ablations to catch list-like and repeated-line pages.
    enabled: bool = True
    # FineWeb: fewer than 12 % of lines ending in terminal punctuation means no prose.
    line_punct_thr: float = 0.12
    # FineWeb's default keeps this off: a page with no such line at all is still dropped.
    line_punct_exclude_zero: bool = False
    # FineWeb: more than 67 % short lines means a menu, a table or a list.
    short_line_thr: float = 0.67
    # FineWeb: a line of at most 30 characters counts as short.
    short_line_length: int = 30
    # FineWeb: repeated lines may hold at most 1 % of the (non-newline) characters.
    char_duplicates_ratio: float = 0.01
    # FineWeb: more than 0.3 newlines per word means one-item-per-line lists.
    new_line_ratio: float = 0.3

    def __post_init__(self) -> None:
        for name in ("line_punct_thr", "short_line_thr", "char_duplicates_ratio"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"{name} must be between 0 and 1, got {value}")
        check(self.short_line_length >= 0, f"short_line_length must be >= 0, got {self.short_line_length}")
        check(self.new_line_ratio >= 0, f"new_line_ratio must be >= 0, got {self.new_line_ratio}")


@dataclass(kw_only=True)
class FiltersConfig:
    # Gopher's repetition rules first: cheap, and they remove the most machine-made text.
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    # Gopher's quality heuristics (length, symbols, bullets, letters, stop words).
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    # C4's line clean-up; it rewrites the kept text, so it runs before FineWeb's line rules.
    c4: C4Config = field(default_factory=C4Config)
    # FineWeb's rules, on the text C4 kept.
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)


def _check_fractions(name: str, values: list[float], ns: tuple[int, ...]) -> None:
    check(len(values) <= len(ns), f"{name} has {len(values)} values; it covers n = {ns[0]}..{ns[-1]} at most")
    for n, value in zip(ns, values):
        check(0.0 <= value <= 1.0, f"{name} for n = {n} must be between 0 and 1 (0 = off), got {value}")
