"""Near-duplicate detection: MinHash signatures over word n-grams, LSH banding, clustering.

The method and its defaults follow FineWeb's MinHash deduplication (datatrove): text is put
in a normal form, split into words, every run of ``ngram`` consecutive words is a shingle,
``bands * rows`` hash permutations give the signature, and two documents become candidates
when all ``rows`` values of any one band agree. Candidates are joined transitively and each
cluster keeps its lowest-indexed document.

Normal form (``normalise``), in datatrove's order with its ``TextNormConfig`` defaults:

1. lowercase;
2. every run of decimal digits (any script; with one decimal part such as ``3.14`` or
   ``3,14``) becomes ``0``;
3. the characters of datatrove's ``PUNCTUATION`` set and the control characters become spaces;
4. whitespace runs become one space, leading and trailing whitespace is removed;
5. NFD, then combining marks (Unicode Mn) are removed, so ``é`` matches ``e``; the spaces
   this can leave are collapsed again, which changes no word.

The normal form follows the running Python's Unicode database (``unicodedata.unidata_version``),
so signatures are identical across processes and machines running the same Python release.

A document with fewer than ``ngram`` words has one shingle, its whole normal form, so short
documents still meet their duplicates (datatrove gives them none). A document whose normal
form is empty has no shingles and no band keys, and never clusters.

Shingle hashing needs no per-word Python work: the normal form's UTF-8 bytes get a
polynomial prefix hash, and each shingle (a byte span, since words are separated by exactly
one space) is hashed in O(1) from two prefix values. Its 64-bit value is then mixed and
permuted by ``bands * rows`` multiply-shift functions at once, in chunks of shingles so that
the matrix stays small for very long documents. No salted ``hash()`` is involved and all
parameters come from ``seed`` through splitmix64, so results never depend on the process,
the numpy version or the number of workers.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata
from collections.abc import Sequence

import numpy as np

# The [dedup] table lives in a numpy-free module, so a recipe loads without numpy; its name stays importable from here.
from pipeline.settings.dedup import DedupConfig

_MASK64 = (1 << 64) - 1
# Multiplier of the polynomial byte hash: odd (so it is invertible modulo 2**64) and with no
# structure in its bits; the golden-ratio constant used by splitmix64.
_POLY = 0x9E3779B97F4A7C15
_POLY_INV = pow(_POLY, -1, 1 << 64)
# Shingles per block of the (hashes x shingles) matrix: 112 x 4096 x 8 bytes = 3.7 MB.
_CHUNK = 4096
# Normal-form bytes handled per batch: large enough that numpy's per-call cost is spread
# over many documents, small enough that the word and shingle index arrays stay small.
_GROUP_BYTES = 1 << 18

# datatrove's PUNCTUATION: ASCII punctuation, some typographic and CJK marks, and the control
# characters other than tab and newline (which the whitespace step handles). U+FF11
# (fullwidth "1") is in its set; digits are replaced by "0" before this step, so it never
# reaches it.
PUNCTUATION = (
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    "\xab\xb4\xbb\u2013\u2014\u2019\u201c\u201d\u201e\u2026\u2236\u2501\u25ba\u3001\u3002"
    "\u3008\u3009\u300a\u300b\u300c\u300d\u3010\u3011\uff01\uff05\uff08\uff09\uff0c\uff0e"
    "\uff11\uff1a\uff1b\uff1f\uff5e" + "".join(map(chr, [*range(0, 9), *range(11, 32), *range(127, 160)]))
)
_PUNCT_TABLE = str.maketrans(PUNCTUATION, " " * len(PUNCTUATION))
# For str patterns, \d is Unicode category Nd, the same as datatrove's \p{Nd}.
_NUMBER = re.compile(r"\d+(?:[.,\u060c\u066b\u2396\u2397\u2398]\d+)?")
# The same three steps for ASCII text, on bytes: several times faster than on str.
_ASCII_PUNCT = "".join(c for c in PUNCTUATION if c < "\x80").encode("ascii")
_ASCII_PUNCT_TABLE = bytes.maketrans(_ASCII_PUNCT, b" " * len(_ASCII_PUNCT))
_ASCII_NUMBER = re.compile(rb"[0-9]+(?:[.,][0-9]+)?")


def threshold_estimate(bands: int, rows: int) -> float:
    """The Jaccard similarity at which a pair becomes a candidate with probability ~0.5.

    ``(1 / bands) ** (1 / rows)``: about 0.72 for 14 x 8.
    """
    return float((1.0 / bands) ** (1.0 / rows))


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """Probability that two documents with Jaccard similarity ``s`` share a band key.

    ``1 - (1 - s**rows) ** bands``. For 14 x 8 it is about 0.92 at s = 0.8, 0.56 at 0.7,
    0.21 at 0.6 and 0.05 at 0.5: pairs above 0.8 are reliably found, pairs below 0.5
    rarely. Raise ``bands`` for recall, raise ``rows`` for precision.
    """
    return float(1.0 - (1.0 - s**rows) ** bands)


@functools.cache
def _mark_table() -> dict[int, None]:
    # Built on first use (about 0.1 s): only text with non-ASCII characters needs it.
    return {c: None for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Mn"}


def normalise(text: str) -> str:
    """The dedup normal form of ``text``: its words, separated by single spaces."""
    return _normal_bytes(text).decode("utf-8")


def _normal_bytes(text: str) -> bytes:
    """UTF-8 of ``normalise(text)``, which is what gets hashed."""
    if text.isascii():
        # Nothing to decompose and no marks; bytes.lower/translate/split agree with the str
        # methods on ASCII (the control characters str.split also splits on are punctuation).
        data = _ASCII_NUMBER.sub(b"0", text.encode("ascii").lower()).translate(_ASCII_PUNCT_TABLE)
        return b" ".join(data.split())
    # str.split() splits on exactly the characters datatrove's \s+ matches (str.isspace).
    text = " ".join(_NUMBER.sub("0", text.lower()).translate(_PUNCT_TABLE).split())
    if not text.isascii():
        text = " ".join(unicodedata.normalize("NFD", text).translate(_mark_table()).split())
    return text.encode("utf-8")


def exact_key(text: str) -> bytes:
    """16-byte BLAKE2b digest of ``normalise(text)``: equal keys mean exact duplicates."""
    return hashlib.blake2b(_normal_bytes(text), digest_size=16).digest()


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Share of signature positions that agree: an unbiased estimate of Jaccard similarity.

    Its standard error is ``sqrt(J * (1 - J) / len(sig))``, at most 0.047 for 112 hashes.
    """
    if sig_a.shape != sig_b.shape or sig_a.ndim != 1 or sig_a.size == 0:
        raise ValueError(f"signatures must be non-empty 1-d arrays of one shape, got {sig_a.shape} and {sig_b.shape}")
    return float(np.count_nonzero(sig_a == sig_b)) / sig_a.size


def _splitmix64(seed: int, count: int) -> list[int]:
    """``count`` pseudo-random 64-bit integers from ``seed``: pure Python, stable forever."""
    out, state = [], seed
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        out.append(z ^ (z >> 31))
    return out


_U32, _U30, _U27, _U31 = np.uint64(32), np.uint64(30), np.uint64(27), np.uint64(31)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array: every input bit reaches every output bit."""
    x ^= x >> _U30
    x *= _MIX1
    x ^= x >> _U27
    x *= _MIX2
    x ^= x >> _U31
    return x


class MinHasher:
    """Signatures and band keys for one ``DedupConfig``; build it once and reuse it.

    ``signatures`` / ``band_keys_many`` process many documents per numpy call and are the
    fast path; ``signature`` / ``band_keys`` are the same computation for one document.
    An instance caches a table of powers, so give each thread its own.
    """

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.num_hashes = cfg.bands * cfg.rows
        k = self.num_hashes
        rand = _splitmix64(cfg.seed, 3 * k + cfg.bands)
        # Multiply-shift needs an odd multiplier to be a permutation of the 64-bit space.
        self._a = np.array([r | 1 for r in rand[:k]], dtype=np.uint64)
        self._b = np.array(rand[k : 2 * k], dtype=np.uint64).reshape(k, 1)
        # One 64-bit weight per signature value and one offset per band for the band keys.
        self._band_w = np.array(rand[2 * k : 3 * k], dtype=np.uint64).reshape(cfg.bands, cfg.rows)
        self._band_c = np.array(rand[3 * k :], dtype=np.uint64)
        self._pow = np.ones(1, dtype=np.uint64)
        self._pow_inv = np.ones(1, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature of ``text``: uint32, shape ``(bands * rows,)``.

        Text whose normal form is empty has no shingles; its signature is all 0xFFFFFFFF
        (the minimum of nothing), and it gets no band keys.
        """
        normal = _normal_bytes(text)
        best = np.full(self.num_hashes, _MASK64, dtype=np.uint64)
        if normal:
            data = np.frombuffer(normal, dtype=np.uint8)
            starts, ends = self._doc_spans(data)
            for i in range(0, len(starts), _CHUNK):
                block = self._permuted(data, starts[i : i + _CHUNK], ends[i : i + _CHUNK])
                np.minimum(best, block.min(axis=1), out=best)
        # x >> 32 is monotone, so the high half of the minimum is the minimum of the high halves.
        return (best >> _U32).astype(np.uint32)

    def band_keys(self, text: str) -> np.ndarray:
        """One 64-bit key per band: uint64, shape ``(bands,)``.

        Documents sharing a key in the same band are candidates. Keys are never 0; a row of
        zeros marks a document without shingles (empty normal form), which never clusters.
        """
        return self.band_keys_of(self.signature(text))

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """``signature`` of every text: uint32, shape ``(len(texts), bands * rows)``."""
        best = np.full((len(texts), self.num_hashes), _MASK64, dtype=np.uint64)
        group: list[bytes] = []
        first = size = 0
        for i, text in enumerate(texts):
            normal = _normal_bytes(text)
            group.append(normal)
            size += len(normal) + 1
            if size >= _GROUP_BYTES:
                self._fill(best, first, group)
                group, first, size = [], i + 1, 0
        if group:
            self._fill(best, first, group)
        return (best >> _U32).astype(np.uint32)

    def band_keys_many(self, texts: Sequence[str]) -> np.ndarray:
        """``band_keys`` of every text: uint64, shape ``(len(texts), bands)``."""
        return self.band_keys_of(self.signatures(texts))

    def band_keys_of(self, sigs: np.ndarray) -> np.ndarray:
        """Band keys of signatures from ``signature`` (one) or ``signatures`` (a matrix)."""
        values = sigs.astype(np.uint64).reshape(*sigs.shape[:-1], self.cfg.bands, self.cfg.rows)
        # A random linear form of the band's values: two different bands of values collide
        # with probability about 2**-63; the mixer then spreads the bits.
        keys = _mix64((values * self._band_w).sum(axis=-1, dtype=np.uint64) + self._band_c)
        keys[keys == 0] = 1
        keys[(sigs == 0xFFFFFFFF).all(axis=-1)] = 0
        return keys

    def _fill(self, best: np.ndarray, first: int, group: list[bytes]) -> None:
        """Lower ``best[first + d]`` to the permuted shingle minima of document ``group[d]``."""
        # A newline never occurs in a normal form, so it separates the documents.
        data = np.frombuffer(b"\n".join(group), dtype=np.uint8)
        doc, starts, ends = self._group_spans(data, np.array([len(g) for g in group], dtype=np.int64))
        for i in range(0, len(doc), _CHUNK):
            d = doc[i : i + _CHUNK]
            heads = np.flatnonzero(np.concatenate(([True], d[1:] != d[:-1])))
            block = self._permuted(data, starts[i : i + _CHUNK], ends[i : i + _CHUNK])
            mins = np.minimum.reduceat(block, heads, axis=1)
            rows = first + d[heads]
            best[rows] = np.minimum(best[rows], mins.T)

    def _doc_spans(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Byte start and end of every shingle of one non-empty normal form."""
        gaps = np.flatnonzero(data == 0x20)
        n_words, n = len(gaps) + 1, self.cfg.ngram
        if n_words < n:
            # Too short for one n-gram: the whole text is the single shingle, so that short
            # documents (titles, one-line notices) are still deduplicated against each other.
            return np.zeros(1, dtype=np.int64), np.array([len(data)], dtype=np.int64)
        return np.concatenate(([0], gaps[: n_words - n] + 1)), np.concatenate((gaps[n - 1 :], [len(data)]))

    def _group_spans(self, data: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document, byte start and byte end of every shingle in newline-joined normal forms.

        The same spans as ``_doc_spans`` gives each document, found for all at once.
        """
        # Only the space and the separating newline are <= 0x20 in normal forms.
        gaps = np.flatnonzero(data <= 0x20)
        word_start = np.concatenate(([0], gaps + 1))
        word_end = np.concatenate((gaps, [len(data)]))
        last_word = np.concatenate((np.searchsorted(gaps, np.flatnonzero(data == 0x0A)), [len(gaps)]))
        first_word = np.concatenate(([0], last_word[:-1] + 1))
        n_words = last_word - first_word + 1
        # Fewer words than ngram: the whole text is the single shingle (see _doc_spans).
        width = np.minimum(n_words, self.cfg.ngram)
        count = np.where(lengths == 0, 0, n_words - width + 1)
        doc = np.repeat(np.arange(len(lengths)), count)
        offset = np.cumsum(count) - count
        word = first_word[doc] + np.arange(len(doc)) - offset[doc]
        return doc, word_start[word], word_end[word + width[doc] - 1]

    def _permuted(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Every permutation of every shingle's hash: uint64, shape (hashes, shingles).

        Rows are permutations so that each document's shingles are contiguous in a row,
        which makes the per-document minimum about twice as fast as the transposed layout.
        """
        lo, hi = int(starts[0]), int(ends[-1])
        pw, pw_inv = self._powers(hi - lo + 1)
        # prefix[j] = sum of byte[k] * P**k over the chunk's first j bytes (mod 2**64).
        prefix = np.zeros(hi - lo + 1, dtype=np.uint64)
        np.cumsum(data[lo:hi] * pw[: hi - lo], out=prefix[1:])
        rel = starts - lo
        # Multiplying by P**-start moves each span to position 0: equal spans, equal hashes.
        shingles = _mix64((prefix[ends - lo] - prefix[rel]) * pw_inv[rel])
        perm = np.multiply.outer(self._a, shingles)
        perm += self._b
        return perm

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """P**k and P**-k (mod 2**64) for k < n, grown on demand."""
        if len(self._pow) < n:
            size = max(n, 2 * len(self._pow), 1 << 16)
            self._pow, self._pow_inv = np.ones(size, dtype=np.uint64), np.ones(size, dtype=np.uint64)
            np.cumprod(np.full(size - 1, _POLY, dtype=np.uint64), out=self._pow[1:])
            np.cumprod(np.full(size - 1, _POLY_INV, dtype=np.uint64), out=self._pow_inv[1:])
        return self._pow, self._pow_inv


def find_clusters(band_keys: np.ndarray, has_keys: np.ndarray | None = None) -> np.ndarray:
    """Cluster representative of every document: int64, shape ``(n_docs,)``.

    ``band_keys`` is ``(n_docs, bands)`` uint64 in document order (rows of ``band_keys``).
    Two documents are linked when they share a non-zero key in the same band; clusters are
    the connected components of these links, so near-duplicates chain transitively. The
    representative is the lowest index in the component; document ``i`` is a
    near-duplicate to drop iff ``rep[i] != i``. ``has_keys`` (bool, ``(n_docs,)``) excludes
    documents; by default rows that are all zero are excluded.

    Memory is O(n_docs + links): each band column is sorted (stable) and every run of equal
    keys is linked to its first document; components come from vectorised min-label
    hooking with pointer jumping, which converges in a few rounds.
    """
    keys = np.asarray(band_keys)
    if keys.ndim != 2:
        raise ValueError(f"band_keys must be 2-d (n_docs, bands), got shape {keys.shape}")
    n_docs = keys.shape[0]
    has_keys = keys.any(axis=1) if has_keys is None else np.asarray(has_keys, dtype=bool)
    if has_keys.shape != (n_docs,):
        raise ValueError(f"has_keys must have shape ({n_docs},), got {has_keys.shape}")
    sources, targets = [], []
    for band in range(keys.shape[1]):
        column = keys[:, band]
        docs = np.flatnonzero(has_keys & (column != 0))
        if len(docs) < 2:
            continue
        # Stable sort: within a run of equal keys documents stay in ascending index order.
        order = np.argsort(column[docs], kind="stable")
        sorted_keys, sorted_docs = column[docs][order], docs[order]
        head = np.ones(len(docs), dtype=bool)
        head[1:] = sorted_keys[1:] != sorted_keys[:-1]
        if head.all():
            continue
        run_start = np.maximum.accumulate(np.where(head, np.arange(len(docs)), 0))
        member = ~head
        sources.append(sorted_docs[run_start[member]])
        targets.append(sorted_docs[member])
    parent = np.arange(n_docs, dtype=np.int64)
    if not sources:
        return parent
    u, v = np.concatenate(sources), np.concatenate(targets)
    # Invariant: parent[x] <= x, so a root is the smallest index of its tree.
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            return parent
        pu, pv = pu[differ], pv[differ]
        low = np.minimum(pu, pv)
        np.minimum.at(parent, pu, low)
        np.minimum.at(parent, pv, low)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
