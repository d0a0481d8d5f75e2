"""Gopher's n-gram repetition measures of one document's words, as datatrove computes them.

``top_ngram_chars``: characters of the most frequent word n-gram (joined by spaces) times
its count. ``repeated_ngram_chars``: datatrove's ``find_all_duplicate``, where an n-gram is
the n words concatenated *without* a separator, so ``ab a`` and ``a ba`` are the same n-gram,
and the walk over the n-grams jumps n words ahead after each repeat.

Speed: these rules run for n = 2..10 on every document that gets that far, and building or
hashing each n-gram as a Python tuple or string cost most of the filter chain's time. Here
every n-gram of a document becomes one integer at once, in numpy, and a sort finds the
equal ones:

* top n-gram: the words' ids ranked within the document and combined in mixed radix, so
  equal keys are exactly equal word tuples (equal " ".join n-grams, since words hold no
  whitespace). For n = 3, 4 a bound from the smaller n's top count usually shows that the
  rule cannot fire, and nothing is sorted;
* duplicated n-gram: a polynomial hash (modulo 2**64) of the concatenated characters, all
  n sorted together. Equal strings always hash equal, so a hash seen once is a new n-gram,
  which is almost every one in prose; a repeated hash is compared as a string before the
  walk trusts it, and on a collision the plain string walk gives the answer.

So every result is exact, not probable: the verdicts are those of the plain versions
(``tests/test_filters_speed.py`` compares them with the frozen reference).
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import compress
from operator import ne

import numpy as np

# Any odd multiplier is invertible modulo 2**64, so a substring's hash can be moved to offset
# 0 whatever its position. This one (the golden-ratio constant) mixes the bits well.
_BASE = 0x9E3779B97F4A7C15
_BASE_INV = pow(_BASE, -1, 1 << 64)
# Powers kept between documents, up to 1 Mi characters (16 MB); longer texts compute their own.
_POWERS_KEPT = 1 << 20
_powers: tuple[np.ndarray, np.ndarray] = (np.ones(1, np.uint64), np.ones(1, np.uint64))
# Mixed-radix keys stay below this, so int64 arithmetic never wraps.
_KEY_LIMIT = 1 << 62
# The duplicated-n-gram hashes of all n are sorted together, n in their low bits.
_N_BITS = 4
# The table that finds the positions of repeated hashes is indexed by their top 16 bits
# (64 KB, refilled per document; the low bits hold n).
_TABLE_BITS = 16
_TABLE_SHIFT = np.uint64(64 - _TABLE_BITS)


class NgramIndex:
    """One document's words, prepared once for every n of the n-gram rules."""

    __slots__ = ("_ids", "_ranks", "_radix", "_keys", "_keys_n", "_bound", "_cum", "_cum_list", "_cat", "_dup_ns", "_candidates", "_top_count")

    def __init__(self, ids: np.ndarray, lengths: np.ndarray, cat: str, dup_ns: tuple[int, ...] = ()) -> None:
        """``ids``: an int64 per word, equal exactly when the words are; ``lengths``: their
        lengths; ``cat``: the words concatenated; ``dup_ns``: the n that
        ``repeated_ngram_chars`` will be asked for (prepared together on the first call)."""
        self._ids = ids
        self._ranks = self._keys = ids  # set by the first top_ngram_chars
        self._radix = self._bound = self._keys_n = 0
        # Word i spans cum[i]:cum[i+1] of cat.
        cum = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(lengths, out=cum[1:])
        self._cum = cum
        self._cum_list: list[int] = []
        self._cat = cat
        self._dup_ns = dup_ns
        self._candidates: dict[int, tuple[list[int], list[int]]] | None = None
        self._top_count = 0  # the top count of the last n computed exactly

    def top_ngram_chars(self, n: int, size: int, frac: float) -> int:
        """Characters of the most common n-gram (joined by spaces) times its count.

        Needs at least ``n`` words; asked for increasing n (each n extends the keys of
        n - 1). Among equally frequent n-grams the first seen counts, as in datatrove's
        Counter.most_common. Returns a bound instead when it shows that the value cannot
        exceed ``frac`` of ``size`` (the caller's test, so the verdict is the same): an
        n-gram occurs at most as often as its first n' words, so at most the top count of a
        smaller n' already computed, and spans at most the longest n words of the text.
        """
        if self._top_count:
            longest = int((self._cum[n:] - self._cum[:-n]).max()) + n - 1
            bound = self._top_count * longest
            if bound / size <= frac:
                return bound
        if self._keys_n == 0:
            # The ids are small (one per distinct word of a cache's vocabulary): used as they
            # are, the keys of n = 2, 3 fit int64; larger n are renumbered when needed.
            self._ranks = self._keys = self._ids
            self._radix = self._bound = int(self._ids.max()) + 1  # every key is below the bound
            self._keys_n = 1
        while self._keys_n < n:
            keys = self._keys
            if self._bound * self._radix >= _KEY_LIMIT:
                # Renumber the distinct keys 0..K-1 (K <= words): same equalities, smaller numbers.
                distinct = np.unique(keys)
                keys = np.searchsorted(distinct, keys)
                self._bound = len(distinct)
            self._keys = keys[:-1] * self._radix + self._ranks[self._keys_n :]
            self._bound *= self._radix
            self._keys_n += 1
        keys = self._keys
        ordered = np.sort(keys)
        edges = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1], [True])))
        counts = edges[1:] - edges[:-1]
        count = int(counts.max())
        if count == 1:
            first = 0  # all distinct: the first n-gram is the first seen
        else:
            # The first position holding any of the most frequent keys starts the first-seen one.
            top = ordered[edges[:-1][counts == count]]
            where = np.minimum(np.searchsorted(top, keys), len(top) - 1)
            first = int(np.argmax(top[where] == keys))
        self._top_count = count
        return (int(self._cum[first + n] - self._cum[first]) + n - 1) * count

    def repeated_ngram_chars(self, n: int, size: int, frac: float) -> int:
        """datatrove's find_all_duplicate: characters of the n-grams the walk finds repeated.

        Returns as soon as the total alone exceeds ``frac`` of ``size`` (the caller's test,
        so the verdict is the same).
        """
        if self._candidates is None:
            self._candidates = self._find_candidates()
        if n not in self._candidates:
            return 0
        candidates, firsts = self._candidates[n]
        return self._walk(n, size, frac, candidates, firsts)

    def _find_candidates(self) -> dict[int, tuple[list[int], list[int]]]:
        """For each n, the positions whose n-gram hash occurred before, and where it first did.

        The hash of an n-gram is that of its characters (see the module docstring), with n
        in its low bits so that one sort covers every n.
        """
        cum = self._cum
        ns = [n for n in self._dup_ns if len(cum) - n >= 2]  # at least two n-grams
        if not ns:
            return {}
        codes = np.frombuffer(self._cat.encode("utf-32-le", "surrogatepass"), np.uint32)
        powers, inverse = _power_tables(len(codes) + 1)
        # prefix[k] = sum of code[j] * BASE**j for j < k, so the hash of cat[a:b] moved to
        # offset 0 is (prefix[b] - prefix[a]) * BASE**-a.
        prefix = np.zeros(len(codes) + 1, np.uint64)
        np.cumsum(codes * powers[: len(codes)], out=prefix[1:])
        counts = [len(cum) - n for n in ns]
        start = np.concatenate([cum[:m] for m in counts])
        end = np.concatenate([cum[n:] for n in ns])
        tag = np.repeat(np.array(ns, np.uint64), counts)
        # Mixed with the length; equal strings of equal n always get equal keys.
        keys = ((prefix[end] - prefix[start]) * inverse[start] ^ (end - start).astype(np.uint64)) << np.uint64(_N_BITS) | tag
        ordered = np.sort(keys)
        same = ordered[1:] == ordered[:-1]
        if not same.any():
            return {}  # no hash repeats, so no n-gram does
        # Only the n-grams whose key occurs more than once ("members", few in prose) matter:
        # the first of each key is where it first occurred, the others are candidates. A
        # table indexed by the keys' top bits narrows the search to a few positions cheaply.
        repeated = ordered[1:][same]
        table = np.zeros(1 << _TABLE_BITS, bool)
        table[repeated >> _TABLE_SHIFT] = True
        maybe = np.flatnonzero(table[keys >> _TABLE_SHIFT])
        where = np.minimum(np.searchsorted(repeated, keys[maybe]), len(repeated) - 1)
        members = maybe[repeated[where] == keys[maybe]]
        member_keys = keys[members]
        order = np.argsort(member_keys, kind="stable")  # positions stay in order within a key
        same = member_keys[order][1:] == member_keys[order][:-1]
        run_start = np.arange(len(order))
        run_start[1:][same] = 0
        np.maximum.accumulate(run_start, out=run_start)
        later = np.flatnonzero(same) + 1  # sorted members that are not the first of their key
        candidates = members[order[later]]
        firsts = members[order[run_start[later]]]
        by_position = np.argsort(candidates)
        candidate_list = candidates[by_position].tolist()
        first_list = firsts[by_position].tolist()
        # The keys of each n are one block of the concatenation: cut the candidates back into n.
        found: dict[int, tuple[list[int], list[int]]] = {}
        low = 0
        base = 0
        for n, count in zip(ns, counts):
            high = bisect_left(candidate_list, base + count, low)
            if high > low:
                found[n] = ([c - base for c in candidate_list[low:high]], [f - base for f in first_list[low:high]])
            low = high
            base += count
        return found

    def _walk(self, n: int, size: int, frac: float, candidates: list[int], firsts: list[int]) -> int:
        """datatrove's walk, visiting only the positions whose hash occurred before ("candidates").

        Every other position's n-gram is new, so it is only remembered (unless a jump skipped
        it). A visited candidate is compared as a string with the first n-gram of its hash;
        when they differ (a collision) the string walk gives the answer instead. A collision
        at a position the walk never visits cannot change what it sees: a later candidate it
        would mislead is then compared with the wrong first n-gram, and caught.
        """
        if not self._cum_list:
            self._cum_list = self._cum.tolist()
        cum = self._cum_list
        cat = self._cat
        m = len(cum) - n
        not_first = set(candidates)
        skipped_first: set[int] = set()  # first positions of n-grams a jump skipped
        remembered: set[int] = set()  # first positions of n-grams remembered at a candidate
        repeated = 0
        walk_from = 0
        for pos, first in zip(candidates, firsts):
            if pos < walk_from:
                continue
            begin, stop = cum[pos], cum[pos + n]
            if cat[begin:stop] != cat[cum[first] : cum[first + n]]:
                return repeated_ngram_chars_exact(cat, cum, n, size, frac)
            if first in remembered or first not in skipped_first:
                repeated += stop - begin
                if repeated / size > frac:
                    return repeated
                walk_from = pos + n
                skipped_first.update(q for q in range(pos + 1, min(walk_from, m)) if q not in not_first)
            else:
                remembered.add(first)
        return repeated


def repeated_ngram_chars_exact(cat: str, cum: list[int], n: int, size: int, frac: float) -> int:
    """``NgramIndex.repeated_ngram_chars`` over the n-gram strings themselves (the slow, sure way).

    datatrove walks the n-grams left to right: one seen before (at a walked position) adds its
    length and the walk jumps n words ahead; otherwise it is remembered and the walk moves one
    word on. Here only the positions whose n-gram occurred earlier at all ("candidates") are
    visited in Python; every other position is new by construction, remembered unless a jump
    skipped it. ``cum`` holds the word offsets in ``cat``.
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


def _power_tables(length: int) -> tuple[np.ndarray, np.ndarray]:
    """``BASE**i`` and ``BASE**-i`` modulo 2**64 for i < length (at least)."""
    global _powers
    kept = _powers
    if len(kept[0]) >= length:
        return kept
    size = max(length, min(2 * len(kept[0]), _POWERS_KEPT))
    tables = []
    for base in (_BASE, _BASE_INV):
        factors = np.full(size, base, np.uint64)
        factors[0] = 1
        tables.append(np.cumprod(factors))  # wraps modulo 2**64, as intended
    computed = (tables[0], tables[1])
    if size <= _POWERS_KEPT:
        _powers = computed
    return computed
