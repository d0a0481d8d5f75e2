"""MinHash LSH near-duplicate detection: normal form, recall and precision, clustering, determinism."""

from __future__ import annotations

import ast
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import unicodedata
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import from_mapping
from pipeline.errors import ConfigError
from pipeline.minhash import (
    DedupConfig,
    MinHasher,
    candidate_probability,
    estimate_jaccard,
    exact_key,
    find_clusters,
    normalise,
    threshold_estimate,
)

CFG = DedupConfig()
N = CFG.ngram

# datatrove's simplify_text with TextNormConfig defaults, written out independently (its
# punctuation literal copied from datatrove/utils/text.py) as the reference for the words
# of the normal form.
_DT_PUNCTUATION = (
    "!/\u2014\u201d:\uff05\uff11\u3008&(\u3001\u2501\\\u3010#%\u300c\u300d\uff0c\u3011\uff1b+^]~\u201c\u300a\u201e';"
    "\u2019{|\u2236\xb4[=-`*\uff0e\uff08\u2013\uff1f\uff01\uff1a$\uff5e\xab\u3009,><\u300b)?\uff09\u3002\u2026@_."
    '"}\u25ba\xbb' + "".join(map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))))
)
_DT_TRANS = str.maketrans(_DT_PUNCTUATION, " " * len(_DT_PUNCTUATION))


def datatrove_words(text: str) -> list[str]:
    text = re.sub(r"\d+([.,\u060c\u066b\u2396\u2397\u2398]{1}\d+)?", "0", text.lower())
    text = re.sub(r"\s+", " ", text.translate(_DT_TRANS).strip())
    text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return text.strip().split()


def shingle_set(text: str, n: int = N) -> set[tuple[str, ...]]:
    words = normalise(text).split()
    if not words:
        return set()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set[tuple[str, ...]], b: set[tuple[str, ...]]) -> float:
    return len(a & b) / len(a | b)


def real_prose() -> list[str]:
    """Real English prose, in a fixed order: the reference manual's topics shipped with
    pydoc, then the docstrings of the top-level standard library modules."""
    from pydoc_data.topics import topics

    out = [paragraph for _, text in sorted(topics.items()) for paragraph in re.split(r"\n\s*\n", text)]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old escape sequences in some modules
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
    return [text for text in out if len(text.split()) >= 20]


@pytest.fixture(scope="module")
def prose() -> list[str]:
    return real_prose()


@pytest.fixture(scope="module")
def vocabulary(prose: list[str]) -> list[str]:
    words = sorted({w for d in prose for w in normalise(d).split() if len(w) > 2})
    assert len(words) > 5000
    return words


@pytest.fixture(scope="module")
def hasher() -> MinHasher:
    return MinHasher(CFG)


# --- normal form ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Hello, WORLD!", "hello world"),  # case and punctuation
        ("  a\t\tb\n\n c \r\n", "a b c"),  # whitespace runs, leading and trailing
        ("call 555-1234, pay 3.14 or 2,5", "call 0 0 pay 0 or 0"),  # digit runs, one decimal part
        ("1,000,000 and 1.2.3", "0 0 and 0 0"),  # only one decimal part joins
        ("\u0663\u0664 items", "0 items"),  # Arabic-Indic digits are digits too
        ("Caf\u00e9 na\u00efve \u00c5ngstr\u00f6m cafe\u0301", "cafe naive angstrom cafe"),  # diacritics
        ("\u201cquoted\u201d \u2014 \u00abguillemets\u00bb \u3010cjk\u3011", "quoted guillemets cjk"),
        ("tab\x0bvt\x1fus\x85nel", "tab vt us nel"),  # controls become spaces
        ("a \u0301 b", "a b"),  # a lone combining mark leaves no empty word
        ("!!! ... ---", ""),
        ("", ""),
    ],
)
def test_normalise_examples(raw: str, normal: str) -> None:
    assert normalise(raw) == normal


# Characters where the steps interact: marks, odd whitespace, digits of other scripts,
# letters whose lowercase or decomposition changes length.
_TRICKY = "aZ\u00e9\u0301 \t\n\r\x0b\x1f\x85\u00a0\u2003.,;:!?'\"-_()[]{}\u2019\u201c\u2014\u3002\uff0c0123\u0663\uff11\u00b2\u0130\u1e9e\u00df\u01c5"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(_TRICKY) | st.characters(codec="utf-8"), max_size=60))
def test_normal_form_words_match_datatrove(text: str) -> None:
    assert normalise(text).split(" ") == (datatrove_words(text) or [""])


def test_normal_form_matches_datatrove_on_real_text(prose: list[str]) -> None:
    sample = prose[:1500]
    assert [normalise(d).split() for d in sample] == [datatrove_words(d) for d in sample]


def test_exact_key() -> None:
    assert len(exact_key("x")) == 16
    assert exact_key("Hello,   World!") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello word")
    assert exact_key("") == exact_key("?!")


# --- config and the recall/precision arithmetic --------------------------------------


def test_probability_figures_in_the_docs() -> None:
    assert threshold_estimate(14, 8) == pytest.approx(0.719, abs=1e-3)
    assert candidate_probability(0.8, 14, 8) == pytest.approx(0.92, abs=0.01)
    assert candidate_probability(0.7, 14, 8) == pytest.approx(0.56, abs=0.01)
    assert candidate_probability(0.5, 14, 8) == pytest.approx(0.05, abs=0.01)
    # At the threshold the probability is close to one half, as its name says.
    assert candidate_probability(threshold_estimate(14, 8), 14, 8) == pytest.approx(0.5, abs=0.15)


def test_config_from_recipe_table() -> None:
    cfg = from_mapping(DedupConfig, {"near": False, "bands": 20, "rows": 5}, source="r.toml", prefix="dedup")
    assert (cfg.near, cfg.bands, cfg.rows, cfg.ngram) == (False, 20, 5, 5)
    with pytest.raises(ConfigError, match="dedup.band"):
        from_mapping(DedupConfig, {"band": 3}, source="r.toml", prefix="dedup")
    with pytest.raises(ConfigError, match="rows must be >= 1"):
        from_mapping(DedupConfig, {"rows": 0}, source="r.toml", prefix="dedup")
    with pytest.raises(ConfigError, match="dedup.ngram"):
        from_mapping(DedupConfig, {"ngram": "5"}, source="r.toml", prefix="dedup")


# --- signatures ----------------------------------------------------------------------


def test_signature_shapes_and_empty_text(hasher: MinHasher) -> None:
    sig = hasher.signature("a few words of text here")
    assert sig.dtype == np.uint32 and sig.shape == (CFG.bands * CFG.rows,)
    keys = hasher.band_keys("a few words of text here")
    assert keys.dtype == np.uint64 and keys.shape == (CFG.bands,) and keys.all()
    assert not hasher.band_keys("").any() and not hasher.band_keys(" ... !").any()
    assert (hasher.signature("") == 0xFFFFFFFF).all()


def test_signature_is_a_function_of_the_shingle_set(hasher: MinHasher) -> None:
    # Period-3 word sequences of different lengths have the same three 5-gram shingles.
    a, b = "x y z " * 4, "X, y; z! " * 9
    assert shingle_set(a) == shingle_set(b)
    assert (hasher.signature(a) == hasher.signature(b)).all()
    assert (hasher.signature(a) != hasher.signature("x y z x y z w")).any()


def test_long_document_is_the_union_of_overlapping_parts(hasher: MinHasher, vocabulary: list[str]) -> None:
    # 10,000 words span several blocks of shingles; the signature of the whole must be the
    # minimum over two parts that overlap by n - 1 words (together, the same shingles).
    words = random.Random(7).choices(vocabulary, k=10_000)
    cut = 6_001
    whole = hasher.signature(" ".join(words))
    parts = np.minimum(hasher.signature(" ".join(words[: cut + N - 1])), hasher.signature(" ".join(words[cut:])))
    assert (whole == parts).all()


def test_short_documents_are_one_shingle(hasher: MinHasher) -> None:
    keys = np.stack([hasher.band_keys(t) for t in ("Hello world", "hello, WORLD!", "hello there", "x y z w")])
    assert (keys[0] == keys[1]).all()
    assert find_clusters(keys).tolist() == [0, 0, 2, 3]


def test_batch_equals_one_at_a_time(hasher: MinHasher, prose: list[str]) -> None:
    texts = ["", "one", "two words", "exactly five words right here", "six words are right here now"]
    texts += ["?!", "na\u00efve caf\u00e9 \u00fcber stra\u00dfe \u65e5\u672c\u8a9e", " ".join(["word"] * 9000)]
    texts += prose[:700]  # more than one batch of normal-form bytes
    texts += ["", "a b"]
    one_by_one = np.stack([hasher.signature(t) for t in texts])
    assert (hasher.signatures(texts) == one_by_one).all()
    assert (hasher.band_keys_many(texts) == np.stack([hasher.band_keys(t) for t in texts])).all()
    assert hasher.signatures([]).shape == (0, CFG.bands * CFG.rows)


def test_estimate_jaccard_tracks_exact_jaccard(hasher: MinHasher, vocabulary: list[str]) -> None:
    rng = random.Random(3)
    errors = []
    for i in range(120):
        base = rng.choices(vocabulary, k=120)
        other = list(base)
        for pos in rng.sample(range(len(base)), k=i % 30):
            other[pos] = rng.choice(vocabulary)
        a, b = " ".join(base), " ".join(other)
        exact = jaccard(shingle_set(a), shingle_set(b))
        errors.append(estimate_jaccard(hasher.signature(a), hasher.signature(b)) - exact)
    err = np.array(errors)
    # 112 hashes: standard error <= 0.047, so 0.1 is about two of them.
    assert np.mean(np.abs(err) <= 0.1) >= 0.95
    assert np.abs(err).mean() < 0.04
    assert abs(err.mean()) < 0.015  # no bias
    with pytest.raises(ValueError, match="shape"):
        estimate_jaccard(np.zeros(3, np.uint32), np.zeros(4, np.uint32))


def test_recall_on_near_duplicates_at_known_jaccard(hasher: MinHasher, vocabulary: list[str]) -> None:
    rng = random.Random(11)
    texts, pairs = [], []
    for i in range(600):
        base = rng.choices(vocabulary, k=150)
        edited = list(base)
        edits = [1, 2, 3, 4, 20][i % 5]
        for pos in rng.sample(range(len(base)), k=edits):
            edited[pos] = rng.choice(vocabulary)
        a, b = " ".join(base), " ".join(edited)
        pairs.append((len(texts), len(texts) + 1, jaccard(shingle_set(a), shingle_set(b))))
        texts += [a, b]
    rep = find_clusters(hasher.band_keys_many(texts))
    similar = [rep[a] == rep[b] for a, b, j in pairs if j >= 0.8]
    dissimilar = [rep[a] == rep[b] for a, b, j in pairs if j < 0.5]
    assert len(similar) >= 300 and len(dissimilar) >= 100
    assert np.mean(similar) >= 0.9
    assert np.mean(dissimilar) <= 0.05
    # No base document joined another pair's cluster.
    assert len(set(rep.tolist())) >= len(pairs)


def test_precision_on_distinct_real_documents(hasher: MinHasher, prose: list[str]) -> None:
    # Documents of 60 consecutive words of real prose, kept only if the exact Jaccard of
    # their shingles with every document kept before is below 0.3 (an inverted index of
    # shingles, no MinHash), so any cluster found among them is a false one.
    words = [w for text in prose for w in text.split()]
    chosen: list[set[tuple[str, ...]]] = []
    texts: list[str] = []
    index: dict[tuple[str, ...], list[int]] = {}
    for start in range(0, len(words) - 60, 60):
        doc = " ".join(words[start : start + 60])
        shingles = shingle_set(doc)
        overlap = Counter(j for s in shingles for j in index.get(s, ()))
        if any(c / (len(shingles) + len(chosen[j]) - c) >= 0.3 for j, c in overlap.items()):
            continue
        for s in shingles:
            index.setdefault(s, []).append(len(chosen))
        chosen.append(shingles)
        texts.append(doc)
    assert len(texts) >= 2000
    rep = find_clusters(hasher.band_keys_many(texts))
    false = [(texts[i], texts[rep[i]]) for i in np.flatnonzero(rep != np.arange(len(texts)))]
    assert len(false) <= len(texts) // 100, false  # precision >= 0.99
    assert not false


def test_no_clusters_among_random_word_documents(hasher: MinHasher, vocabulary: list[str]) -> None:
    rng = random.Random(5)
    texts = [" ".join(rng.choices(vocabulary, k=rng.randint(20, 300))) for _ in range(2000)]
    rep = find_clusters(hasher.band_keys_many(texts))
    assert (rep == np.arange(len(texts))).all()


# --- clustering ----------------------------------------------------------------------


def keys(rows: list[list[int]]) -> np.ndarray:
    return np.array(rows, dtype=np.uint64)


def test_clusters_are_transitive_and_keep_the_lowest_index() -> None:
    # 0~1 in band 0, 1~2 in band 1: one cluster although 0 and 2 share nothing.
    assert find_clusters(keys([[1, 2], [1, 3], [4, 3], [5, 6]])).tolist() == [0, 0, 0, 3]
    # The link to document 0 is found only through the last document.
    assert find_clusters(keys([[9, 1], [2, 3], [7, 3], [9, 3]])).tolist() == [0, 0, 0, 0]
    assert find_clusters(keys([[5, 1], [6, 2], [7, 3], [5, 3]])).tolist() == [0, 1, 0, 0]


def test_documents_without_keys_never_cluster() -> None:
    k = keys([[0, 0], [0, 0], [3, 4], [3, 4], [3, 9]])
    assert find_clusters(k).tolist() == [0, 1, 2, 2, 2]
    assert find_clusters(k, has_keys=np.array([True, True, False, True, True])).tolist() == [0, 1, 2, 3, 3]
    assert find_clusters(np.zeros((0, 14), dtype=np.uint64)).tolist() == []
    with pytest.raises(ValueError, match="2-d"):
        find_clusters(np.zeros(5, dtype=np.uint64))


def reference_clusters(k: np.ndarray) -> list[int]:
    """Plain union-find over every pair sharing a non-zero key in a band."""
    parent = list(range(len(k)))

    def root(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i in range(len(k)):
        for j in range(i):
            if any(k[i, b] != 0 and k[i, b] == k[j, b] for b in range(k.shape[1])):
                ri, rj = root(i), root(j)
                parent[max(ri, rj)] = min(ri, rj)
    return [root(i) for i in range(len(k))]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 12), min_size=3, max_size=3), min_size=1, max_size=40))
def test_clusters_match_a_plain_union_find(rows: list[list[int]]) -> None:
    k = keys(rows)
    assert find_clusters(k).tolist() == reference_clusters(k)


def test_splitting_the_work_changes_nothing(vocabulary: list[str]) -> None:
    rng = random.Random(2)
    texts = [" ".join(rng.choices(vocabulary, k=rng.randint(100, 200))) for _ in range(400)]
    # One word changed in documents of 100+ words: Jaccard >= 0.9, candidates with p > 0.99.
    texts += [" ".join(["changed", *t.split()[1:]]) for t in texts[:100]]
    whole = MinHasher(CFG).band_keys_many(texts)
    halves = np.concatenate([MinHasher(CFG).band_keys_many(texts[:250]), MinHasher(CFG).band_keys_many(texts[250:])])
    assert (whole == halves).all()
    rep = find_clusters(halves)
    assert (rep == find_clusters(whole)).all()
    assert np.count_nonzero(rep[400:] != np.arange(400, 500)) >= 97  # the edited copies were found


def test_other_seeds_give_other_hashes() -> None:
    text = "a document long enough to have several shingles in it"
    assert (MinHasher(DedupConfig(seed=2)).signature(text) != MinHasher(CFG).signature(text)).any()
    assert (MinHasher(DedupConfig(seed=1)).signature(text) == MinHasher(CFG).signature(text)).all()


# --- determinism ---------------------------------------------------------------------

_PROBE = [
    "The quick brown fox jumps over the lazy dog, again and again.",
    "na\u00efve caf\u00e9 \u00fcber stra\u00dfe \u65e5\u672c\u8a9e 123",
    "short",
    "",
]
_PROBE_SCRIPT = """
import json, sys
from pipeline.minhash import DedupConfig, MinHasher, exact_key
h = MinHasher(DedupConfig())
print(json.dumps([
    [h.signature(t).astype("<u4").tobytes().hex(), h.band_keys(t).astype("<u8").tobytes().hex(), exact_key(t).hex()]
    for t in json.loads(sys.argv[1])
]))
"""


def probe(hasher: MinHasher) -> list[list[str]]:
    """What _PROBE_SCRIPT prints, computed in this process (little-endian, so any machine agrees)."""
    out = []
    for text in _PROBE:
        sig, keys = hasher.signature(text), hasher.band_keys(text)
        out.append([sig.astype("<u4").tobytes().hex(), keys.astype("<u8").tobytes().hex(), exact_key(text).hex()])
    return out


def test_identical_in_another_process(hasher: MinHasher) -> None:
    root = Path(__file__).resolve().parents[1]
    for seed in ("0", "12345"):  # str hashing is salted per process; none of it may leak in
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}
        command = [sys.executable, "-c", _PROBE_SCRIPT, json.dumps(_PROBE)]
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        assert json.loads(out) == probe(hasher)


def test_keys_are_frozen(hasher: MinHasher) -> None:
    # Band keys may be kept between runs (incremental dedup); any change to the normal form
    # or the hashing must be deliberate. Update these values only together with such a change.
    keys = hasher.band_keys(_PROBE[0])
    assert [hex(k) for k in keys[:3]] == GOLDEN_KEYS
    assert exact_key(_PROBE[0]).hex() == GOLDEN_EXACT


GOLDEN_KEYS = ["0x9365c31c83f1498e", "0xc14ae5f3d84114d7", "0x93e741d5d9799627"]
GOLDEN_EXACT = "64fe43aabdeaf3ecdf72bf3880cd68a4"
