"""Ingest: every format, globs, stable doc_ids, every kind of bad input refused or skipped by name, flat memory."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from keys.digest import sha256_file
from pipeline.config import from_mapping
from pipeline.errors import ConfigError, DataError
from pipeline.html_text import html_to_text
from pipeline.ingest import IngestConfig, ParquetSink, glob_regex, iter_rows, open_parquet, run_ingest
from pipeline.parquet_io import GROUP_TEXT_CHARS
from pipeline.readers import REASONS

ROOT = Path(__file__).resolve().parents[1]


def write_parquet(path: Path, columns: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def jsonl(*objs: Any) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def zstd_frames(*parts: bytes) -> bytes:
    # Several frames, as `zstd` writes when files are concatenated or streamed with flushes.
    return b"".join(zstandard.ZstdCompressor(write_checksum=True).compress(p) for p in parts)


def read_raw(out: Path) -> list[dict]:
    return pq.read_table(out / "raw.parquet").to_pylist()


def read_rejects(out: Path) -> list[tuple]:
    return [(r["path"], r["record"], r["reason"]) for r in pq.read_table(out / "rejects.parquet").to_pylist()]


def make_source(tmp_path: Path, files: dict[str, bytes | Callable[[Path], None]]) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for name, content in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
    return src


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = make_source(
        tmp_path,
        {
            "a.txt": b"first document\nwith two lines\n",
            "b/notes.md": b"# Title\n\n    indented code\n",
            "b/deep/docs.jsonl": jsonl({"text": "line one", "id": 1}).replace(b"\n", b"\n\n", 1) + jsonl({"text": "line three"}),
            "b/more.NDJSON": jsonl({"text": "nd"}),
            "c.parquet": lambda p: write_parquet(p, {"text": ["row zero", "row one"], "other": [1, 2]}),
            "d.jsonl.gz": gzip.compress(jsonl({"text": "gz one"}, {"text": "gz two"})),
            "e.ndjson.zst": zstd_frames(jsonl({"text": "zst one"}), jsonl({"text": "zst two"})),
            "f.csv": b'id,text\n1,"quoted, with comma\nand a second line"\n2,plain\n\n3,"say ""hi"""\n',
            "g.html": b"<html><head><title>Page</title></head><body><p>Hello &amp; welcome</p></body></html>",
            "ignored.pdf": b"%PDF",
            ".hidden.txt": b"editor swap file",
        },
    )
    return src


def test_every_format_in_sorted_order(source: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int, str, int]] = []
    result = run_ingest(source, tmp_path / "out", IngestConfig(), progress=lambda d, t, f: seen.append((d, t, f["file"], f["documents"])))
    rows = read_raw(tmp_path / "out")
    assert [(r["doc_id"], r["source"], r["record"], r["text"]) for r in rows] == [
        (0, "a.txt", 0, "first document\nwith two lines\n"),
        (1, "b/deep/docs.jsonl", 1, "line one"),
        (2, "b/deep/docs.jsonl", 3, "line three"),
        (3, "b/more.NDJSON", 1, "nd"),
        (4, "b/notes.md", 0, "# Title\n\n    indented code\n"),
        (5, "c.parquet", 0, "row zero"),
        (6, "c.parquet", 1, "row one"),
        (7, "d.jsonl.gz", 1, "gz one"),
        (8, "d.jsonl.gz", 2, "gz two"),
        (9, "e.ndjson.zst", 1, "zst one"),
        (10, "e.ndjson.zst", 2, "zst two"),
        (11, "f.csv", 2, "quoted, with comma\nand a second line"),
        (12, "f.csv", 4, "plain"),
        (13, "f.csv", 6, 'say "hi"'),
        (14, "g.html", 0, "Page\n\nHello & welcome"),
    ]
    for row in rows:
        assert row["source_sha256"] == sha256_file(source / row["source"])
    assert result.outputs == {"raw": tmp_path / "out" / "raw.parquet"}
    assert result.skipped == []
    stats = result.stats
    assert (stats["files"], stats["files_read"], stats["files_skipped"], stats["files_ignored"]) == (9, 9, 0, 2)
    assert stats["documents"] == 15 and stats["records_skipped"] == 0 and stats["skipped_by_reason"] == {}
    assert stats["bytes"] == sum(x["bytes"] for x in result.inputs)
    assert stats["by_format"]["jsonl"] == {
        "files": 2,
        "documents": 3,
        "bytes": sum((source / p).stat().st_size for p in ("b/deep/docs.jsonl", "b/more.NDJSON")),
    }
    assert sorted(stats["by_format"]) == ["csv", "html", "jsonl", "jsonl.gz", "jsonl.zst", "md", "parquet", "txt"]
    assert [(x["path"], x["format"], x["documents"]) for x in result.inputs] == [
        ("a.txt", "txt", 1),
        ("b/deep/docs.jsonl", "jsonl", 2),
        ("b/more.NDJSON", "jsonl", 1),
        ("b/notes.md", "md", 1),
        ("c.parquet", "parquet", 2),
        ("d.jsonl.gz", "jsonl.gz", 2),
        ("e.ndjson.zst", "jsonl.zst", 2),
        ("f.csv", "csv", 3),
        ("g.html", "html", 1),
    ]
    for entry in result.inputs:
        assert entry["sha256"] == sha256_file(source / entry["path"])
        assert entry["bytes"] == (source / entry["path"]).stat().st_size
        assert entry["records_skipped"] == 0 and entry["skipped"] is None
    # At least once per file, in order, ending at the total.
    assert [s[2] for s in seen] == [x["path"] for x in result.inputs]
    assert [s[0] for s in seen] == sorted(s[0] for s in seen) and seen[-1][0] == seen[-1][1] == stats["bytes"]
    assert seen[-1][3] == 15


def test_shared_parquet_helpers_still_importable_from_ingest(source: Path, tmp_path: Path) -> None:
    run_ingest(source, tmp_path / "out", IngestConfig())
    pf = open_parquet(tmp_path / "out" / "raw.parquet", ["doc_id", "text"], "re-run ingest")
    assert sum(len(b["doc_id"]) for b in iter_rows(pf, ["doc_id"])) == 15
    with pytest.raises(DataError, match="no column 'nope'"):
        open_parquet(tmp_path / "out" / "raw.parquet", ["nope"], "re-run ingest")


def test_rerun_and_creation_order_give_identical_bytes(source: Path, tmp_path: Path) -> None:
    run_ingest(source, tmp_path / "one", IngestConfig())
    run_ingest(source, tmp_path / "two", IngestConfig())
    assert (tmp_path / "one" / "raw.parquet").read_bytes() == (tmp_path / "two" / "raw.parquet").read_bytes()

    # The same files created in the opposite order: doc_ids follow the paths, not the directory order.
    files = sorted(p for p in source.rglob("*") if p.is_file())
    mirror = tmp_path / "mirror"
    for path in reversed(files):
        target = mirror / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    run_ingest(mirror, tmp_path / "three", IngestConfig())
    assert (tmp_path / "three" / "raw.parquet").read_bytes() == (tmp_path / "one" / "raw.parquet").read_bytes()


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("**", "a.txt", True),
        ("**", "x/y/z.md", True),
        ("*.txt", "a.txt", True),
        ("*.txt", "sub/a.txt", False),  # * never crosses a folder
        ("**/*.txt", "a.txt", True),  # ** also matches no folder at all
        ("**/*.txt", "x/y/a.txt", True),
        ("**/*.txt", "x/y/a.md", False),
        ("docs/**", "docs/a/b.txt", True),
        ("docs/**", "other/docs/a.txt", False),
        ("docs/**", "docs2/a.txt", False),
        ("a/**/b.txt", "a/b.txt", True),
        ("a/**/b.txt", "a/x/y/b.txt", True),
        ("a/**/b.txt", "ab.txt", False),
        ("?.txt", "a.txt", True),
        ("?.txt", "ab.txt", False),
        ("[ab].txt", "b.txt", True),
        ("[!ab].txt", "c.txt", True),
        ("[!ab].txt", "a.txt", False),
        ("*[!x]", "a/b", False),  # a negated class does not match '/' either
        ("file (1).txt", "file (1).txt", True),  # regex metacharacters are literal
        ("file+.txt", "filee.txt", False),
        ("data.*", "data.csv", True),
        ("*.txt", ".txt", True),
        ("[]a].txt", "].txt", True),  # a ']' first in a class is a member, as in POSIX globs
        ("a[b", "a[b", True),  # an unclosed '[' is literal
        ("[a-c]?", "b1", True),
    ],
)
def test_glob_regex(pattern: str, path: str, matches: bool) -> None:
    assert (glob_regex(pattern).fullmatch(path) is not None) == matches


def test_include_exclude_recursive_hidden(source: Path, tmp_path: Path) -> None:
    def paths(**kw: Any) -> list[str]:
        return [x["path"] for x in run_ingest(source, tmp_path / "o", IngestConfig(**kw)).inputs]

    assert paths(include=["b/**"]) == ["b/deep/docs.jsonl", "b/more.NDJSON", "b/notes.md"]
    assert paths(include=["*.txt", "**/*.md"]) == ["a.txt", "b/notes.md"]
    assert paths(exclude=["b/**", "*.parquet", "*.zst"]) == ["a.txt", "d.jsonl.gz", "f.csv", "g.html"]
    assert paths(include=["b/**"], exclude=["**/deep/**"]) == ["b/more.NDJSON", "b/notes.md"]
    result = run_ingest(source, tmp_path / "o", IngestConfig(include=["**/*.jsonl"]))
    assert result.stats["files_ignored"] == 10  # every other file seen in the walk, hidden included
    assert paths(recursive=False, include=["*.txt", "*.parquet"]) == ["a.txt", "c.parquet"]
    assert paths(include_hidden=True, extensions=[".TXT"]) == [".hidden.txt", "a.txt"]
    with pytest.raises(DataError) as info:
        run_ingest(source, tmp_path / "none", IngestConfig(include=["nothing/**"]))
    assert "nothing/**" in info.value.message and "ingest.include" in info.value.hint


def test_fields_columns_and_other_text_suffixes(tmp_path: Path) -> None:
    src = make_source(
        tmp_path,
        {
            "x.jsonl": jsonl({"body": "b"}),
            "y.parquet": lambda p: write_parquet(p, {"content": pa.array(["c"]).dictionary_encode()}),
            "z.csv": b"content,n\nd,1\n",
            "w.rst": b"Title\n=====\n",
            "v.txt": b"not listed",
        },
    )
    cfg = IngestConfig(jsonl_field="body", parquet_column="content", csv_column="content", extensions=[".jsonl", ".parquet", ".csv", ".rst"])
    result = run_ingest(src, tmp_path / "o", cfg)
    assert [r["text"] for r in read_raw(tmp_path / "o")] == ["Title\n=====\n", "b", "c", "d"]
    assert [x["format"] for x in result.inputs] == ["rst", "jsonl", "parquet", "csv"]


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    src = make_source(tmp_path, {"a.txt": bom + b"hello", "b.jsonl": bom + jsonl({"text": "j"}), "c.csv": bom + b"text\nc\n"})
    run_ingest(src, tmp_path / "out", IngestConfig())
    assert [r["text"] for r in read_raw(tmp_path / "out")] == ["hello", "j", "c"]


def test_html_text_extraction() -> None:
    page = """<!DOCTYPE html>
    <html><head><meta charset="utf-8"><title>The   title</title>
    <style>body { color: red }</style><script>var x = "<p>no</p>";</script>
    <link rel="stylesheet" href="x.css"></head>
    <body>
      <noscript>enable JavaScript</noscript><template><p>hidden</p></template>
      <svg><title>icon</title><text>svg text</text></svg>
      <h1>Heading &amp; more</h1>
      <p>First   paragraph,
         wrapped &lt;here&gt;.<br>After a break &#8212; &eacute;t&eacute;.</p>
      <div>Block <b>with</b> <a href="#">inline</a> tags</div>
      <ul><li>one</li><li>two</li></ul>
      <table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>
      <pre>
def f():
    return 1
</pre>
      <!-- a comment -->
    </body></html>"""
    assert html_to_text(page) == (
        "The title\n\n"
        "Heading & more\n\n"
        "First paragraph, wrapped <here>.\nAfter a break \u2014 \u00e9t\u00e9.\n\n"
        "Block with inline tags\n\n"
        "one\ntwo\n\n"
        "a b\nc d\n\n"
        "def f():\n    return 1"
    )
    # A page without <head>/<body> tags still loses nothing but markup.
    assert html_to_text("<title>T</title><p>x</p>text after") == "T\n\nx\n\ntext after"


@pytest.mark.parametrize(
    ("page", "text"),
    [
        (b'<meta charset="iso-8859-1"><p>caf\xe9</p>', "caf\u00e9"),
        (b"<META CHARSET=latin1><p>caf\xe9</p>", "caf\u00e9"),
        (b'<meta http-equiv="Content-Type" content="text/html; charset=windows-1252"><p>\x93quoted\x94</p>', "\u201cquoted\u201d"),
        (b"<p>caf\xc3\xa9 by default</p>", "caf\u00e9 by default"),
        (b"\xef\xbb\xbf<p>bom</p>", "bom"),
    ],
)
def test_html_charsets(page: bytes, text: str, tmp_path: Path) -> None:
    src = make_source(tmp_path, {"p.HTM": page})
    run_ingest(src, tmp_path / "out", IngestConfig())
    assert read_raw(tmp_path / "out")[0]["text"] == text


def _truncated_gzip(p: Path) -> None:
    data = gzip.compress(b"".join(jsonl({"text": f"gz {i} " + "x" * 50}) for i in range(2000)))
    p.write_bytes(data[: len(data) // 2])


def _truncated_zstd(p: Path) -> None:
    data = zstd_frames(jsonl({"text": "first frame"}), b"".join(jsonl({"text": f"zst {i} " + "y" * 50}) for i in range(2000)))
    p.write_bytes(data[:-7])


def _bad_crc_gzip(p: Path) -> None:
    data = bytearray(gzip.compress(jsonl({"text": "a"}, {"text": "b"})))
    data[-6] ^= 0xFF  # inside the CRC32 trailer
    p.write_bytes(bytes(data))


def _outside(p: Path) -> Path:
    """A file beside the source folder (``tmp/elsewhere/secret``), which ingest must never read."""
    secret = p.parent.parent / "elsewhere" / "secret"
    secret.parent.mkdir(exist_ok=True)
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    return secret


def _fifo_behind_link(p: Path) -> None:
    # The FIFO sits in a hidden folder the walk does not enter: only the link leads to it.
    (p.parent / ".pipes").mkdir()
    os.mkfifo(p.parent / ".pipes" / "fifo")
    p.symlink_to(".pipes/fifo")


def _socket(p: Path) -> None:
    here = os.getcwd()
    os.chdir(p.parent)  # a socket's path is limited to 107 bytes: bind by a short relative name
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(p.name)
    finally:
        os.chdir(here)


# case: (file name, content, reason, words the fail message must contain, documents the same file keeps under skip)
BAD_INPUTS: dict[str, tuple[str, Any, str, list[str], int]] = {
    "latin1_text": ("bad.txt", b"ok\ncaf\xe9\n", "not_utf8", ["bad.txt", "offset 6", "line 2", "UTF-8"], 0),
    "binary": ("img.md", b"\x89PNG\r\n\x1a\n\x00\x00", "binary", ["img.md", "binary", "offset 8"], 0),
    "utf16": ("wide.txt", "hi".encode("utf-16"), "binary", ["wide.txt", "binary"], 0),
    "binary_jsonl": ("d.jsonl", b"\x00\x01\x02" * 10, "binary", ["d.jsonl", "binary", "offset 0"], 0),
    "latin1_html": ("p.html", b"<p>caf\xe9</p>", "not_utf8", ["p.html", "UTF-8", "offset 6"], 0),
    "latin1_jsonl_line": ("d.jsonl", jsonl({"text": "a"}) + b'{"text": "caf\xe9"}\n' + jsonl({"text": "c"}), "not_utf8", ["d.jsonl", "line 2", "UTF-8"], 2),
    "malformed_json": ("d.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', "malformed_json", ["d.jsonl", "line 3", "malformed JSON", "column"], 2),
    # One line nested 20,000 deep: past Python's recursion limit, a malformed line, never a crash.
    "deep_json": (
        "d.jsonl",
        jsonl({"text": "a"}) + b'{"text": ' + b"[" * 20000 + b"]" * 20000 + b"}\n" + jsonl({"text": "c"}),
        "malformed_json",
        ["d.jsonl", "line 2", "nested too deeply"],
        2,
    ),
    "missing_field": ("d.jsonl", b'{"text": "a"}\n{"body": "b"}\n', "missing_field", ["d.jsonl", "line 2", "'text'", "body"], 1),
    "not_a_string": ("d.jsonl", b'{"text": 5}\n{"text": "ok"}\n', "not_string", ["d.jsonl", "line 1", "not a string"], 1),
    "null_text": ("d.jsonl", b'{"text": null}\n{"text": "ok"}\n', "null_text", ["d.jsonl", "line 1", "null"], 1),
    "not_an_object": ("d.jsonl", b'["text"]\n{"text": "ok"}\n', "not_object", ["d.jsonl", "line 1", "object"], 1),
    "lone_surrogate": (
        "d.jsonl",
        b'{"text": "ok \\ud83c\\udf89"}\n{"text": "bad \\ud800"}\n',
        "unpaired_surrogate",
        ["d.jsonl", "line 2", "surrogate"],
        1,
    ),
    "truncated_gzip": ("d.jsonl.gz", _truncated_gzip, "truncated", ["d.jsonl.gz", "line", "gzip", "cut short"], -1),
    "bad_crc_gzip": ("d.jsonl.gz", _bad_crc_gzip, "truncated", ["d.jsonl.gz", "line 3", "CRC"], 2),
    "not_gzip": ("d.jsonl.gz", jsonl({"text": "plain"}), "truncated", ["d.jsonl.gz", "line 1", "gzip"], 0),
    "truncated_zstd": ("d.jsonl.zst", _truncated_zstd, "truncated", ["d.jsonl.zst", "line", "zstd", "cut short"], -1),
    "not_zstd": ("d.jsonl.zst", b"garbage that is not zstd\n", "truncated", ["d.jsonl.zst", "line 1", "zstd"], 0),
    "no_column": ("t.parquet", lambda p: write_parquet(p, {"body": ["x"]}), "wrong_schema", ["t.parquet", "'text'", "body"], 0),
    "int_column": ("t.parquet", lambda p: write_parquet(p, {"text": [1, 2]}), "wrong_schema", ["t.parquet", "not strings"], 0),
    "null_row": ("t.parquet", lambda p: write_parquet(p, {"text": ["a", None, "c"]}), "null_text", ["t.parquet", "row 1", "null"], 2),
    "bad_utf8_row": (
        "t.parquet",
        lambda p: pq.write_table(
            pa.table({"text": pa.Array.from_buffers(pa.string(), 2, pa.array(["ok", "caf\u00e9"]).buffers()[:2] + [pa.py_buffer(b"okcaf\xe9\xe9")])}), p
        ),
        "not_utf8",
        ["t.parquet", "row 1", "UTF-8"],
        1,
    ),
    "not_parquet": ("t.parquet", b"PAR1 but not really", "not_parquet", ["t.parquet", "parquet"], 0),
    "csv_no_column": ("t.csv", b"body,n\nx,1\n", "wrong_schema", ["t.csv", "line 1", "'text'", "body"], 0),
    "csv_empty": ("t.csv", b"", "wrong_schema", ["t.csv", "no header"], 0),
    "csv_unterminated_quote": ("t.csv", b'text\nok\n"never closed\nmore\n', "malformed_csv", ["t.csv", "line 3", "CSV"], 1),
    "csv_stray_quote": ("t.csv", b'text\n"a"b\nok\n', "malformed_csv", ["t.csv", "line 2", "CSV"], 1),
    "csv_field_count": ("t.csv", b'text,n\nok,1\nno comma\n"ok\ntoo",2\n', "malformed_csv", ["t.csv", "line 3", "1 fields", "header has 2"], 2),
    "csv_latin1": ("t.csv", b"text\ncaf\xe9\nok\n", "not_utf8", ["t.csv", "line 2", "UTF-8"], 1),
    "fifo": ("pipe.txt", lambda p: os.mkfifo(p), "special_file", ["pipe.txt", "is a FIFO", "not a regular file"], 0),
    "socket": ("sock.txt", _socket, "special_file", ["sock.txt", "is a socket", "not a regular file"], 0),
    "link_to_a_fifo": ("pipe.txt", _fifo_behind_link, "special_file", ["pipe.txt", "symbolic link to .pipes/fifo", "FIFO"], 0),
    "link_to_etc_passwd": (
        "notes.txt",
        lambda p: p.symlink_to("/etc/passwd"),
        "symlink_outside_corpus",
        ["notes.txt", "symbolic link to /etc/passwd", "outside"],
        0,
    ),
    "relative_link_out": (
        "notes.txt",
        lambda p: (_outside(p), p.symlink_to("../elsewhere/secret")),
        "symlink_outside_corpus",
        ["notes.txt", "symbolic link to ../elsewhere/secret", "outside the source folder", "elsewhere/secret"],
        0,
    ),
    "link_to_a_folder_outside": (
        "docs",
        lambda p: (_outside(p), (p.parent.parent / "elsewhere" / "more.txt").write_text("x"), p.symlink_to(p.parent.parent / "elsewhere")),
        "symlink_outside_corpus",
        ["docs", "symbolic link to the folder", "elsewhere", "outside"],
        0,
    ),
    "dangling_link_out": ("gone.txt", lambda p: p.symlink_to("/nonexistent/corpus.txt"), "symlink_outside_corpus", ["gone.txt", "/nonexistent/corpus.txt"], 0),
    "broken_link": ("gone.txt", lambda p: p.symlink_to(p.parent / "nowhere.txt"), "unreadable", ["gone.txt", "cannot be read"], 0),
}

# Cases where nothing of the file can be used: the file is skipped whole (record -1).
WHOLE_FILE = {
    "latin1_text",
    "binary",
    "utf16",
    "binary_jsonl",
    "latin1_html",
    "no_column",
    "int_column",
    "not_parquet",
    "csv_no_column",
    "csv_empty",
    "broken_link",
    "fifo",
    "socket",
    "link_to_a_fifo",
    "link_to_etc_passwd",
    "relative_link_out",
    "link_to_a_folder_outside",
    "dangling_link_out",
}
# Refused by the folder walk: never opened, so there is nothing to hash.
NOT_OPENED = {"unreadable", "special_file", "symlink_outside_corpus"}


def _bad_source(case: str, tmp_path: Path) -> tuple[Path, str]:
    name, content, *_ = BAD_INPUTS[case]
    src = make_source(tmp_path, {"a_good.txt": b"a good document comes first", name: content})
    return src, name


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_naming_file_record_and_reason(case: str, tmp_path: Path) -> None:
    src, _ = _bad_source(case, tmp_path)
    _, _, reason, words, _ = BAD_INPUTS[case]
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        run_ingest(src, out, IngestConfig())
    for word in [*words, f"[{reason}]"]:
        assert word in info.value.message, (word, info.value.message)
    assert 'on_error = "skip"' in info.value.hint
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_skipped_counted_and_listed(case: str, tmp_path: Path) -> None:
    src, name = _bad_source(case, tmp_path)
    _, _, reason, words, kept = BAD_INPUTS[case]
    out = tmp_path / "out"
    result = run_ingest(src, out, IngestConfig(on_error="skip"))
    rows = read_raw(out)
    assert rows[0]["source"] == "a_good.txt"
    mine = [r for r in rows if r["source"] == name]
    if kept >= 0:
        assert len(mine) == kept
    else:  # a cut-off stream keeps what came before the damage
        assert 0 < len(mine) < 2001
    assert result.outputs == {"raw": out / "raw.parquet", "rejects": out / "rejects.parquet"}
    rejects = read_rejects(out)
    assert len(rejects) == 1 and rejects[0][0] == name and rejects[0][2] == reason
    whole = case in WHOLE_FILE
    assert rejects[0][1] == (-1 if whole else rejects[0][1]) and (rejects[0][1] >= 0) != whole
    [entry] = result.skipped
    assert entry["path"] == name and entry["whole_file"] == whole and entry["reasons"] == {reason: 1}
    assert entry["records_skipped"] == (0 if whole else 1)
    assert entry["examples"][0]["reason"] == reason and entry["examples"][0]["record"] == rejects[0][1]
    assert all(w in entry["examples"][0]["detail"] for w in words if w != "cannot be read")
    info = {x["path"]: x for x in result.inputs}[name]
    assert info["skipped"] == (reason if whole else None) and info["documents"] == len(mine)
    if reason in NOT_OPENED:
        assert info["sha256"] is None and entry["sha256"] is None  # nothing could be read to hash
    else:
        assert info["sha256"] == entry["sha256"] == sha256_file(src / name)
        assert info["bytes"] == (src / name).stat().st_size
    stats = result.stats
    assert stats["files"] == 2 and stats["files_skipped"] == int(whole) and stats["files_read"] == 2 - int(whole)
    assert stats["skipped_by_reason"] == {reason: 1} and stats["records_skipped"] == (0 if whole else 1)
    assert stats["documents"] == len(rows)
    assert reason in REASONS


def test_skip_counts_every_bad_record_and_keeps_examples_bounded(tmp_path: Path) -> None:
    lines = []
    for i in range(1, 61):
        lines.append(b"not json\n" if i % 2 else jsonl({"text": f"doc {i}"}))
    lines.append(jsonl({"text": None}))
    src = make_source(tmp_path, {"d.jsonl": b"".join(lines)})
    out = tmp_path / "out"
    result = run_ingest(src, out, IngestConfig(on_error="skip"))
    assert [r["record"] for r in read_raw(out)] == list(range(2, 61, 2))
    [entry] = result.skipped
    assert entry["reasons"] == {"malformed_json": 30, "null_text": 1} and entry["records_skipped"] == 31
    assert len(entry["examples"]) == 20 and [e["record"] for e in entry["examples"]] == list(range(1, 40, 2))
    assert [r[1] for r in read_rejects(out)] == [*range(1, 60, 2), 61]
    assert result.stats["records_skipped"] == 31 and result.inputs[0]["records_skipped"] == 31

    # A later clean run into the same folder does not keep the old list of rejects.
    (src / "d.jsonl").write_bytes(jsonl({"text": "clean"}))
    result = run_ingest(src, out, IngestConfig(on_error="skip"))
    assert result.outputs == {"raw": out / "raw.parquet"} and not (out / "rejects.parquet").exists()


def test_truncated_streams_keep_the_records_before_the_damage(tmp_path: Path) -> None:
    body = b"".join(jsonl({"text": f"doc {i} " + "z" * 40}) for i in range(3000))
    gz, zst = gzip.compress(body), zstd_frames(body[: len(body) // 3], body[len(body) // 3 :])
    src = make_source(tmp_path, {"a.jsonl.gz": gz[: len(gz) * 2 // 3], "b.jsonl.zst": zst[: len(zst) * 2 // 3]})
    out = tmp_path / "out"
    result = run_ingest(src, out, IngestConfig(on_error="skip"))
    rows = read_raw(out)
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        mine = [r for r in rows if r["source"] == name]
        # Records are whole and in order; the stream ended before its end.
        assert 0 < len(mine) < 3000
        assert [r["record"] for r in mine] == list(range(1, len(mine) + 1))
        assert all(r["text"] == f"doc {r['record'] - 1} " + "z" * 40 for r in mine)
        [reject] = [r for r in read_rejects(out) if r[0] == name]
        assert reject == (name, len(mine) + 1, "truncated")
    assert result.stats["skipped_by_reason"] == {"truncated": 2} and result.stats["files_skipped"] == 0

    # A zstd stream cut right after a line break still counts as cut short.
    exact = zstd_frames(jsonl({"text": "one"}), jsonl({"text": "two"}))
    first = len(zstd_frames(jsonl({"text": "one"})))
    (src / "a.jsonl.gz").unlink()
    (src / "b.jsonl.zst").write_bytes(exact[: first + 6])
    with pytest.raises(DataError, match=r"b\.jsonl\.zst line 2: .*cut short.*\[truncated\]"):
        run_ingest(src, tmp_path / "o2", IngestConfig())


def test_too_large(tmp_path: Path) -> None:
    src = make_source(
        tmp_path,
        {
            "big.txt": b"x" * 100,
            "small.txt": b"y" * 50,
            "d.jsonl": jsonl({"text": "short"}, {"text": "z" * 100}, {"text": "after"}),
            "t.csv": b'text\nshort\n"' + b"w" * 60 + b"\n" + b"w" * 60 + b'"\nafter\n',
        },
    )
    with pytest.raises(DataError) as info:
        run_ingest(src, tmp_path / "out", IngestConfig(max_document_bytes=80))
    assert "big.txt" in info.value.message and "[too_large]" in info.value.message
    assert "ingest.max_document_bytes" in info.value.hint
    result = run_ingest(src, tmp_path / "out", IngestConfig(max_document_bytes=80, on_error="skip"))
    assert [(r["source"], r["record"]) for r in read_raw(tmp_path / "out")] == [
        ("d.jsonl", 1),
        ("d.jsonl", 3),
        ("small.txt", 0),
        ("t.csv", 2),
        ("t.csv", 5),
    ]
    assert read_rejects(tmp_path / "out") == [("big.txt", -1, "too_large"), ("d.jsonl", 2, "too_large"), ("t.csv", 3, "too_large")]
    assert {x["path"]: x["sha256"] for x in result.inputs}["big.txt"] == sha256_file(src / "big.txt")
    assert run_ingest(src, tmp_path / "out", IngestConfig(max_document_bytes=0)).stats["documents"] == 8


def test_nothing_readable_is_an_error_naming_the_reasons(tmp_path: Path) -> None:
    src = make_source(tmp_path, {"a.txt": b"\x00bin", "b.jsonl": b"not json\n", "c.parquet": b"nope"})
    with pytest.raises(DataError) as info:
        run_ingest(src, tmp_path / "out", IngestConfig(on_error="skip"))
    message = info.value.message
    assert "no documents" in message and "3 files, 2 skipped whole, 1 records skipped" in message
    assert "binary: 1" in message and "malformed_json: 1" in message and "not_parquet: 1" in message
    assert not (tmp_path / "out").exists()


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    src = make_source(tmp_path, {"secret.txt": b"x", "ok.txt": b"fine"})
    (src / "secret.txt").chmod(0)
    with pytest.raises(DataError, match=r"secret\.txt.*\[unreadable\]"):
        run_ingest(src, tmp_path / "out", IngestConfig())
    result = run_ingest(src, tmp_path / "out", IngestConfig(on_error="skip"))
    assert result.skipped[0]["path"] == "secret.txt" and result.skipped[0]["sha256"] is None


class hang_guard:
    """Fail (instead of hanging the suite) if the block takes longer than ``seconds``."""

    def __init__(self, seconds: int = 60) -> None:
        self.seconds = seconds

    def _expired(self, signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {self.seconds} s: the walk or a reader hangs")

    def __enter__(self) -> None:
        self.previous = signal.signal(signal.SIGALRM, self._expired)
        signal.alarm(self.seconds)

    def __exit__(self, *exc: object) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def out_bytes(out: Path) -> bytes:
    return b"".join(f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file())


def test_symlink_to_etc_passwd_is_refused_and_never_stored(tmp_path: Path) -> None:
    # The hostile probe: a link in the corpus folder to a system file.
    src = make_source(tmp_path, {"a.txt": b"a real document", "b/readme.md": b"# another"})
    (src / "b" / "passwd.txt").symlink_to("/etc/passwd")
    with pytest.raises(DataError) as info:
        run_ingest(src, tmp_path / "out", IngestConfig())
    message, hint = info.value.message, info.value.hint
    assert f"{src / 'b' / 'passwd.txt'} is a symbolic link to /etc/passwd, outside the source folder" in message
    assert "[symlink_outside_corpus]" in message
    assert "copy the file" in hint and "remove the link" in hint and 'on_error = "skip"' in hint
    assert not (tmp_path / "out").exists()

    result = run_ingest(src, tmp_path / "out", IngestConfig(on_error="skip"))
    assert [r["source"] for r in read_raw(tmp_path / "out")] == ["a.txt", "b/readme.md"]
    [entry] = result.skipped
    assert entry["path"] == "b/passwd.txt" and entry["reasons"] == {"symlink_outside_corpus": 1} and entry["whole_file"]
    assert entry["sha256"] is None and "/etc/passwd" in entry["examples"][0]["detail"]
    assert read_rejects(tmp_path / "out") == [("b/passwd.txt", -1, "symlink_outside_corpus")]
    assert result.stats["skipped_by_reason"] == {"symlink_outside_corpus": 1} and result.stats["files_skipped"] == 1
    # Not a byte of the target reached the output, not even its digest.
    passwd = Path("/etc/passwd").read_bytes()
    assert passwd.splitlines()[0] not in out_bytes(tmp_path / "out")
    assert sha256_file(Path("/etc/passwd")) not in json.dumps([result.inputs, result.skipped])


def test_links_out_of_the_folder_are_refused_only_where_the_walk_goes(tmp_path: Path) -> None:
    src = make_source(tmp_path, {"a.txt": b"doc"})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.txt").write_text("outside")
    (src / "ext").symlink_to(outside)  # a folder link
    (src / "passwd").symlink_to("/etc/passwd")  # no listed extension: never a candidate, never opened
    (src / ".hidden.txt").symlink_to("/etc/passwd")  # hidden: not taken
    assert run_ingest(src, tmp_path / "o1", IngestConfig(recursive=False)).skipped == []
    assert run_ingest(src, tmp_path / "o2", IngestConfig(exclude=["ext/**"])).skipped == []
    result = run_ingest(src, tmp_path / "o3", IngestConfig(on_error="skip"))
    assert [(x["path"], x["format"], x["skipped"]) for x in result.inputs] == [("a.txt", "txt", None), ("ext", "folder", "symlink_outside_corpus")]
    assert "symbolic link to the folder" in result.skipped[0]["examples"][0]["detail"]
    assert result.stats["files_ignored"] == 2


def test_links_inside_the_folder_are_followed_and_each_file_read_once(tmp_path: Path) -> None:
    src = make_source(
        tmp_path,
        {
            "a/real.txt": b"the real file",
            "a/sub/deep.md": b"deep",
            ".drafts/only.txt": b"reached only through a link",
            ".archive/old.txt": b"an old folder, linked in",
        },
    )
    (src / "b").mkdir()
    (src / "b" / "link.txt").symlink_to("../a/real.txt")  # a second name for a/real.txt
    (src / "0_first.txt").symlink_to("a/real.txt")  # sorts before a/real.txt, still not its name
    os.link(src / "a" / "real.txt", src / "hard.txt")  # a hard link is the same file too
    (src / "latest").symlink_to("a")  # a folder link to a folder walked anyway
    (src / "visible.txt").symlink_to(".drafts/only.txt")
    (src / "archive").symlink_to(".archive")
    result = run_ingest(src, tmp_path / "out", IngestConfig())
    rows = read_raw(tmp_path / "out")
    assert [(r["source"], r["text"]) for r in rows] == [
        ("a/real.txt", "the real file"),
        ("a/sub/deep.md", "deep"),
        ("archive/old.txt", "an old folder, linked in"),
        ("visible.txt", "reached only through a link"),
    ]
    assert result.skipped == []
    # The other names of a/real.txt (0_first.txt, b/link.txt, hard.txt) are ignored; latest/ is not walked twice.
    assert result.stats["files_ignored"] == 3 and result.stats["files"] == 4


def test_folder_link_loops_end(tmp_path: Path) -> None:
    src = make_source(tmp_path, {"d/a.txt": b"a", "e/b.txt": b"b"})
    (src / "d" / "up").symlink_to("..")
    (src / "d" / "here").symlink_to(".")
    (src / "d" / "to_e").symlink_to("../e")
    (src / "e" / "to_d").symlink_to("../d")
    (src / "loop1.txt").symlink_to("loop2.txt")  # a loop of file links cannot be read
    (src / "loop2.txt").symlink_to("loop1.txt")
    with hang_guard(60):
        result = run_ingest(src, tmp_path / "out", IngestConfig(on_error="skip"))
    assert [r["source"] for r in read_raw(tmp_path / "out")] == ["d/a.txt", "e/b.txt"]
    assert [(x["path"], x["reasons"]) for x in result.skipped] == [("loop1.txt", {"unreadable": 1}), ("loop2.txt", {"unreadable": 1})]


def test_special_files_never_block_the_walk(tmp_path: Path) -> None:
    src = make_source(tmp_path, {"a.txt": b"doc"})
    os.mkfifo(src / "pipe")  # no listed extension: ignored without being opened
    os.mkfifo(src / "pipe.jsonl")
    with hang_guard(60):
        result = run_ingest(src, tmp_path / "out", IngestConfig(on_error="skip"))
    assert [(x["path"], x["reasons"]) for x in result.skipped] == [("pipe.jsonl", {"special_file": 1})]
    assert result.stats["files_ignored"] == 1


def test_a_device_is_refused(tmp_path: Path) -> None:
    src = make_source(tmp_path, {"a.txt": b"doc"})
    try:
        os.mknod(src / "null.txt", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating device files needs CAP_MKNOD")
    with pytest.raises(DataError, match=r"null\.txt is a character device, not a regular file \[special_file\]") as info:
        run_ingest(src, tmp_path / "out", IngestConfig())
    assert "regular files only" in info.value.hint


def test_a_file_swapped_for_a_link_after_the_walk_is_not_read(tmp_path: Path) -> None:
    src = make_source(tmp_path, {"a.txt": b"first", "b.txt": b"second"})
    secret = _outside(src / "b.txt")

    def swap(done: int, total: int, fields: dict[str, Any]) -> None:
        if fields["file"] == "a.txt" and not (src / "b.txt").is_symlink():
            (src / "b.txt").unlink()
            (src / "b.txt").symlink_to(secret)

    with pytest.raises(DataError, match=r"b\.txt cannot be read: it was replaced after the folder walk found it.*\[unreadable\]"):
        run_ingest(src, tmp_path / "out", IngestConfig(), progress=swap)
    (src / "b.txt").unlink()
    (src / "b.txt").write_bytes(b"second")
    result = run_ingest(src, tmp_path / "out", IngestConfig(on_error="skip"), progress=swap)
    assert [r["text"] for r in read_raw(tmp_path / "out")] == ["first"]
    assert result.skipped[0]["path"] == "b.txt" and result.skipped[0]["reasons"] == {"unreadable": 1}
    assert secret.read_bytes() not in out_bytes(tmp_path / "out")


def test_file_changing_while_read_stops_the_stage(tmp_path: Path) -> None:
    # Enough lines that progress is reported before the reader reaches the end of the file.
    src = make_source(tmp_path, {"d.jsonl": b"".join(jsonl({"text": f"line {i} " + "p" * 2000}) for i in range(3000))})

    def grow(done: int, total: int, fields: dict[str, Any]) -> None:
        with open(src / "d.jsonl", "ab") as f:
            f.write(jsonl({"text": "appended while ingest reads"}))

    with pytest.raises(DataError, match="changed while ingest was reading it") as info:
        run_ingest(src, tmp_path / "out", IngestConfig(on_error="skip"), progress=grow)
    assert "writing into the source folder" in info.value.hint
    assert not (tmp_path / "out").exists()


def test_existing_output_dir_keeps_no_partial_file(tmp_path: Path) -> None:
    src, out = make_source(tmp_path, {"d.jsonl": b'{"text": "a"}\nnot json\n'}), tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError):
        run_ingest(src, out, IngestConfig())
    assert list(out.iterdir()) == []


def test_empty_folder_lists_extensions(tmp_path: Path) -> None:
    src = make_source(tmp_path, {"readme.pdf": b"%PDF"})
    with pytest.raises(DataError) as info:
        run_ingest(src, tmp_path / "out", IngestConfig())
    assert ".txt, .md, .jsonl" in info.value.message and ".csv" in info.value.message and "src" in info.value.message
    assert "ingest.extensions" in info.value.hint
    with pytest.raises(DataError, match="does not exist"):
        run_ingest(tmp_path / "missing", tmp_path / "out", IngestConfig())
    assert not (tmp_path / "out").exists()


def test_parquet_sink_cuts_row_groups_by_text_size(tmp_path: Path) -> None:
    schema = pa.schema([("i", pa.int64()), ("text", pa.string())])
    big = "a" * (GROUP_TEXT_CHARS // 4 + 1)
    with ParquetSink(tmp_path / "x.parquet", schema) as sink:
        for i in range(6):
            sink.add(i=i, text=big)
    meta = pq.ParquetFile(tmp_path / "x.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4, 2]


def test_parquet_sink_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.parquet_io as pio

    events: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(pio, "fsync_path", lambda p: events.append(("fsync", Path(p).name)))
    monkeypatch.setattr(pio, "fsync_dir", lambda p: events.append(("fsync_dir", Path(p).name)))
    monkeypatch.setattr(pio.os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), real_replace(a, b)))
    with ParquetSink(tmp_path / "out" / "x.parquet", pa.schema([("i", pa.int64())])) as sink:
        sink.add(i=1)
    assert events == [("fsync", "x.parquet.partial"), ("rename", "x.parquet"), ("fsync_dir", "out")]
    assert pq.read_table(tmp_path / "out" / "x.parquet").column("i").to_pylist() == [1]


def test_config_from_recipe_table() -> None:
    cfg = from_mapping(
        IngestConfig,
        {"extensions": [".txt"], "recursive": False, "include": ["docs/**"], "exclude": ["**/draft*"], "on_error": "skip", "csv_column": "body"},
        source="recipe.toml",
        prefix="ingest",
    )
    assert cfg.extensions == [".txt"] and not cfg.recursive and cfg.on_error == "skip" and cfg.include == ["docs/**"]
    assert IngestConfig().max_document_bytes == 64 << 20 and IngestConfig().on_error == "fail"
    bad = [
        ({"jsonl_feild": "body"}, r"ingest\.jsonl_feild"),
        ({"extensions": ["txt"]}, "must start with a dot"),
        ({"extensions": [".txt.gz"]}, "compressed files"),
        ({"max_document_bytes": "big"}, r"ingest\.max_document_bytes"),
        ({"max_document_bytes": -1}, "max_document_bytes"),
        ({"on_error": "ignore"}, r"ingest\.on_error"),
        ({"include": []}, "include"),
        ({"exclude": ["/abs/**"]}, "relative"),
        ({"include": ["docs/"]}, "docs/\\*\\*"),
        ({"exclude": ["[z-a].txt"]}, "not a valid pattern"),
        ({"max_file_bytes": 10}, r"ingest\.max_file_bytes"),
    ]
    for table, pattern in bad:
        with pytest.raises(ConfigError, match=pattern):
            from_mapping(IngestConfig, table, source="recipe.toml", prefix="ingest")


_PEAK_RSS = textwrap.dedent("""
    import gzip, json, resource, sys
    from pathlib import Path
    from pipeline.ingest import IngestConfig, run_ingest
    src, target = Path(sys.argv[1]), int(sys.argv[2])
    src.mkdir(parents=True)
    # A few KB of varied lines, repeated with a counter: fast to make, not trivially compressible per row.
    block = [json.dumps({"id": i, "text": f"document {{n}} " + " ".join(f"word{j * i % 997}" for j in range(60 + i))}) for i in range(40)]
    with gzip.open(src / "big.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as f:
        n = written = 0
        while written < target:
            for line in block:
                text = line.replace("{n}", str(n)) + "\\n"
                f.write(text)
                written += len(text)
                n += 1
    result = run_ingest(src, src.parent / "out", IngestConfig())
    print(result.stats["documents"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


@pytest.mark.slow
def test_memory_stays_flat_on_a_big_compressed_jsonl(tmp_path: Path) -> None:
    peaks = {}
    for name, size in (("small", 25 << 20), ("large", 250 << 20)):
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, str(tmp_path / name / "src"), str(size)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        documents, peak_kb = map(int, proc.stdout.split())
        peaks[name] = peak_kb * 1024
        assert documents > size // 2000
    assert peaks["large"] - peaks["small"] < 64 << 20, peaks
