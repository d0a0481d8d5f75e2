"""Ingest: every format, sorted stable doc_ids, and every kind of bad input refused by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keys.digest import sha256_file
from keys.errors import ConfigError, DataError
from pipeline.config import from_mapping
from pipeline.ingest import IngestConfig, run_ingest


def write_parquet(path: Path, columns: dict[str, list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "b" / "deep").mkdir(parents=True)
    (src / "a.txt").write_text("first document\nwith two lines\n", encoding="utf-8")
    (src / "b" / "notes.md").write_text("# Title\n\n    indented code\n", encoding="utf-8")
    (src / "b" / "deep" / "docs.jsonl").write_text(
        json.dumps({"text": "line one", "id": 1}) + "\n\n" + json.dumps({"text": "line three"}) + "\n", encoding="utf-8"
    )
    write_parquet(src / "c.parquet", {"text": ["row zero", "row one"], "other": [1, 2]})
    (src / "ignored.csv").write_text("a,b\n", encoding="utf-8")
    (src / ".hidden.txt").write_text("editor swap file", encoding="utf-8")
    return src


def read_raw(out: Path) -> list[dict]:
    return pq.read_table(out / "raw.parquet").to_pylist()


def test_every_format_in_sorted_order(source: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int, str]] = []
    result = run_ingest(source, tmp_path / "out", IngestConfig(), progress=lambda d, t, f: seen.append((d, t, f["file"])))
    rows = read_raw(tmp_path / "out")
    assert [(r["doc_id"], r["source"], r["record"], r["text"]) for r in rows] == [
        (0, "a.txt", 0, "first document\nwith two lines\n"),
        (1, "b/deep/docs.jsonl", 1, "line one"),
        (2, "b/deep/docs.jsonl", 3, "line three"),
        (3, "b/notes.md", 0, "# Title\n\n    indented code\n"),
        (4, "c.parquet", 0, "row zero"),
        (5, "c.parquet", 1, "row one"),
    ]
    assert rows[4]["source_sha256"] == sha256_file(source / "c.parquet")
    assert result.outputs == {"raw": tmp_path / "out" / "raw.parquet"}
    assert result.stats["files"] == 4 and result.stats["documents"] == 6 and result.stats["files_ignored"] == 2
    assert result.stats["bytes"] == sum(x["bytes"] for x in result.inputs)
    assert [(x["path"], x["documents"]) for x in result.inputs] == [
        ("a.txt", 1), ("b/deep/docs.jsonl", 2), ("b/notes.md", 1), ("c.parquet", 2)
    ]
    for entry in result.inputs:
        assert entry["sha256"] == sha256_file(source / entry["path"])
        assert entry["bytes"] == (source / entry["path"]).stat().st_size
    assert seen == [(1, 4, "a.txt"), (2, 4, "b/deep/docs.jsonl"), (3, 4, "b/notes.md"), (4, 4, "c.parquet")]


def test_rerun_is_byte_identical(source: Path, tmp_path: Path) -> None:
    run_ingest(source, tmp_path / "one", IngestConfig())
    run_ingest(source, tmp_path / "two", IngestConfig())
    assert (tmp_path / "one" / "raw.parquet").read_bytes() == (tmp_path / "two" / "raw.parquet").read_bytes()


def test_options_recursive_hidden_fields_extensions(source: Path, tmp_path: Path) -> None:
    flat = run_ingest(source, tmp_path / "flat", IngestConfig(recursive=False))
    assert [x["path"] for x in flat.inputs] == ["a.txt", "c.parquet"]
    hidden = run_ingest(source, tmp_path / "hidden", IngestConfig(include_hidden=True, extensions=[".TXT"]))
    assert [x["path"] for x in hidden.inputs] == [".hidden.txt", "a.txt"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "x.jsonl").write_text(json.dumps({"body": "b"}) + "\n", encoding="utf-8")
    write_parquet(other / "y.parquet", {"content": ["c"]})
    run_ingest(other, tmp_path / "o", IngestConfig(jsonl_field="body", parquet_column="content"))
    assert [r["text"] for r in read_raw(tmp_path / "o")] == ["b", "c"]


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "bom.txt").write_bytes(b"\xef\xbb\xbfhello")
    run_ingest(src, tmp_path / "out", IngestConfig())
    assert read_raw(tmp_path / "out")[0]["text"] == "hello"


# (file name, content writer, words the message must contain)
BAD_INPUTS = {
    "latin1": ("bad.txt", lambda p: p.write_bytes(b"ok\ncaf\xe9\n"), ["bad.txt", "offset 6", "line 2", "UTF-8"]),
    "binary": ("img.md", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00"), ["img.md", "binary", "offset 8"]),
    "utf16": ("wide.txt", lambda p: p.write_bytes("hi".encode("utf-16")), ["wide.txt", "binary"]),
    "malformed_json": (
        "d.jsonl",
        lambda p: p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8"),
        ["d.jsonl", "line 3", "malformed JSON", "column"],
    ),
    "missing_field": ("d.jsonl", lambda p: p.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8"), ["d.jsonl", "line 2", "'text'", "body"]),
    "not_a_string": ("d.jsonl", lambda p: p.write_text('{"text": 5}\n', encoding="utf-8"), ["d.jsonl", "line 1", "not a string"]),
    "not_an_object": ("d.jsonl", lambda p: p.write_text('["text"]\n', encoding="utf-8"), ["d.jsonl", "line 1", "object"]),
    "lone_surrogate": (
        "d.jsonl",
        lambda p: p.write_text('{"text": "ok \\ud83c\\udf89"}\n{"text": "bad \\ud800"}\n', encoding="utf-8"),
        ["d.jsonl", "line 2", "surrogate"],
    ),
    "no_column": ("t.parquet", lambda p: write_parquet(p, {"body": ["x"]}), ["t.parquet", "'text'", "body"]),
    "int_column": ("t.parquet", lambda p: write_parquet(p, {"text": [1, 2]}), ["t.parquet", "not strings"]),
    "null_row": ("t.parquet", lambda p: write_parquet(p, {"text": ["a", None]}), ["t.parquet", "row 1", "null"]),
    "not_parquet": ("t.parquet", lambda p: p.write_bytes(b"PAR1 but not really"), ["t.parquet", "parquet"]),
    "broken_link": ("gone.txt", lambda p: p.symlink_to(p.parent / "nowhere.txt"), ["gone.txt", "cannot read"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_the_file_and_writes_nothing(case: str, tmp_path: Path) -> None:
    name, write, words = BAD_INPUTS[case]
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_good.txt").write_text("a good document comes first", encoding="utf-8")
    write(src / name)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        run_ingest(src, out, IngestConfig())
    for word in words:
        assert word in info.value.message, (word, info.value.message)
    assert info.value.hint
    assert not out.exists()


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    src = tmp_path / "src"
    src.mkdir()
    (src / "secret.txt").write_text("x", encoding="utf-8")
    (src / "secret.txt").chmod(0)
    with pytest.raises(DataError, match="secret.txt"):
        run_ingest(src, tmp_path / "out", IngestConfig())


def test_existing_output_dir_keeps_no_partial_file(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "d.jsonl").write_text('{"text": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError):
        run_ingest(src, out, IngestConfig())
    assert list(out.iterdir()) == []


def test_empty_folder_lists_extensions(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.pdf").write_bytes(b"%PDF")
    with pytest.raises(DataError) as info:
        run_ingest(tmp_path / "src", tmp_path / "out", IngestConfig())
    assert ".txt, .md, .jsonl, .parquet" in info.value.message and "src" in info.value.message
    assert "ingest.extensions" in info.value.hint
    with pytest.raises(DataError, match="does not exist"):
        run_ingest(tmp_path / "missing", tmp_path / "out", IngestConfig())
    assert not (tmp_path / "out").exists()


def test_max_file_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.txt").write_text("x" * 100, encoding="utf-8")
    with pytest.raises(DataError) as info:
        run_ingest(src, tmp_path / "out", IngestConfig(max_file_bytes=50))
    assert "big.txt" in info.value.message and "ingest.max_file_bytes" in info.value.hint
    assert run_ingest(src, tmp_path / "out", IngestConfig(max_file_bytes=0)).stats["documents"] == 1


def test_config_from_recipe_table() -> None:
    cfg = from_mapping(IngestConfig, {"extensions": [".txt"], "recursive": False}, source="recipe.toml", prefix="ingest")
    assert cfg.extensions == [".txt"] and not cfg.recursive
    with pytest.raises(ConfigError, match=r"ingest\.jsonl_feild"):
        from_mapping(IngestConfig, {"jsonl_feild": "body"}, source="recipe.toml", prefix="ingest")
    with pytest.raises(ConfigError, match="must start with a dot"):
        from_mapping(IngestConfig, {"extensions": ["txt"]}, source="recipe.toml", prefix="ingest")
    with pytest.raises(ConfigError, match=r"ingest\.max_file_bytes"):
        from_mapping(IngestConfig, {"max_file_bytes": "big"}, source="recipe.toml", prefix="ingest")
