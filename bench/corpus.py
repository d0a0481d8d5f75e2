"""Benchmark corpus for the curation stage: real English text from this machine, made to look crawled.

No downloads: the text is the docstrings and comments of every ``.py`` file under the
running Python's standard library and site-packages (torch, transformers, numpy ... carry
many megabytes of English prose), the text files under ``/usr/share/doc`` and the English
man pages under ``/usr/share/man/man*``. Only paragraphs that read as prose are kept
(``is_prose``), each once; they are grouped, in source order, into documents of about
1-8 KB, and the documents are shuffled.

A web crawl is not clean prose, so the stream is then mixed the way a crawl is mixed
(fractions are of documents, drawn per document from one seeded generator):

* ~10 % exact duplicates of an earlier document (mirrors, syndicated pages);
* ~10 % near duplicates: an earlier document with 5-15 % of its words replaced, deleted or
  inserted, in one to four contiguous runs — edits to real near-duplicate pages (dates,
  headers, a changed paragraph) are clustered, and scattered edits would break almost
  every 5-gram shingle, which no MinHash setting is meant to catch;
* ~5 % junk of the kinds the Gopher, C4 and FineWeb filters were written to remove.

When the real text is shorter than the target, its paragraphs are reshuffled into new
documents (a new pass) only as far as needed. The output is deterministic for a given
seed, Python and set of installed packages; ``sha256`` in the returned stats identifies it.

``dest/corpus.jsonl`` holds ``{"id", "text"}`` per line; ``dest/corpus.labels.jsonl`` says,
per id, which kind it is and (for duplicates) the id it was copied from, so a dedup result
can be scored.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import math
import random
import re
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

DOC_DIR = Path("/usr/share/doc")
MAN_DIR = Path("/usr/share/man")
# Eight digits: room for 100M documents, and ids still sort as strings in corpus order.
ID_WIDTH = 8
# Document sizes are drawn log-uniformly in this range: most web pages after extraction
# are a few KB, and the filters' ratios behave differently on short and long documents.
MIN_DOC_BYTES = 1024
MAX_DOC_BYTES = 8192
EXACT_DUP_FRACTION = 0.10
NEAR_DUP_FRACTION = 0.10
JUNK_FRACTION = 0.05
# Changelogs of big packages run to megabytes; a cap keeps one package from dominating.
MAX_FILE_BYTES = 2_000_000
# Plain-text documentation under /usr/share/doc; html, sources and images are left out.
_DOC_SUFFIXES = {"", ".txt", ".md", ".rst", ".Debian", ".gz"}
_PRAGMA = re.compile(r"^(noqa|type:|pragma|pylint:|fmt:|isort:|mypy:|-\*-|!)", re.IGNORECASE)
_RULE = re.compile(r"^[\s#=\-*_~+]*$")


# ---------------------------------------------------------------------------------------------
# Extraction: one list of paragraphs per source file.


def _python_paragraphs(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    if len(raw) > 4 * MAX_FILE_BYTES:
        return []
    paragraphs: list[str] = []
    try:
        tree = ast.parse(raw)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    paragraphs.extend(_split_blank(doc))
    block: list[str] = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            body = stripped.lstrip("#").strip()
            if body and not _PRAGMA.match(body) and not _RULE.match(body):
                block.append(body)
                continue
        if block:
            paragraphs.append("\n".join(block))
            block = []
    if block:
        paragraphs.append("\n".join(block))
    return paragraphs


_WORDLIKE = re.compile(r"^[(\"'“‘]?[A-Za-z][A-Za-z'’-]*[.,;:!?)\"'”’]*$")
_SYMBOLS = frozenset("{}[]<>=_/\\|#*`$@^~%")
_STOP_WORDS = frozenset({"the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "be", "with", "as", "this"})


def is_prose(paragraph: str) -> bool:
    """Whether a paragraph reads as running English text rather than code, a table or a log.

    Most comments, docstrings and changelogs are not prose (on this machine fewer than
    one document in ten of them passes FineWeb's filters); a crawl after HTML extraction
    mostly is, and the benchmark should filter and dedup the latter. The thresholds keep
    about 47 MB of 280 MB, and about 60 % of the documents built from it pass the filters.
    """
    words = paragraph.split()
    if len(words) < 6 or not paragraph.rstrip().endswith((".", "!", "?", ":")):
        return False
    if sum(1 for w in words if _WORDLIKE.match(w)) < 0.8 * len(words):
        return False
    if sum(1 for ch in paragraph if ch in _SYMBOLS) > 0.02 * len(paragraph):
        return False
    return sum(1 for w in words if w.lower() in _STOP_WORDS) >= 0.06 * len(words)


def _split_blank(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read_text(path: Path) -> str | None:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read(MAX_FILE_BYTES)
        else:
            with path.open("rb") as fh:
                raw = fh.read(MAX_FILE_BYTES)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _doc_paragraphs(path: Path) -> list[str]:
    text = _read_text(path)
    return _split_blank(text.replace("\r\n", "\n")) if text else []


_ROFF_FONT = re.compile(r"\\f(\(..|\[[^\]]*\]|.)")
_ROFF_SIZE = re.compile(r"\\s[+-]?\d+")
_ROFF_NAMED = {
    r"\-": "-", r"\(em": "—", r"\(en": "–", r"\(aq": "'", r"\(lq": '"', r"\(rq": '"',
    r"\(bu": "•", r"\(co": "©", r"\e": "\\", r"\&": "", r"\|": "", r"\^": "", r"\ ": " ", r"\~": " ",
}  # fmt: skip
_ROFF_OTHER = re.compile(r"\\(\(..|\*\(..|\*\[[^\]]*\]|\*.|\[[^\]]*\]|[a-zA-Z])")
_ROFF_BREAK = {"PP", "LP", "P", "TP", "IP", "HP", "br", "sp", "RS", "RE", "nf", "fi", "SH", "SS", "TH", "EX", "EE"}
_ROFF_INLINE = {"B", "I", "R", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB", "UR", "MT", "Nm", "Ar", "Fl"}


def _roff_inline(text: str) -> str:
    text = _ROFF_FONT.sub("", text)
    text = _ROFF_SIZE.sub("", text)
    for code, repl in _ROFF_NAMED.items():
        text = text.replace(code, repl)
    return _ROFF_OTHER.sub("", text)


def _man_paragraphs(path: Path) -> list[str]:
    """Rough roff-to-text: enough to turn a man page into the prose a reader sees."""
    text = _read_text(path)
    if not text:
        return []
    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"', '\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, args = line[1:].strip().partition(" ")
            if macro in _ROFF_BREAK:
                flush()
                if macro in ("SH", "SS", "IP", "TP") and args:
                    heading = _roff_inline(args.replace('"', "")).strip()
                    if heading:
                        paragraphs.append(heading)
            elif macro in _ROFF_INLINE and args:
                current.append(_roff_inline(args.replace('"', "")).strip())
            continue
        line = _roff_inline(line).strip()
        if line:
            current.append(line)
        else:
            flush()
    flush()
    return [p for p in paragraphs if p]


def _extract(job: tuple[str, str]) -> list[str]:
    kind, name = job
    path = Path(name)
    if kind == "py":
        paragraphs = _python_paragraphs(path)
    elif kind == "man":
        paragraphs = _man_paragraphs(path)
    else:
        paragraphs = _doc_paragraphs(path)
    return [p for p in paragraphs if is_prose(p)]


def default_sources() -> list[tuple[str, Path]]:
    """(label, root) of every text source this machine offers, in a fixed order."""
    paths = sysconfig.get_paths()
    roots: list[tuple[str, Path]] = [("stdlib", Path(paths["stdlib"]))]
    for key in ("purelib", "platlib"):
        root = Path(paths[key])
        if all(root != r for _, r in roots):
            roots.append(("site-packages", root))
    roots.append(("doc", DOC_DIR))
    roots.append(("man", MAN_DIR))
    return roots


def _jobs(label: str, root: Path) -> list[tuple[str, str]]:
    if not root.is_dir():
        return []
    if label == "man":
        files = [p for d in sorted(root.glob("man*")) for p in sorted(d.rglob("*")) if p.is_file()]
        return [("man", str(p)) for p in files]
    if label == "doc":
        files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()]
        picked = []
        for p in files:
            inner = Path(p.stem).suffix if p.suffix == ".gz" else ""
            if p.suffix in _DOC_SUFFIXES and inner in _DOC_SUFFIXES:
                picked.append(("doc", str(p)))
        return picked
    # Under stdlib, site-packages is a subfolder on some layouts; it is its own source.
    files = [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.relative_to(root).parts]
    return [("py", str(p)) for p in files if p.is_file()]


def collect_paragraphs(sources: Sequence[tuple[str, Path]], workers: int = 2) -> tuple[list[str], dict[str, int]]:
    """The prose paragraphs of all sources, in source order, each once, and the bytes each
    source gave. Repeats (licence headers, templated man pages) are dropped here so that
    every duplicate in the corpus is one the mix put there and the labels record."""
    paragraphs: list[str] = []
    seen: set[str] = set()
    source_bytes: dict[str, int] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for label, root in sources:
            jobs = _jobs(label, root)
            # map keeps the input order, so parallel extraction stays deterministic.
            for found in pool.map(_extract, jobs, chunksize=64):
                for para in found:
                    if para not in seen:
                        seen.add(para)
                        paragraphs.append(para)
                        source_bytes[label] = source_bytes.get(label, 0) + len(para.encode())
    return paragraphs, source_bytes


# ---------------------------------------------------------------------------------------------
# Documents and the crawl-like mix.


def _doc_size(rng: random.Random) -> int:
    return int(math.exp(rng.uniform(math.log(MIN_DOC_BYTES), math.log(MAX_DOC_BYTES))))


def group_documents(paragraphs: Sequence[str], rng: random.Random) -> Iterator[str]:
    """Consecutive paragraphs joined until each document reaches its drawn size."""
    target = _doc_size(rng)
    parts: list[str] = []
    size = 0
    for para in paragraphs:
        if len(para) > MAX_DOC_BYTES:
            # A huge paragraph (a changelog, a table) is cut at line ends, not mid-line.
            yield from _cut_lines(para, MAX_DOC_BYTES)
            continue
        parts.append(para)
        size += len(para) + 2
        if size >= target:
            yield "\n\n".join(parts)
            parts, size, target = [], 0, _doc_size(rng)
    if parts and size >= MIN_DOC_BYTES // 2:
        yield "\n\n".join(parts)


def _cut_lines(text: str, limit: int) -> Iterator[str]:
    chunk: list[str] = []
    size = 0
    for line in text.split("\n"):
        if chunk and size + len(line) > limit:
            yield "\n".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line) + 1
    if chunk:
        yield "\n".join(chunk)


def near_duplicate(text: str, rng: random.Random, vocabulary: Sequence[str]) -> str:
    """``text`` with 5-15 % of its words edited in one to four contiguous runs."""
    tokens = re.split(r"(\s+)", text)
    word_at = [i for i, t in enumerate(tokens) if t and not t.isspace()]
    if len(word_at) < 10:
        return text + " " + rng.choice(vocabulary)
    budget = max(1, round(len(word_at) * rng.uniform(0.05, 0.15)))
    runs = rng.randint(1, 4)
    for r in range(runs):
        length = budget // runs + (1 if r < budget % runs else 0)
        if length == 0:
            continue
        start = rng.randrange(0, max(1, len(word_at) - length))
        op = rng.choice(("replace", "delete", "insert"))
        for i in word_at[start : start + length]:
            if op == "replace":
                tokens[i] = rng.choice(vocabulary)
            elif op == "delete":
                tokens[i] = ""
            else:
                tokens[i] = tokens[i] + " " + rng.choice(vocabulary)
    return re.sub(r" {2,}", " ", "".join(tokens))


_LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
    "ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu "
    "fugiat nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt "
    "mollit anim id est laborum."
)
_COOKIE_LINES = [
    "This website uses cookies to improve your experience.",
    "By continuing to browse the site you agree to our use of cookies.",
    "Read our Privacy Policy and Cookie Policy for more information.",
    "We use cookies to personalise content and ads and to analyse our traffic.",
    "Please enable JavaScript in your browser to use this site.",
    "By using this site you accept the Terms of Use.",
    "Accept all cookies",
    "Manage preferences",
    "Copyright © {year} {brand}. All rights reserved.",
]
_MENU = [
    "Home", "About us", "Products", "Services", "Blog", "News", "Contact", "Login", "Sign up", "Cart",
    "FAQ", "Careers", "Support", "Pricing", "Shop", "Gallery", "Events", "Partners", "Search", "Sitemap",
]  # fmt: skip
_SPAM = [
    "cheap", "best", "buy", "online", "discount", "sale", "free", "shipping", "deals", "shoes", "watches",
    "replica", "luxury", "casino", "bonus", "loans", "viagra", "pills", "crypto", "download", "hd", "2024",
    "top", "review", "coupon", "outlet", "wholesale", "price", "official", "store", "new", "hot",
]  # fmt: skip
_BRANDS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne"]


def junk_document(rng: random.Random, vocabulary: Sequence[str]) -> tuple[str, str]:
    """(kind, text) of one document of a kind the quality filters exist to remove."""
    kind = rng.choice(("repeated_lines", "bullets", "lorem_ipsum", "cookie_banner", "menu", "keyword_spam"))
    n = rng.randint(20, 80)
    if kind == "repeated_lines":
        lines = [" ".join(rng.choices(vocabulary, k=rng.randint(6, 14))) + "." for _ in range(rng.randint(2, 5))]
        text = "\n".join(rng.choice(lines) for _ in range(n))
    elif kind == "bullets":
        text = "\n".join(f"{rng.choice('•-*')} " + " ".join(rng.choices(vocabulary, k=rng.randint(2, 8))) for _ in range(n))
    elif kind == "lorem_ipsum":
        text = "\n\n".join(_LOREM for _ in range(rng.randint(3, 12)))
    elif kind == "cookie_banner":
        brand, year = rng.choice(_BRANDS), rng.randint(2005, 2025)
        text = "\n".join(rng.choice(_COOKIE_LINES).format(year=year, brand=brand) for _ in range(rng.randint(6, 20)))
    elif kind == "menu":
        text = "\n".join(rng.choice(_MENU) for _ in range(n))
    else:
        text = "\n".join(" ".join(rng.choices(_SPAM, k=rng.randint(8, 20))) for _ in range(rng.randint(5, 30)))
    return kind, text


def build_corpus(
    dest: Path,
    target_bytes: int = 220_000_000,
    seed: int = 0,
    sources: Sequence[tuple[str, Path]] | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    """Write ``dest/corpus.jsonl`` (and its labels) of about ``target_bytes``; return its stats."""
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    started = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    sources = list(sources) if sources is not None else default_sources()
    paragraphs, source_bytes = collect_paragraphs(sources, workers=workers)
    if not paragraphs:
        raise ValueError(f"no text found under {', '.join(str(root) for _, root in sources)}")
    seconds_extract = time.perf_counter() - started

    rng = random.Random(seed)
    vocabulary = sorted({w for p in paragraphs[:20_000] for w in p.split() if w.isalpha() and len(w) < 15})

    def real_documents() -> Iterator[tuple[int, str]]:
        # Pass 0 keeps paragraphs in source order (coherent documents); later passes
        # reshuffle the paragraphs, so a repeat is new text, not a copy of an old document.
        pass_no = 0
        while True:
            if pass_no == 0:
                docs = list(group_documents(paragraphs, rng))
            else:
                shuffled = list(paragraphs)
                rng.shuffle(shuffled)
                docs = list(group_documents(shuffled, rng))
            rng.shuffle(docs)
            for doc in docs:
                yield pass_no, doc
            pass_no += 1

    kinds: dict[str, int] = {"real": 0, "exact_dup": 0, "near_dup": 0, "junk": 0}
    junk_kinds: dict[str, int] = {}
    real_ids: list[str] = []
    real_texts: list[str] = []
    digest = hashlib.sha256()
    written = 0
    passes = 0
    index = 0
    real = real_documents()
    corpus_path = dest / "corpus.jsonl"
    with corpus_path.open("wb") as out, (dest / "corpus.labels.jsonl").open("w", encoding="utf-8") as labels:
        while written < target_bytes:
            doc_id = f"{index:0{ID_WIDTH}d}"
            draw = rng.random()
            # Duplicates copy an earlier real document, as a crawler meets the copy after the original.
            if draw < JUNK_FRACTION:
                junk, text = junk_document(rng, vocabulary)
                junk_kinds[junk] = junk_kinds.get(junk, 0) + 1
                row = {"id": doc_id, "kind": "junk", "junk": junk}
            elif draw < JUNK_FRACTION + EXACT_DUP_FRACTION and real_ids:
                pick = rng.randrange(len(real_ids))
                text = real_texts[pick]
                row = {"id": doc_id, "kind": "exact_dup", "source": real_ids[pick]}
            elif draw < JUNK_FRACTION + EXACT_DUP_FRACTION + NEAR_DUP_FRACTION and real_ids:
                pick = rng.randrange(len(real_ids))
                text = near_duplicate(real_texts[pick], rng, vocabulary)
                row = {"id": doc_id, "kind": "near_dup", "source": real_ids[pick]}
            else:
                pass_no, text = next(real)
                passes = max(passes, pass_no + 1)
                real_ids.append(doc_id)
                real_texts.append(text)
                row = {"id": doc_id, "kind": "real"}
            line = json.dumps({"id": doc_id, "text": text}, ensure_ascii=False).encode() + b"\n"
            out.write(line)
            digest.update(line)
            written += len(line)
            kinds[row["kind"]] += 1
            labels.write(json.dumps(row) + "\n")
            index += 1

    return {
        "path": str(corpus_path),
        "labels_path": str(dest / "corpus.labels.jsonl"),
        "docs": index,
        "bytes": written,
        "sha256": digest.hexdigest(),
        "seed": seed,
        "kinds": kinds,
        "junk_kinds": dict(sorted(junk_kinds.items())),
        "passes": passes,
        "source_paragraphs": len(paragraphs),
        "source_bytes": source_bytes,
        "sources": {label: str(root) for label, root in sources},
        "python": sys.version.split()[0],
        "seconds_extract": round(seconds_extract, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="folder to write corpus.jsonl and corpus.labels.jsonl into")
    parser.add_argument("--mb", type=float, default=220.0, help="target size in MB (10^6 bytes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes for text extraction")
    args = parser.parse_args(argv)
    stats = build_corpus(args.dest, int(args.mb * 1_000_000), seed=args.seed, workers=args.workers)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
