"""The faster filters (issue 17) give every document the verdict the frozen reference gives.

``tests/filters_reference.py`` is the filter implementation as it was before the speed-up.
Every document here goes through both chains and the whole ``Verdict`` must be equal:
which filter and rule dropped it, the text C4 kept, and the lines it removed. Documents:
the stdlib docs corpus (real text, whole and in pieces), and synthetic ones built to sit
on either side of each rule's threshold, with the whitespace, scripts and word shapes that
the fast paths treat specially. The fast paths' rare branches (hash collisions, key
renumbering, cache replacement, long texts) are forced by shrinking their constants.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.filters_ngrams as ngrams
import pipeline.filters_words as words_module
from pipeline.filters import (
    C4Config,
    FilterChain,
    FiltersConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    split_words,
)
from tests.filters_reference import ReferenceChain, corpus_documents
from tests.filters_reference import split_words as reference_split_words

# Lenient thresholds let documents reach C4 and FineWeb that the defaults drop early, and
# every Gopher repetition rule runs on nearly every document.
LENIENT = FiltersConfig(
    gopher_repetition=GopherRepetitionConfig(
        dup_line_frac=0.9, dup_para_frac=0.9, dup_line_char_frac=0.9, dup_para_char_frac=0.9,
        top_ngram_max_fractions=[0.6, 0.5, 0.4], dup_ngram_max_fractions=[0.5, 0.45, 0.4, 0.35, 0.3, 0.25],
    ),
    gopher_quality=GopherQualityConfig(min_doc_words=5, min_alpha_words_ratio=0.2, min_stop_words=0),
    c4=C4Config(min_num_sentences=1, min_words_per_line=1),
    fineweb=FineWebConfig(line_punct_thr=0.01, short_line_thr=0.95, char_duplicates_ratio=0.3),
)  # fmt: skip
# Only some rules on, in unusual combinations: a later n without the earlier ones.
SPARSE = FiltersConfig(
    gopher_repetition=GopherRepetitionConfig(top_ngram_max_fractions=[0.0, 0.0, 0.16], dup_ngram_max_fractions=[0.0, 0.14, 0.0, 0.0, 0.0, 0.10]),
    gopher_quality=GopherQualityConfig(enabled=False),
    c4=C4Config(remove_citations=False, filter_no_terminal_punct=True, min_num_sentences=0),
)
CONFIGS = {"default": FiltersConfig(), "lenient": LENIENT, "sparse": SPARSE}


def assert_same_verdicts(docs: list[str], cfg: FiltersConfig) -> None:
    new, reference = FilterChain(cfg), ReferenceChain(cfg)
    for i, doc in enumerate(docs):
        assert new.apply(doc) == reference.apply(doc), f"document {i}: {doc[:200]!r}"


# --- Real text ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_documents(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The first ~800 KB of the stdlib docs corpus, whole and cut into pieces of at most 600 characters."""
    from appliance.demo import build_stdlib_corpus

    corpus = build_stdlib_corpus(tmp_path_factory.mktemp("filters-speed") / "corpus", max_bytes=700_000)
    return corpus_documents(Path(corpus.path), piece_chars=600)


@pytest.mark.parametrize("name", CONFIGS)
def test_stdlib_corpus_verdicts_match_reference(stdlib_documents: list[str], name: str) -> None:
    assert len(stdlib_documents) > 1000
    assert_same_verdicts(stdlib_documents, CONFIGS[name])


def test_stdlib_corpus_words_match_reference(stdlib_documents: list[str]) -> None:
    for doc in stdlib_documents:
        assert split_words(doc) == reference_split_words(doc)


# --- Synthetic documents on both sides of each threshold -----------------------------------

WORDS = (
    "river storm farmer animal ground school volunteer bridge water morning evening station garden window "
    "village market letter library teacher student doctor engine harbour forest mountain valley kitchen "
    "winter summer autumn spring railway museum theatre island castle meadow orchard"
).split()
STOP = ["the", "be", "to", "of", "and", "that", "have", "with"]


def sentence(rng: random.Random, n: int = 10, end: str = ".") -> str:
    picked = [rng.choice(WORDS + STOP) for _ in range(n)]
    return " ".join(picked).capitalize() + end


def prose_lines(rng: random.Random, lines: int) -> list[str]:
    return [" ".join(sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(1, 3))) for _ in range(lines)]


def synthetic_documents() -> Iterator[str]:
    rng = random.Random(17)
    # Repeated lines and paragraphs, the count stepping across the 30 % / 20 % thresholds.
    for k in range(0, 16):
        lines = prose_lines(rng, 20)
        yield "\n".join(lines + [lines[0]] * k)
        paragraphs = ["\n".join(prose_lines(rng, 2)) for _ in range(12)]
        yield "\n\n".join(paragraphs + [paragraphs[1]] * k)
        yield "\n\n\n".join(paragraphs[:6] + [paragraphs[2]] * (k // 2)) + "\n\n"
    # One phrase of n words repeated k times inside prose: every top and duplicated n-gram rule.
    for n in range(2, 11):
        phrase = " ".join(rng.choice(WORDS) for _ in range(n))
        for k in range(0, 14, 2):
            body = prose_lines(rng, 12)
            for _ in range(k):
                body.insert(rng.randrange(len(body) + 1), phrase + ".")
            yield " ".join(body)
            yield "\n".join(body)
    # Overlapping repeats ("a a a a"), ties between equally frequent n-grams, and words whose
    # concatenations collide ("ab a" / "a ba"), which datatrove's duplicated n-grams count as equal.
    for k in range(1, 30, 3):
        yield " ".join(["spam"] * k + prose_lines(rng, 6))
        yield " ".join(rng.choice(["ab", "a", "ba", "b", "aba"]) for _ in range(20 + 7 * k))
        yield " ".join(["ab a b", "a ba b", "aba b"][i % 3] for i in range(k)) + " " + " ".join(prose_lines(rng, 4))
        yield " ".join(f"{w1} {w2}" for w1, w2 in zip(WORDS[:k], WORDS[1 : k + 1])) + " " + " ".join(prose_lines(rng, 5))
    # Bullets, ellipses, hashes across their ratios; indented and NBSP-indented bullets.
    for k in range(0, 22, 3):
        lines = prose_lines(rng, 20)
        yield "\n".join(("- " if i < k else "") + line for i, line in enumerate(lines))
        yield "\n".join(("  \u2022 " if i < k else "\t") + line for i, line in enumerate(lines))
        yield "\n".join(line + (" ...  " if i < k else "") for i, line in enumerate(lines))
        yield "\n".join(line + ("\u2026" if i < k else "") for i, line in enumerate(lines))
        yield " ".join(lines) + "".join(f" #tag{i}" for i in range(k * 4)) + " wait..." * k
    # Stop words 0..3, alphabetic share around 80 %, mean word length around 3 and 10.
    for k in range(0, 4):
        yield " ".join(rng.choice(WORDS) for _ in range(80)) + " " + " ".join(STOP[:k]) + "."
    for k in range(0, 40, 4):
        yield " ".join([rng.choice(WORDS) for _ in range(60)] + [str(rng.randint(0, 99)) for _ in range(k)] + ["- -"] * (k // 4))
        yield " ".join(["the cat ran to it of an ox by me"] * 8 + ["ab"] * k) + "."
        yield " ".join(["the internationalization of characteristically overcomplicated telecommunications"] * 8 + ["a"] * (k * 3))
    # Document length around min_doc_words (50), with punctuation-only words that do not count.
    for k in range(44, 56, 2):
        yield " ".join(rng.choice(WORDS + STOP) for _ in range(k)) + " , . ; --" + "."
    # C4: lorem ipsum, curly brackets, javascript and policy lines, citations, long words,
    # short lines and the sentence count around 5.
    for k in range(0, 8):
        lines = prose_lines(rng, 8)
        yield "\n".join(lines[:k] + ["Please enable JavaScript to view this page properly now."] + lines[k:])
        yield "\n".join(lines[:k] + ["This site uses cookies to improve things for you."] + lines[k:])
        yield "\n".join(lines[:k] + ["The river[1] rose quickly[edit] after the storm[citation needed] today."] + lines[k:])
        yield "\n".join(lines[:k] + ["Short line", "Menu", ""] + lines[k:])
        yield "\n".join(lines[:k] + ["x" * (990 + 5 * k) + " and more words here."] + lines[k:])
        yield ". ".join(sentence(rng, 8, "") for _ in range(k)) + "."
        yield "\n".join(lines[:k] + ["Lorem ipsum dolor sit amet, the consectetur."] + lines[k:])
        yield "\n".join(lines[:k] + ["function f() { return the value of that; }"] + lines[k:])
    # FineWeb: terminal punctuation, short lines, duplicated line characters, newlines per word.
    for k in range(0, 20, 2):
        lines = [sentence(rng, 8, "") for _ in range(20)]
        yield "\n".join(line + ("." if i < k else "") for i, line in enumerate(lines))
        yield "\n".join(line if i >= k else " ".join(line.split()[:3]) + "." for i, line in enumerate(prose_lines(rng, 20)))
        yield "\n".join(prose_lines(rng, 20) + ["The river rose."] * (k // 2))
        # Lines of three words, over 30 characters, few of them ending a sentence: a list.
        pairs = [((a * 3)[:13], (b * 3)[:14]) for a in WORDS for b in WORDS if a != b]
        rng.shuffle(pairs)
        items = [f"{STOP[i % 2]} {a} {b}" + ("." if i % 6 == 0 else "") for i, (a, b) in enumerate(pairs[: 20 + 10 * k])]
        yield "\n".join(items)
        yield "\n".join(" ".join(items[i : i + 2]) for i in range(0, len(items), 2))
    # Whitespace variants, scripts without spaces, surrogates, very long words, empty text.
    base = prose_lines(rng, 12)
    for sep in ("\r\n", "\r", "\n\n", " \n ", "\t\n", "\x0b", "\x0c", "\x85", "\u2028", "\u2029", "\x1c"):
        yield sep.join(base)
        yield sep + sep.join(base) + sep * 3
    yield "\xa0".join(" ".join(base).split())
    yield "\u3000".join(" ".join(base).split())
    yield "\t".join(" ".join(base).split(" "))
    cjk = "河水在暴风雨后迅速上涨。农民把牲畜转移到高处。学校连续三天停课。志愿者在桥边装沙袋。"
    yield cjk * 20
    yield "\n".join([cjk] * 3 + base)
    yield " ".join(base) + " Größe Straße naïve café coöperate Ωmega ελληνικά русский текст."
    yield " ".join(base) + " \U0001f600\U0001f680 \udc80\udcff broken\udc80bytes."
    yield " ".join(base) + " " + "a" * 5000 + " " + "b-" * 600 + "c"
    yield " ".join(base) + " " + "https://example.org/" + "x/" * 300 + " sizeof(struct --flag 3.5 e-mail utf-8 ... …"
    yield from ("", " ", "\n", "\n\n\n", ".", "a", "hello world", "the and " * 30)


@pytest.mark.parametrize("name", CONFIGS)
def test_synthetic_documents_match_reference(name: str) -> None:
    docs = list(synthetic_documents())
    assert len(docs) > 400
    assert_same_verdicts(docs, CONFIGS[name])


def test_synthetic_documents_reach_every_rule() -> None:
    # The synthetic set is only a threshold test if it trips the rules it was built for.
    chain = FilterChain(FiltersConfig())
    rules = {(v.filter, v.rule) for v in map(chain.apply, synthetic_documents())}
    expected = {("gopher_repetition", r) for r in ("dup_para_frac", "dup_line_frac", "top_2_gram", "top_3_gram", "top_4_gram", "dup_5_gram", "dup_10_gram")}
    expected |= {("gopher_quality", r) for r in ("short_doc", "too_many_hashes", "too_many_bullets", "too_many_end_ellipsis")}
    expected |= {("gopher_quality", r) for r in ("below_alpha_words_ratio", "too_few_stop_words", "above_avg_word_length")}
    expected |= {("c4", r) for r in ("lorem_ipsum", "curly_bracket", "too_few_sentences")}
    expected |= {("fineweb", r) for r in ("line_punct_ratio", "short_line_ratio", "char_dup_ratio", "list_ratio")}
    expected |= {(None, None)}
    assert expected <= rules, sorted(map(str, expected - rules))


# --- Random text ---------------------------------------------------------------------------

TOKENS = st.sampled_from(["a", "b", "ab", "ba", "the", "and", "...", "-", "#", "•", "x.", "(y)", "3.5", "utf-8", "{", "[1]", "河水"])
SEPARATORS = st.sampled_from([" ", " ", " ", "\n", "\n\n", "\r\n", "\t", "\xa0", "  "])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(TOKENS, SEPARATORS), max_size=150), st.sampled_from(list(CONFIGS)))
def test_random_token_soup_matches_reference(pairs: list[tuple[str, str]], name: str) -> None:
    text = "".join(token + sep for token, sep in pairs)
    assert split_words(text) == reference_split_words(text)
    assert_same_verdicts([text], CONFIGS[name])


# --- The fast paths' rare branches -----------------------------------------------------------


def test_hash_collisions_fall_back_to_the_string_walk(monkeypatch: pytest.MonkeyPatch, stdlib_documents: list[str]) -> None:
    # Powers of zero make every n-gram's hash its length alone: nearly everything collides.
    monkeypatch.setattr(ngrams, "_power_tables", lambda length: (ngrams.np.zeros(length, ngrams.np.uint64),) * 2)
    calls = []
    exact = ngrams.repeated_ngram_chars_exact
    monkeypatch.setattr(ngrams, "repeated_ngram_chars_exact", lambda *a: calls.append(1) or exact(*a))
    docs = list(synthetic_documents()) + stdlib_documents[::10]
    assert_same_verdicts(docs, LENIENT)
    assert calls, "the collision fallback was never taken"


def test_key_renumbering_and_small_caches(monkeypatch: pytest.MonkeyPatch, stdlib_documents: list[str]) -> None:
    # Mixed-radix keys renumbered at every n, a chunk cache replaced every few documents,
    # and power tables computed per document beyond 64 characters.
    monkeypatch.setattr(ngrams, "_KEY_LIMIT", 1 << 4)
    monkeypatch.setattr(ngrams, "_POWERS_KEPT", 64)
    monkeypatch.setattr(ngrams, "_powers", (ngrams.np.ones(1, ngrams.np.uint64),) * 2)
    monkeypatch.setattr(words_module, "_CACHE_MAX", 50)
    docs = list(synthetic_documents()) + stdlib_documents[::10]
    assert_same_verdicts(docs, LENIENT)
    assert_same_verdicts(docs, FiltersConfig())
    assert len(words_module._cache) < 50 + max(len(set(doc.split())) for doc in docs)
