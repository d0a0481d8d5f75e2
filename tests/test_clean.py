"""Clean: the normalisation rules and size limits, run through curation with every other step off."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.clean import CleanConfig, clean_text
from pipeline.config import from_mapping
from pipeline.curate import CurateSettings, run_curate
from pipeline.errors import ConfigError, DataError
from pipeline.filters import FiltersConfig
from pipeline.ingest import RAW_SCHEMA
from pipeline.minhash import DedupConfig
from pipeline.pii import PiiConfig
from pipeline.result import ProgressFn, StageResult, no_progress

DEFAULT = CleanConfig(min_chars=0, workers=1)


def run_clean(raw: Path, out: Path, cfg: CleanConfig, progress: ProgressFn = no_progress, *, exact: bool = True) -> StageResult:
    """Curation reduced to the clean step (and exact dedup): quality filters, PII and MinHash off."""
    filters = FiltersConfig()
    for name in ("gopher_repetition", "gopher_quality", "c4", "fineweb"):
        getattr(filters, name).enabled = False
    settings = CurateSettings(clean=cfg, filters=filters, pii=PiiConfig(enabled=False), dedup=DedupConfig(exact=exact, near=False))
    return run_curate(raw, out, settings, progress)


def write_raw(path: Path, texts: list[str], doc_ids: list[int] | None = None) -> Path:
    ids = doc_ids if doc_ids is not None else list(range(len(texts)))
    table = pa.table(
        {
            "doc_id": ids,
            "source": [f"f{i}.txt" for i in ids],
            "source_sha256": ["0" * 64] * len(texts),
            "record": [0] * len(texts),
            "text": texts,
        },
        schema=RAW_SCHEMA,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("cafe\u0301", "café"),  # NFC composes e + combining acute
        ("a\x00b\x07c\x1bd\x7fe\x85f", "abcdef"),  # C0, DEL and C1 controls go
        ("keep\ttab", "keep\ttab"),  # a single tab inside a line stays
        ("win\r\nmac\rend", "win\nmac\nend"),
        ("trailing   \nspaces\t\t\n", "trailing\nspaces"),
        ("a\n\n\n\n\nb", "a\n\nb"),  # any run of blank lines -> one blank line
        ("a\n\nb", "a\n\nb"),
        ("\n\n\nstart and end\n\n", "start and end"),
        ("x  =   1\t\t# note", "x = 1 # note"),
        ("def f():\n    return  1\n\tpass", "def f():\n    return 1\n\tpass"),  # indentation kept
        ("e\x01\u0301", "é"),  # a control char between letter and accent must not block NFC
        ("  \n  \n  \n  \nx", "x"),  # whitespace-only lines are blank lines
        ("", ""),
    ],
)
def test_clean_text_rules(raw: str, cleaned: str) -> None:
    assert clean_text(raw, DEFAULT) == cleaned


def test_clean_text_switches() -> None:
    assert clean_text("a    b", CleanConfig(collapse_whitespace=False)) == "a    b"
    assert clean_text("a\x00b", CleanConfig(strip_control=False)) == "a\x00b"
    assert clean_text("cafe\u0301", CleanConfig(normalization="none")) == "cafe\u0301"
    assert clean_text("x\u00b2 \ufb01", CleanConfig(normalization="NFKC")) == "x2 fi"


TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(" \t\n\r\x00\x0b\x1b\x85\u00a0e\u0301\u0308\u00e9\u1e9b\u0323\u212b\u00b2\ufb01")),
        st.characters(),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(TEXT, st.sampled_from(["NFC", "NFKC", "none"]), st.booleans(), st.booleans())
def test_clean_text_is_idempotent(text: str, normalization: str, strip_control: bool, collapse: bool) -> None:
    cfg = CleanConfig(normalization=normalization, strip_control=strip_control, collapse_whitespace=collapse)  # type: ignore[arg-type]
    once = clean_text(text, cfg)
    assert clean_text(once, cfg) == once
    assert "\r" not in once and not once.startswith("\n") and not once.endswith("\n")


def test_run_clean_filters_and_dedups(tmp_path: Path) -> None:
    texts = [
        "short",  # 0: dropped, under min_chars
        "the first copy of a document",  # 1: kept
        "the first copy of a   document  ",  # 2: same after cleaning -> duplicate of 1
        "a different document here",  # 3: kept
        "the first copy of a document",  # 4: duplicate of 1
        "x" * 200,  # 5: dropped, over max_chars
    ]
    raw = write_raw(tmp_path / "raw.parquet", texts, doc_ids=[10, 11, 12, 13, 14, 15])
    seen: list[int] = []
    result = run_clean(raw, tmp_path / "out", CleanConfig(min_chars=10, max_chars=100, workers=1), progress=lambda d, t, f: seen.append(d))
    rows = pq.read_table(tmp_path / "out" / "dataset.parquet").to_pylist()
    assert [r["doc_id"] for r in rows] == [11, 13]
    assert rows[0] == {
        "doc_id": 11,
        "source": "f11.txt",
        "text": "the first copy of a document",
        "sha256": hashlib.sha256(b"the first copy of a document").hexdigest(),
    }
    assert result.stats["documents_in"] == 6 and result.stats["documents_out"] == 2
    assert result.stats["dropped"] == {"clean.too_short": 1, "clean.too_long": 1, "dedup.exact": 2}
    assert result.stats["chars_out"] == result.stats["bytes_out"] == len(texts[1]) + len(texts[3])
    assert set(result.outputs) == {"dataset", "curation", "dropped"}
    assert seen[-1] == 6
    kept = run_clean(raw, tmp_path / "nodedup", CleanConfig(min_chars=10, workers=1), exact=False)
    assert kept.stats["documents_out"] == 5 and "dedup.exact" not in kept.stats["dropped"]


def test_run_clean_is_byte_identical(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw.parquet", [f"document number {i}\n\n\n\nwith  text" for i in range(50)])
    run_clean(raw, tmp_path / "a", DEFAULT)
    run_clean(raw, tmp_path / "b", DEFAULT)
    assert (tmp_path / "a" / "dataset.parquet").read_bytes() == (tmp_path / "b" / "dataset.parquet").read_bytes()


def test_nothing_left_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw.parquet", ["tiny", "also tiny"])
    with pytest.raises(DataError) as info:
        run_clean(raw, tmp_path / "out", CleanConfig(min_chars=100, workers=1))
    assert "raw.parquet" in info.value.message and "clean.min_chars" in info.value.hint
    assert not (tmp_path / "out").exists()


def test_bad_raw_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.parquet"):
        run_clean(tmp_path / "missing.parquet", tmp_path / "out", DEFAULT)
    pq.write_table(pa.table({"doc_id": [0], "body": ["x"]}), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"cols\.parquet has no column 'source'"):
        run_clean(tmp_path / "cols.parquet", tmp_path / "out", DEFAULT)
    raw = write_raw(tmp_path / "order.parquet", ["a document", "another one"], doc_ids=[5, 3])
    with pytest.raises(DataError, match=r"order\.parquet row 1"):
        run_clean(raw, tmp_path / "out", DEFAULT)
    assert not (tmp_path / "out").exists()


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"clean\.normalisation"):
        from_mapping(CleanConfig, {"normalisation": "NFC"}, source="recipe.toml", prefix="clean")
    with pytest.raises(ConfigError, match=r"clean\.normalization"):
        from_mapping(CleanConfig, {"normalization": "NFX"}, source="recipe.toml", prefix="clean")
    with pytest.raises(ConfigError, match="max_chars"):
        from_mapping(CleanConfig, {"min_chars": 10, "max_chars": 5}, source="recipe.toml", prefix="clean")
