"""``[ingest] split``: one big text file (a book, a manual, a log export) becomes many documents.

Real files on disk, real ingest runs; the splitter's guarantee (``pipeline.text_split``) is
checked on hand-made texts and as a property over generated ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.recipe import parse_recipe
from keys.digest import sha256_file
from pipeline.errors import ConfigError, DataError
from pipeline.html_text import html_to_text
from pipeline.ingest import IngestConfig, run_ingest
from pipeline.text_split import split_spans, split_text

WORDS = "the of and to in river stone window garden letter winter harbour lantern quiet morning".split()


def book(paragraphs: int, seed: int = 7) -> str:
    """A deterministic 'book': chapters of paragraphs of sentences, blank lines between paragraphs."""
    rng = random.Random(seed)
    out = []
    for i in range(paragraphs):
        if i % 40 == 0:
            out.append(f"Chapter {i // 40 + 1}")
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 18))).capitalize() + rng.choice(".!?") for _ in range(rng.randint(1, 6))]
        out.append(" ".join(sentences))
    # Irregular spacing on purpose: several blank lines, a whitespace-only line, CRLF, a trailing newline.
    return "\n\n".join(out[:10]) + "\n\n\n \t\n" + "\r\n\r\n".join(out[10:20]) + "\n\n" + "\n\n".join(out[20:]) + "\n"


def read_raw(out: Path) -> list[dict]:
    return pq.read_table(out / "raw.parquet").to_pylist()


def corpus(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    src = tmp_path / "src"
    for name, content in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return src


def assert_lossless(text: str, pieces: list[str], limit: int) -> None:
    """The stated guarantee: in-order slices, only whitespace between and around them, none too long."""
    pos = 0
    for piece in pieces:
        assert piece and not piece.isspace() and piece == piece.rstrip()
        assert len(piece) <= limit
        at = text.find(piece, pos)
        assert at >= 0, f"piece not found in order: {piece[:60]!r}"
        assert text[pos:at].strip() == "", f"non-whitespace lost before {piece[:60]!r}: {text[pos:at]!r}"
        # Only the spaces and tabs indenting a line may come before a piece's first character.
        indent = len(piece) - len(piece.lstrip(" \t"))
        assert not piece[indent].isspace()
        assert indent == 0 or at == 0 or text[at - 1] == "\n"
        pos = at + len(piece)
    assert text[pos:].strip() == ""
    # The same, as the user would say it: nothing but whitespace differs.
    assert "".join(text.split()) == "".join("".join(pieces).split())


def test_a_book_split_by_paragraphs_gives_many_documents_with_stable_ids(tmp_path: Path) -> None:
    text = book(400)
    src = corpus(tmp_path, {"a_notes.txt": "a short note\n", "book.txt": text, "z.md": "# After\n\nthe book\n"})
    cfg = IngestConfig(split="paragraphs", split_chars=1000)
    first = run_ingest(src, tmp_path / "one", cfg)
    second = run_ingest(src, tmp_path / "two", cfg)

    rows = read_raw(tmp_path / "one")
    pieces = [r for r in rows if r["source"] == "book.txt"]
    assert len(pieces) > 50
    # doc_ids run on across files; within the file a piece is named by its index, 0..
    assert [r["doc_id"] for r in rows] == list(range(len(rows)))
    assert [r["record"] for r in pieces] == list(range(len(pieces)))
    assert rows[0]["source"] == "a_notes.txt" and pieces[0]["doc_id"] == 1
    assert {r["source_sha256"] for r in pieces} == {sha256_file(src / "book.txt")}
    # Paragraphs are merged, not one document each, and never cut while they fit.
    assert sum(len(p["text"]) for p in pieces) / len(pieces) > 500
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    assert all(any(par in p["text"] for p in pieces) for par in paragraphs if len(par) <= 1000)
    assert_lossless(text, [p["text"] for p in pieces], 1000)

    # Same bytes and settings, same ids and same dataset bytes.
    assert read_raw(tmp_path / "two") == rows
    assert sha256_file(tmp_path / "one" / "raw.parquet") == sha256_file(tmp_path / "two" / "raw.parquet")
    assert first.inputs == second.inputs and first.stats == second.stats


def test_max_chars_respects_the_limit_and_cuts_at_the_best_boundary(tmp_path: Path) -> None:
    limit = 200
    blank = "a" * 120 + "\n\n" + "b" * 60 + "\nc" * 30  # a blank line early, line breaks later: the blank line wins
    lines = ("line of text " * 5 + "\n") * 6  # no blank line: the last line break
    sentences = "One sentence ends here. " * 20  # one line: after the last ". "
    words = "word " * 100  # no sentence end: the last space
    blob = "x" * 450  # nothing at all: hard cuts of exactly the limit
    assert list(split_text(blank, "max_chars", limit))[0] == "a" * 120
    assert all(p.endswith("line of text") for p in split_text(lines, "max_chars", limit))
    assert all(p.endswith("ends here.") for p in split_text(sentences, "max_chars", limit))
    *full, last = split_text(words, "max_chars", limit)
    assert all(p.endswith("word") and len(p) > limit - 6 for p in full) and last.endswith("word")
    assert list(split_text(blob, "max_chars", limit)) == ["x" * 200, "x" * 200, "x" * 50]
    # CJK has no spaces: its full-width stops are sentence ends.
    cjk = "我们今天去公园散步。" * 40
    assert all(p.endswith("。") for p in split_text(cjk, "max_chars", limit))

    text = "\n\n".join([blank, lines, sentences, words, blob, cjk])
    src = corpus(tmp_path, {"manual.txt": text})
    run_ingest(src, tmp_path / "out", IngestConfig(split="max_chars", split_chars=limit))
    pieces = [r["text"] for r in read_raw(tmp_path / "out")]
    assert len(pieces) > 10 and max(map(len, pieces)) <= limit
    assert_lossless(text, pieces, limit)


def test_file_mode_is_one_document_per_file_as_before(tmp_path: Path) -> None:
    text = book(60)
    files = {"book.txt": "\ufeff" + text, "notes.md": "  # Title\n\n    code\n\n", "page.html": "<p>one</p><p>two</p>", "empty.txt": ""}
    src = corpus(tmp_path, files)
    default = run_ingest(src, tmp_path / "default", IngestConfig())
    explicit = run_ingest(src, tmp_path / "file", IngestConfig(split="file", split_chars=200))
    rows = read_raw(tmp_path / "default")
    # The file's text untouched (BOM aside): nothing stripped, nothing cut, record 0; an empty file is still a row.
    assert [(r["source"], r["record"], r["text"]) for r in rows] == [
        ("book.txt", 0, text),
        ("empty.txt", 0, ""),
        ("notes.md", 0, files["notes.md"]),
        ("page.html", 0, "one\n\ntwo"),
    ]
    assert sha256_file(tmp_path / "default" / "raw.parquet") == sha256_file(tmp_path / "file" / "raw.parquet")
    # The ledger's source records stay as they were: no split keys under "file".
    assert default.inputs == explicit.inputs
    assert all("split" not in x and "split_chars" not in x for x in default.inputs)


def test_joining_the_pieces_reproduces_the_text(tmp_path: Path) -> None:
    text = "\n\n".join([book(120, seed=1), "    indented code\n    more code", "Line one\r\nLine two\r\n", "z" * 3000, "   ", book(80, seed=2)])
    for mode in ("paragraphs", "max_chars"):
        for limit in (200, 500, 4000):
            spans = list(split_spans(text, mode, limit))
            # Exactly: the pieces are the slices between whitespace-only gaps.
            ends = [0] + [e for _, e in spans]
            starts = [s for s, _ in spans] + [len(text)]
            assert all(text[e:s].strip() == "" and e <= s for e, s in zip(ends, starts, strict=True))
            rebuilt = "".join(text[ends[i] : starts[i]] + (text[spans[i][0] : spans[i][1]] if i < len(spans) else "") for i in range(len(spans) + 1))
            assert rebuilt == text
            assert_lossless(text, [text[s:e] for s, e in spans], limit)
    # A piece that starts a line keeps its indentation (markdown code); mid-line it starts at a word.
    code = "Some intro text.\n\n    indented code\n    more code\n"
    assert list(split_text(code, "paragraphs", 40)) == ["Some intro text.", "    indented code\n    more code"]
    assert list(split_text("one two  three", "max_chars", 5)) == ["one", "two", "three"]

    src = corpus(tmp_path, {"book.md": text})
    run_ingest(src, tmp_path / "out", IngestConfig(split="paragraphs", split_chars=500))
    assert_lossless(text, [r["text"] for r in read_raw(tmp_path / "out")], 500)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab .!?\n\t\r。") + ["\u3000", "\u2028", "é", "😀"]), max_size=600),
    mode=st.sampled_from(["paragraphs", "max_chars"]),
    limit=st.integers(min_value=1, max_value=80),
)
def test_the_guarantee_holds_for_any_text(text: str, mode: str, limit: int) -> None:
    spans = list(split_spans(text, mode, limit))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert_lossless(text, [text[s:e] for s, e in spans], limit)
    assert spans == list(split_spans(text, mode, limit))


def test_html_is_split_after_its_text_is_extracted(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i} of the page, with <b>bold</b> words &amp; an entity." for i in range(60)]
    page = "<html><head><title>Guide</title><style>p{}</style></head><body>" + "".join(f"<p>{p}</p>" for p in paragraphs) + "</body></html>"
    src = corpus(tmp_path, {"guide.html": page})
    result = run_ingest(src, tmp_path / "out", IngestConfig(split="paragraphs", split_chars=300))
    pieces = [r["text"] for r in read_raw(tmp_path / "out")]
    assert len(pieces) > 10
    assert not any("<" in p or "&amp;" in p or "p{}" in p for p in pieces)
    assert pieces[0].startswith("Guide\n\nParagraph 0 of the page, with bold words & an entity.")
    assert_lossless(html_to_text(page), pieces, 300)
    assert result.inputs[0]["documents"] == len(pieces)


def test_the_source_record_shows_the_mode_and_the_count(tmp_path: Path) -> None:
    lines = "".join(json.dumps({"text": "x" * 900 + "\n\n" + "y" * 900}) + "\n" for _ in range(3))
    src = corpus(tmp_path, {"book.txt": book(300), "records.jsonl": lines, "blank.txt": " \n\n\t\n"})
    result = run_ingest(src, tmp_path / "out", IngestConfig(split="paragraphs", split_chars=4000))
    rows = read_raw(tmp_path / "out")
    entries = {x["path"]: x for x in result.inputs}
    count = sum(1 for r in rows if r["source"] == "book.txt")
    assert count > 5
    assert {k: entries["book.txt"][k] for k in ("format", "documents", "split", "split_chars", "skipped")} == {
        "format": "txt",
        "documents": count,
        "split": "paragraphs",
        "split_chars": 4000,
        "skipped": None,
    }
    # Whitespace-only pieces are not documents: a blank file gives none, and is not skipped.
    assert entries["blank.txt"]["documents"] == 0 and entries["blank.txt"]["skipped"] is None
    # Records are already documents: split leaves JSONL alone and says nothing about it there.
    assert entries["records.jsonl"]["documents"] == 3 and "split" not in entries["records.jsonl"]
    assert [len(r["text"]) for r in rows if r["source"] == "records.jsonl"] == [1802] * 3
    assert result.stats["documents"] == len(rows)


def test_max_document_bytes_applies_to_the_whole_file_not_to_each_piece(tmp_path: Path) -> None:
    text = book(100)
    src = corpus(tmp_path, {"big.txt": text, "small.txt": "a small file\n"})
    limit = len(text.encode()) - 1
    with pytest.raises(DataError, match=r"big\.txt is \d+ bytes, more than ingest\.max_document_bytes"):
        run_ingest(src, tmp_path / "fail", IngestConfig(split="paragraphs", split_chars=500, max_document_bytes=limit))
    result = run_ingest(src, tmp_path / "skip", IngestConfig(split="paragraphs", split_chars=500, max_document_bytes=limit, on_error="skip"))
    assert {x["path"]: x["skipped"] for x in result.inputs} == {"big.txt": "too_large", "small.txt": None}
    assert [r["source"] for r in read_raw(tmp_path / "skip")] == ["small.txt"]


RECIPE = '[recipe]\nname = "x"\n[ingest]\n'


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('split = "pages"', "ingest.split"),
        ("split = 3", "ingest.split"),
        ("split_chars = 0", "ingest.split_chars"),
        ("split_chars = 199", "ingest.split_chars"),
        ('split_chars = "4000"', "ingest.split_chars"),
    ],
)
def test_bad_split_settings_name_the_key(table: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipe(RECIPE + table + "\n", source="recipe.toml")
    assert [p.key for p in err.value.problems] == [key]
    assert key in str(err.value)


def test_good_split_settings_load() -> None:
    recipe = parse_recipe(RECIPE + 'split = "max_chars"\nsplit_chars = 200\n', source="recipe.toml")
    assert (recipe.ingest.split, recipe.ingest.split_chars) == ("max_chars", 200)
    assert (IngestConfig().split, IngestConfig().split_chars) == ("file", 4000)
    # Built directly (not from a recipe), the same checks raise.
    with pytest.raises(ValueError, match="split_chars must be"):
        IngestConfig(split_chars=0)
    with pytest.raises(ValueError, match="split is 'pages'"):
        IngestConfig(split="pages")  # type: ignore[arg-type]
