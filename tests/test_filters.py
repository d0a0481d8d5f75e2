"""Quality filters: every threshold from both sides, the rule order, C4's rewrite, configs.

Documents are built by hand so that exactly one ratio sits on the threshold (kept: the
comparisons are strict, as in datatrove) or just past it (dropped).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.config import from_mapping
from pipeline.errors import ConfigError
from pipeline.filters import (
    FILTER_NAMES,
    RULES,
    C4Config,
    FilterChain,
    FiltersConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    Verdict,
    count_sentences,
    split_words,
)

KEPT = (None, None)


def only(name: str, **overrides: Any) -> FilterChain:
    """A chain with filter ``name`` alone, built the way a recipe's [filters] table is."""
    table: dict[str, dict[str, Any]] = {n: {"enabled": n == name} for n in FILTER_NAMES}
    table[name].update(overrides)
    return FilterChain(from_mapping(FiltersConfig, table, prefix="filters"))


def outcome(chain: FilterChain, text: str) -> tuple[str | None, str | None]:
    verdict = chain.apply(text)
    return verdict.filter, verdict.rule


def words_line(n: int, *, stop: tuple[str, ...] = ("the", "and"), word: str = "word") -> str:
    """``n`` words on one line: the stop words first, then ``word`` repeated."""
    return " ".join([*stop, *[word] * (n - len(stop))])


def padded(core: str, length: int) -> str:
    """``core`` plus one filler word that occurs nowhere else, to exactly ``length`` characters."""
    return f"{core} {'z' * (length - len(core) - 1)}"


# --- Gopher quality -----------------------------------------------------------------------

GQ = only("gopher_quality")
GQ_NAME = "gopher_quality"


def test_gopher_quality_min_doc_words() -> None:
    assert outcome(GQ, words_line(50)) == KEPT
    assert outcome(GQ, words_line(49)) == (GQ_NAME, "short_doc")
    # Punctuation tokens are not words for this rule.
    assert outcome(GQ, words_line(49) + " ! ! ! !") == (GQ_NAME, "short_doc")


def test_gopher_quality_max_doc_words() -> None:
    assert outcome(GQ, words_line(100_000)) == KEPT
    assert outcome(GQ, words_line(100_001)) == (GQ_NAME, "long_doc")


def test_gopher_quality_min_avg_word_length() -> None:
    # (3 + 3 + 48 * 3) / 50 = 3.0 exactly.
    assert outcome(GQ, words_line(50, word="abc")) == KEPT
    assert outcome(GQ, words_line(49, word="abc") + " ab") == (GQ_NAME, "below_avg_word_length")


def test_gopher_quality_max_avg_word_length() -> None:
    # (3 + 3 + 47 * 10 + 24) / 50 = 10.0 exactly.
    base = words_line(49, word="abcdefghij")
    assert outcome(GQ, base + " " + "k" * 24) == KEPT
    assert outcome(GQ, base + " " + "k" * 25) == (GQ_NAME, "above_avg_word_length")


@pytest.mark.parametrize(("symbol", "rule"), [("#", "too_many_hashes"), ("…", "too_many_ellipsis"), ("...", "too_many_ellipsis")])
def test_gopher_quality_symbol_word_ratio(symbol: str, rule: str) -> None:
    # 6 symbols among 60 tokens is 0.1 exactly; 7 among 61 is over.
    def doc(k: int) -> str:
        return " ".join(["the", "and", *[f"word {symbol}"] * k, *["word"] * (51 - k), "end"])

    assert outcome(GQ, doc(6)) == KEPT
    assert outcome(GQ, doc(7)) == (GQ_NAME, rule)


def test_gopher_quality_bullet_lines() -> None:
    plain = words_line(5)
    assert outcome(GQ, "\n".join([plain, *["- word word word word word"] * 9])) == KEPT  # 9/10 = 0.9
    bullets = ["- word word word word word"] * 5 + ["  • word word word word word"] * 5
    assert outcome(GQ, "\n".join([plain, *bullets])) == (GQ_NAME, "too_many_bullets")  # 10/11


def test_gopher_quality_end_ellipsis_lines() -> None:
    def doc(k: int, mark: str = "...") -> str:
        ending = [f"word word word word word{mark}  "] * k
        return "\n".join([words_line(5), *ending, *["word word word word word"] * (9 - k)])

    assert outcome(GQ, doc(3)) == KEPT  # 3/10 = 0.3
    assert outcome(GQ, doc(4)) == (GQ_NAME, "too_many_end_ellipsis")
    assert outcome(GQ, doc(4, "…")) == (GQ_NAME, "too_many_end_ellipsis")


def test_gopher_quality_alpha_words_ratio() -> None:
    # Numbers are words (they count towards the 50) but have no letter.
    assert outcome(GQ, words_line(40) + " 1234" * 10) == KEPT  # 40/50 = 0.8
    assert outcome(GQ, words_line(39) + " 1234" * 11) == (GQ_NAME, "below_alpha_words_ratio")


def test_gopher_quality_stop_words() -> None:
    assert outcome(GQ, words_line(50, stop=("the", "and"))) == KEPT
    assert outcome(GQ, words_line(50, stop=("the", "the"))) == (GQ_NAME, "too_few_stop_words")
    # Matched case-sensitively, as datatrove does.
    assert outcome(GQ, words_line(50, stop=("the", "And"))) == (GQ_NAME, "too_few_stop_words")


GERMAN = (
    "Die Forschung an großen Sprachmodellen hat in den letzten Jahren erhebliche Fortschritte gemacht. "
    "Viele Verfahren beruhen auf riesigen Mengen von Texten aus dem Netz, die zuvor gründlich gereinigt "
    "werden müssen. Dabei entfernt man doppelte Seiten, Werbung, Menüs und andere Bestandteile, die keinen "
    "zusammenhängenden Text enthalten. Ein kleines Modell kann auf einem einzelnen Rechner trainiert werden, "
    "wenn die Daten sorgfältig ausgewählt sind. Die Ergebnisse hängen stark von der Qualität der Daten ab."
)


def test_gopher_quality_german_with_stop_words_off() -> None:
    assert outcome(GQ, GERMAN) == (GQ_NAME, "too_few_stop_words")
    assert outcome(only("gopher_quality", min_stop_words=0), GERMAN) == KEPT
    german_stop_words = {"stop_words": ["der", "die", "und", "das"], "min_stop_words": 2}
    assert outcome(only("gopher_quality", **german_stop_words), GERMAN) == KEPT


def test_gopher_quality_zero_disables_rules() -> None:
    off = only("gopher_quality", min_doc_words=0, min_stop_words=0, min_alpha_words_ratio=0)
    assert outcome(off, "1234 5678 9012") == KEPT
    assert outcome(off, "") == (GQ_NAME, "empty")
    assert outcome(off, " \n\t ") == (GQ_NAME, "empty")
    # Only symbols: no mean word length to test (NaN in datatrove), the doc goes on.
    assert outcome(off, ". , ;") == KEPT


# --- Gopher repetition --------------------------------------------------------------------

REP_OFF: dict[str, Any] = {
    "dup_line_frac": 0,
    "dup_para_frac": 0,
    "dup_line_char_frac": 0,
    "dup_para_char_frac": 0,
    "top_ngram_max_fractions": [],
    "dup_ngram_max_fractions": [],
}
GR_NAME = "gopher_repetition"


def rep_only(**rule: Any) -> FilterChain:
    return only("gopher_repetition", **{**REP_OFF, **rule})


def test_gopher_repetition_dup_para_frac() -> None:
    chain = rep_only(dup_para_frac=0.3)
    paras = [f"paragraph number {i}" for i in range(9)]
    assert outcome(chain, "\n\n".join(paras[:7] + paras[:3])) == KEPT  # 3/10
    assert outcome(chain, "\n\n\n".join(paras + paras[:4])) == (GR_NAME, "dup_para_frac")  # 4/13


def test_gopher_repetition_dup_para_char_frac() -> None:
    chain = rep_only(dup_para_char_frac=0.2)
    # A 10-character paragraph twice: 10 of 50 characters, then 10 of 49.
    assert outcome(chain, "\n\n".join(["a" * 10, "b" * 26, "a" * 10])) == KEPT
    assert outcome(chain, "\n\n".join(["a" * 10, "b" * 25, "a" * 10])) == (GR_NAME, "dup_para_char_frac")


def test_gopher_repetition_dup_line_frac() -> None:
    chain = rep_only(dup_line_frac=0.3)
    lines = [f"line number {i}" for i in range(9)]
    assert outcome(chain, "\n".join(lines[:7] + lines[:3])) == KEPT
    assert outcome(chain, "\n".join(lines + lines[:4])) == (GR_NAME, "dup_line_frac")


def test_gopher_repetition_dup_line_char_frac() -> None:
    chain = rep_only(dup_line_char_frac=0.2)
    assert outcome(chain, "\n".join(["a" * 10, "b" * 28, "a" * 10])) == KEPT  # 10/50
    assert outcome(chain, "\n".join(["a" * 10, "b" * 27, "a" * 10])) == (GR_NAME, "dup_line_char_frac")


@pytest.mark.parametrize(
    ("fractions", "n", "core", "kept_len"),
    [
        # The top n-gram occurs twice; 2 * len(n-gram) characters against the text length.
        ([0.20], 2, "xx yy xx yy", 50),  # 10 / 50 = 0.2
        ([0, 0.18], 3, "aa bb cc aa bb cc", 89),  # 16 / 89 < 0.18 < 16 / 88
        ([0, 0, 0.16], 4, "aa bb cc dd aa bb cc dd", 138),  # 22 / 138 < 0.16 < 22 / 137
    ],
)
def test_gopher_repetition_top_ngram(fractions: list[float], n: int, core: str, kept_len: int) -> None:
    chain = rep_only(top_ngram_max_fractions=fractions)
    assert outcome(chain, padded(core, kept_len)) == KEPT
    assert outcome(chain, padded(core, kept_len - 1)) == (GR_NAME, f"top_{n}_gram")


@pytest.mark.parametrize("n", [5, 6, 7, 8, 9, 10])
def test_gopher_repetition_dup_ngram(n: int) -> None:
    frac = GopherRepetitionConfig().dup_ngram_max_fractions[n - 5]
    chain = rep_only(dup_ngram_max_fractions=[0] * (n - 5) + [frac])
    # n one-letter words twice: one repeated n-gram of n characters.
    letters = "abcdefghij"[:n]
    core = " ".join(letters + letters)
    kept_len = math.ceil(n / frac - 1e-9)
    assert n / kept_len <= frac < n / (kept_len - 1)
    assert outcome(chain, padded(core, kept_len)) == KEPT
    assert outcome(chain, padded(core, kept_len - 1)) == (GR_NAME, f"dup_{n}_gram")


def test_gopher_repetition_empty_and_short() -> None:
    chain = only("gopher_repetition")
    assert outcome(chain, "") == (GR_NAME, "empty")
    # As in datatrove: a two-word text is one 2-gram covering most of the text.
    assert outcome(chain, "hello world") == (GR_NAME, "top_2_gram")


# A literal transcription of datatrove's n-gram helpers, the oracle for the fast versions.
def reference_top_chars(words: list[str], n: int) -> int:
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    top, count = Counter(grams).most_common(1)[0]
    return len(top) * count


def reference_repeated_chars(words: list[str], n: int) -> int:
    unique: set[str] = set()
    repeated, idx = 0, 0
    while idx < len(words) - n + 1:
        gram = "".join(words[idx : idx + n])
        if gram in unique:
            repeated += len(gram)
            idx += n
        else:
            unique.add(gram)
            idx += 1
    return repeated


def assert_threshold_exact(key: str, position: int, rule: str, ratio: float, text: str) -> None:
    """Kept with the threshold at the oracle's ``ratio``, dropped with it one ulp below."""

    def with_threshold(value: float) -> tuple[str | None, str | None]:
        return outcome(rep_only(**{key: [0.0] * position + [value]}), text)

    if ratio == 0:
        assert with_threshold(math.ulp(0.0)) == KEPT
    elif ratio > 1:  # overlapping top n-grams can cover more than the text; 1 is the highest threshold
        assert with_threshold(1.0) == (GR_NAME, rule)
    else:
        assert with_threshold(ratio) == KEPT
        assert with_threshold(math.nextafter(ratio, 0.0)) == (GR_NAME, rule)


# Short words from a tiny alphabet: many repeats, and concatenations that collide
# ("ab" + "a" == "a" + "ba"), which datatrove's duplicated-n-gram rule counts as equal.
ALPHABET = st.sampled_from(["a", "b", "c", "ab", "ba", "aa", "bab"])


@st.composite
def repetitive_words(draw: st.DrawFn) -> list[str]:
    """A few random chunks of words, strung together in a random order (so they repeat)."""
    chunks = draw(st.lists(st.lists(ALPHABET, min_size=1, max_size=12), min_size=1, max_size=4))
    order = draw(st.lists(st.integers(0, len(chunks) - 1), min_size=1, max_size=10))
    return [word for i in order for word in chunks[i]]


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.lists(ALPHABET, min_size=1, max_size=80), repetitive_words()))
# After the repeat at word 5 the walk jumps over the first "b c d e f"; the second is then
# new, the third a repeat.
@example("a b c d e a b c d e f x b c d e f y b c d e f".split())
# The jump skips a second "b c d e a"; the first one still counts, so the third is a repeat.
@example("a b c d e a b c d e a x y b c d e a".split())
def test_ngram_rules_match_datatrove_transcription(words: list[str]) -> None:
    text = " ".join(words)
    assert split_words(text) == words
    for position, n in enumerate((2, 3, 4)):
        if len(words) >= n:
            ratio = reference_top_chars(words, n) / len(text)
            assert_threshold_exact("top_ngram_max_fractions", position, f"top_{n}_gram", ratio, text)
    for position, n in enumerate(range(5, 11)):
        ratio = reference_repeated_chars(words, n) / len(text)
        assert_threshold_exact("dup_ngram_max_fractions", position, f"dup_{n}_gram", ratio, text)


# --- C4 -----------------------------------------------------------------------------------

SENTENCES = [
    "The river rose quickly after the storm.",
    "Farmers moved their animals to higher ground.",
    "Schools closed for three days in a row.",
    "Volunteers filled sandbags near the bridge.",
    "By Friday the water had started to fall.",
]
C4 = only("c4")


def test_c4_min_num_sentences() -> None:
    assert outcome(C4, "\n".join(SENTENCES)) == KEPT
    assert outcome(C4, "\n".join(SENTENCES[:4])) == ("c4", "too_few_sentences")
    # Sentences are counted within lines too.
    assert outcome(C4, " ".join(SENTENCES)) == KEPT
    assert outcome(only("c4", min_num_sentences=0), "") == KEPT


def test_c4_min_words_per_line_removes_lines() -> None:
    verdict = C4.apply("\n".join(["Menu", "About us", "Three words here.", *SENTENCES]))
    kept = "\n".join(["Three words here.", *SENTENCES])
    assert verdict == Verdict(text=kept, filter=None, rule=None, lines_removed=2)


def test_c4_max_word_length() -> None:
    ok, long = "See " + "x" * 1000 + " here.", "See " + "x" * 1001 + " here."
    assert C4.apply("\n".join([ok, *SENTENCES])).text == "\n".join([ok, *SENTENCES])
    verdict = C4.apply("\n".join([long, *SENTENCES]))
    assert (verdict.text, verdict.lines_removed) == ("\n".join(SENTENCES), 1)
    assert only("c4", max_word_length=0).apply("\n".join([long, *SENTENCES])).lines_removed == 0


def test_c4_citations_and_stripping() -> None:
    text = "\n".join(["  Water rose [1] fast[citation needed] today[edit].  ", *SENTENCES])
    assert C4.apply(text).text == "\n".join(["Water rose  fast today.", *SENTENCES])
    assert only("c4", remove_citations=False).apply(text).text == "\n".join(["Water rose [1] fast[citation needed] today[edit].", *SENTENCES])


def test_c4_terminal_punctuation_switch() -> None:
    lines = ["A heading without a mark", "A teaser that trails off...", 'He said "no more."', *SENTENCES]
    assert C4.apply("\n".join(lines)).lines_removed == 0  # off, as in FineWeb
    verdict = only("c4", filter_no_terminal_punct=True).apply("\n".join(lines))
    assert (verdict.text, verdict.lines_removed) == ("\n".join(lines[2:]), 2)


def test_c4_javascript_and_policy_lines() -> None:
    lines = [
        "Please enable JavaScript to view this page.",
        "This site uses Cookies to improve things.",
        "Read our Privacy Policy before you continue.",
        *SENTENCES,
    ]
    verdict = C4.apply("\n".join(lines))
    assert (verdict.text, verdict.lines_removed) == ("\n".join(SENTENCES), 3)
    switches = {"filter_javascript_lines": False, "filter_policy_lines": False}
    assert only("c4", **switches).apply("\n".join(lines)).lines_removed == 0
    german = only("c4", policy_phrases=["Datenschutz"]).apply("\n".join(["Zur Datenschutzerklärung hier.", *SENTENCES]))
    assert german.lines_removed == 1


def test_c4_whole_page_rules() -> None:
    assert outcome(C4, "\n".join([*SENTENCES, "Lorem Ipsum dolor sit amet."])) == ("c4", "lorem_ipsum")
    assert outcome(C4, "\n".join([*SENTENCES, "body { color: red; }"])) == ("c4", "curly_bracket")
    # As in datatrove, only lines that survived the line rules are looked at.
    assert outcome(C4, "\n".join([*SENTENCES, "Lorem ipsum", "{x}"])) == KEPT
    switches = {"filter_lorem_ipsum": False, "filter_curly_bracket": False}
    assert outcome(only("c4", **switches), "\n".join([*SENTENCES, "lorem ipsum dolor {sit}"])) == KEPT


@pytest.mark.parametrize(
    ("line", "count"),
    [
        ("One sentence without a mark", 1),
        ("First one. Second one! Third one?", 3),
        ("Wait... what?! Really.", 3),
        ('He said "stop." Then he left.', 2),
        ("Version 3.5 is out.", 1),
        ("Trailing mark then spaces.   ", 1),
        ("", 1),
    ],
)
def test_count_sentences(line: str, count: int) -> None:
    assert count_sentences(line) == count


# --- FineWeb ------------------------------------------------------------------------------

FW = only("fineweb")
FW_NAME = "fineweb"


def long_line(i: int, end: str = ".") -> str:
    return f"Line number {i:03d} talks about something different{end}"


def test_fineweb_line_punct_ratio() -> None:
    def doc(with_mark: int) -> str:
        return "\n".join([long_line(i) for i in range(with_mark)] + [long_line(i, "") for i in range(with_mark, 25)])

    assert outcome(FW, doc(3)) == KEPT  # 3/25 = 0.12
    assert outcome(FW, doc(2)) == (FW_NAME, "line_punct_ratio")
    assert outcome(FW, doc(0)) == (FW_NAME, "line_punct_ratio")
    assert outcome(only("fineweb", line_punct_exclude_zero=True), doc(0)) == KEPT
    # Any script's terminal mark counts; a trailing space hides it (lines are not stripped).
    chinese = "这是一个很长的中文句子，它在这里结束。" * 2
    assert outcome(FW, "\n".join([chinese] + [long_line(i, "") for i in range(7)])) == KEPT  # 1/8
    hidden = "\n".join([long_line(0, ". ")] + [long_line(i, "") for i in range(1, 8)])
    assert outcome(FW, hidden) == (FW_NAME, "line_punct_ratio")


def test_fineweb_short_line_ratio() -> None:
    def doc(short: int) -> str:
        return "\n".join([f"Short line {i:03d}." for i in range(short)] + [long_line(i) for i in range(100 - short)])

    assert outcome(FW, doc(67)) == KEPT  # 0.67
    assert outcome(FW, doc(68)) == (FW_NAME, "short_line_ratio")


def test_fineweb_short_line_length() -> None:
    chain = only("fineweb", short_line_thr=0.0)  # any short line drops the page
    longs = [long_line(i) for i in range(5)]
    assert outcome(chain, "\n".join([*longs, "x" * 30 + "."])) == KEPT
    assert outcome(chain, "\n".join([*longs, "x" * 29 + "."])) == (FW_NAME, "short_line_ratio")


def test_fineweb_char_duplicates_ratio() -> None:
    repeated = "This sentence appears twice on the page."  # 40 characters
    assert len(repeated) == 40

    def doc(total: int) -> str:
        # 78 unique lines of 49 characters and one that makes the total exact.
        uniques = [f"Unique line {i:03d} " + "w" * 32 + "." for i in range(78)]
        last = "Unique line 999 " + "w" * (total - 80 - 78 * 49 - 17) + "."
        return "\n".join([repeated, *uniques, last, repeated])

    assert len(doc(4000).replace("\n", "")) == 4000
    assert outcome(FW, doc(4000)) == KEPT  # 40 / 4000 = 0.01
    assert outcome(FW, doc(3999)) == (FW_NAME, "char_dup_ratio")


def test_fineweb_new_line_ratio() -> None:
    chain = only("fineweb", line_punct_thr=0.0)
    lines = [f"alphabetic{i}x beautifully{i}x considered{i}x" for i in range(10)]
    assert outcome(chain, "\n".join(lines)) == KEPT  # 9 newlines / 30 words = 0.3
    lines[0] = lines[0].replace(" ", "_", 1)
    assert len(split_words("\n".join(lines))) == 29
    assert outcome(chain, "\n".join(lines)) == (FW_NAME, "list_ratio")


def test_fineweb_empty() -> None:
    assert outcome(FW, "") == (FW_NAME, "empty")
    assert outcome(FW, " \n\t\n") == (FW_NAME, "empty")


# --- The chain ----------------------------------------------------------------------------

PROSE = (
    "The old harbour town changed slowly over the last century. Fishing boats gave way to ferries, "
    "and the warehouses along the quay became shops, studios and small cafés. Many families that had "
    "lived there for generations moved inland when prices rose, yet the market square still fills "
    "with stalls every Saturday morning. Local historians have collected letters, photographs and "
    "maps that show how the streets were widened after the great fire. A small museum near the "
    "lighthouse now displays these records, together with tools that were used to build wooden "
    "hulls. Visitors often remark that the town feels both familiar and strange, as if it were "
    "trying to remember what it used to be."
)


def test_default_chain_keeps_prose_and_names_filters_in_order() -> None:
    chain = FilterChain(FiltersConfig())
    assert chain.names == FILTER_NAMES == ("gopher_repetition", "gopher_quality", "c4", "fineweb")
    assert chain.apply(PROSE) == Verdict(text=PROSE, filter=None, rule=None, lines_removed=0)


def test_first_failing_filter_wins() -> None:
    spam = "\n".join(["buy now buy now buy now"] * 20)  # fails repetition, C4 and FineWeb
    assert outcome(FilterChain(FiltersConfig()), spam)[0] == "gopher_repetition"


def test_disabled_filters_never_drop() -> None:
    cfg = FiltersConfig()
    for name in FILTER_NAMES:
        getattr(cfg, name).enabled = False
    chain = FilterChain(cfg)
    assert chain.names == ()
    for text in ["", "hello", "lorem ipsum {}", "\n".join(["- a"] * 50)]:
        assert chain.apply(text) == Verdict(text=text, filter=None, rule=None)
    # Each filter alone drops this; with it disabled the next one in line decides.
    without_repetition = FilterChain(FiltersConfig(gopher_repetition=GopherRepetitionConfig(enabled=False)))
    assert outcome(without_repetition, "") == ("gopher_quality", "short_doc")


def test_fineweb_sees_the_text_c4_kept() -> None:
    menu = [f"Menu{i} item" for i in range(20)]
    text = "\n".join(menu + SENTENCES)
    assert outcome(only("fineweb"), text) == (FW_NAME, "short_line_ratio")
    cfg = FiltersConfig(gopher_repetition=GopherRepetitionConfig(enabled=False), gopher_quality=GopherQualityConfig(enabled=False))
    verdict = FilterChain(cfg).apply(text)
    assert verdict == Verdict(text="\n".join(SENTENCES), filter=None, rule=None, lines_removed=20)


def test_rules_table_is_complete() -> None:
    assert set(RULES) == set(FILTER_NAMES)
    assert RULES["gopher_repetition"][-1] == "dup_10_gram"
    for rules in RULES.values():
        assert len(set(rules)) == len(rules)


# --- Config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "bad"),
    [
        (GopherQualityConfig, {"min_doc_words": -1}),
        (GopherQualityConfig, {"max_doc_words": 10, "min_doc_words": 50}),
        (GopherQualityConfig, {"min_avg_word_length": -0.5}),
        (GopherQualityConfig, {"max_avg_word_length": 2.0}),
        (GopherQualityConfig, {"max_symbol_word_ratio": 1.5}),
        (GopherQualityConfig, {"max_bullet_lines_ratio": -0.1}),
        (GopherQualityConfig, {"max_ellipsis_lines_ratio": 2.0}),
        (GopherQualityConfig, {"min_alpha_words_ratio": 1.01}),
        (GopherQualityConfig, {"min_stop_words": -1}),
        (GopherQualityConfig, {"min_stop_words": 3, "stop_words": ["a", "a", "b"]}),
        (GopherQualityConfig, {"stop_words": ["the", ""]}),
        (GopherRepetitionConfig, {"dup_line_frac": -0.1}),
        (GopherRepetitionConfig, {"dup_para_frac": 1.1}),
        (GopherRepetitionConfig, {"dup_line_char_frac": 2.0}),
        (GopherRepetitionConfig, {"dup_para_char_frac": -1.0}),
        (GopherRepetitionConfig, {"top_ngram_max_fractions": [0.2, -0.1]}),
        (GopherRepetitionConfig, {"top_ngram_max_fractions": [0.2, 0.2, 0.2, 0.2]}),
        (GopherRepetitionConfig, {"dup_ngram_max_fractions": [1.5]}),
        (GopherRepetitionConfig, {"dup_ngram_max_fractions": [0.1] * 7}),
        (C4Config, {"max_word_length": -1}),
        (C4Config, {"min_words_per_line": -1}),
        (C4Config, {"min_num_sentences": -1}),
        (C4Config, {"policy_phrases": ["  "]}),
        (FineWebConfig, {"line_punct_thr": 1.2}),
        (FineWebConfig, {"short_line_thr": -0.1}),
        (FineWebConfig, {"short_line_length": -1}),
        (FineWebConfig, {"char_duplicates_ratio": 1.5}),
        (FineWebConfig, {"new_line_ratio": -0.3}),
    ],
)
def test_config_rejects_bad_values(cls: type, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        cls(**bad)


def test_config_from_recipe_table() -> None:
    table = {
        "gopher_quality": {"min_stop_words": 0, "max_avg_word_length": 12},
        "gopher_repetition": {"top_ngram_max_fractions": [0.2, 0, 0.16]},
        "c4": {"enabled": False},
    }
    cfg = from_mapping(FiltersConfig, table, source="recipe.toml", prefix="filters")
    assert cfg.gopher_quality.max_avg_word_length == 12.0
    assert cfg.gopher_repetition.top_ngram_max_fractions == [0.2, 0.0, 0.16]
    assert FilterChain(cfg).names == ("gopher_repetition", "gopher_quality", "fineweb")
    with pytest.raises(ConfigError, match=r"filters\.c4\.min_sentences"):
        from_mapping(FiltersConfig, {"c4": {"min_sentences": 5}}, source="recipe.toml", prefix="filters")
    with pytest.raises(ConfigError, match=r"filters\.fineweb.*new_line_ratio"):
        from_mapping(FiltersConfig, {"fineweb": {"new_line_ratio": -1}}, source="recipe.toml", prefix="filters")


# --- Never raises -------------------------------------------------------------------------

TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(" \n\n\t\r.!?#-•…{}[]1 the and word Lorem ipsum javascript 。\u2028\x85")),
        st.characters(),
    ),
    max_size=300,
)
PERMISSIVE = FiltersConfig(
    gopher_repetition=GopherRepetitionConfig(
        dup_line_frac=1, dup_para_frac=1, dup_line_char_frac=1, dup_para_char_frac=1,
        top_ngram_max_fractions=[1, 1, 1], dup_ngram_max_fractions=[1] * 6,
    ),
    gopher_quality=GopherQualityConfig(min_doc_words=0, min_stop_words=0, min_alpha_words_ratio=0),
    c4=C4Config(min_num_sentences=0, min_words_per_line=0),
    fineweb=FineWebConfig(line_punct_thr=0, short_line_thr=1, char_duplicates_ratio=1, new_line_ratio=100),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(TEXT, st.sampled_from([FiltersConfig(), PERMISSIVE]))
def test_apply_never_raises(text: str, cfg: FiltersConfig) -> None:
    verdict = FilterChain(cfg).apply(text)
    if verdict.filter is None:
        assert verdict.text is not None and verdict.rule is None
    else:
        assert verdict.text is None and verdict.rule in RULES[verdict.filter]


def test_words_split_like_spacy() -> None:
    # spaCy 3.8's blank English tokenizer gives exactly these tokens for this line (checked
    # once against spaCy, which the product does not depend on).
    line = 'sizeof(struct sockaddr_un)+1 a=b foo.bar(x) x/y --flag 3.5 e-mail (see utf-8). "Hello," /usr/share/doc end.'
    from pipeline.filters import split_words

    assert split_words(line) == [
        "sizeof(struct",
        "sockaddr_un)+1",
        "a",
        "=",
        "b",
        "foo.bar(x",
        ")",
        "x",
        "/",
        "y",
        "--flag",
        "3.5",
        "e",
        "-",
        "mail",
        "(",
        "see",
        "utf-8",
        ")",
        ".",
        '"',
        "Hello",
        ",",
        '"',
        "/usr",
        "/",
        "share",
        "/",
        "doc",
        "end",
        ".",
    ]
