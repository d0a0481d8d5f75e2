"""Curation: filters, redaction and dedup wired together; byte-identical for any worker count."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keys.digest import sha256_file
from pipeline.clean import CleanConfig
from pipeline.curate import CurateSettings, run_curate, source_group
from pipeline.errors import DataError
from pipeline.filters import FiltersConfig
from pipeline.minhash import DedupConfig
from pipeline.pii import PiiConfig
from pipeline.result import write_json

RAW_SCHEMA = pa.schema([("doc_id", pa.int64()), ("source", pa.string()), ("source_sha256", pa.string()), ("record", pa.int64()), ("text", pa.string())])

WORDS = (
    "the of and to in that is was for with as on by at from this have be are which it not or an were but had "
    "their its been has more also other into than new some could these two may first time only after most over "
    "river valley council harbour committee report budget railway engineer market village season library museum "
    "garden bridge school hospital station ministry archive survey parish weather voyage island mountain forest"
).split()


def prose(rng: random.Random, sentences: int = 12) -> str:
    """Plain English-like prose that passes every default quality filter."""
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(12, 20))]
        out.append(" ".join(words).capitalize() + ".")
    # Lines of a few sentences each: long lines that end in punctuation, as in real prose.
    return "\n".join(" ".join(out[i : i + 3]) for i in range(0, len(out), 3))


def write_raw(path: Path, docs: list[tuple[str, str]]) -> Path:
    table = pa.table(
        {
            "doc_id": list(range(len(docs))),
            "source": [s for s, _ in docs],
            "source_sha256": ["0" * 64] * len(docs),
            "record": list(range(len(docs))),
            "text": [t for _, t in docs],
        },
        schema=RAW_SCHEMA,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def mixed_corpus(n: int = 700, seed: int = 7) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    docs: list[tuple[str, str]] = []
    for i in range(n):
        src = f"team{i % 3}/file{i % 5}.jsonl"
        kind = i % 10
        if kind == 0 and docs:
            docs.append((src, docs[rng.randrange(len(docs))][1]))  # exact duplicate
        elif kind == 1 and docs:
            words = docs[rng.randrange(len(docs))][1].split(" ")
            j = rng.randrange(len(words))
            words[j] = "archipelago"  # one word edited: a near duplicate
            docs.append((src, " ".join(words)))
        elif kind == 2:
            docs.append((src, "lorem ipsum dolor sit amet. " + prose(rng)))  # C4 drops the document
        elif kind == 3:
            docs.append((src, prose(rng) + f"\nWrite to clerk{i}@example.org or call the office."))  # e-mail redacted
        elif kind == 4:
            docs.append((src, "menu\n" * 30))  # repetition and too short
        else:
            docs.append((src, prose(rng)))
    return docs


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_raw(tmp_path_factory.mktemp("raw") / "raw.parquet", mixed_corpus())


def settings(workers: int, **kw: object) -> CurateSettings:
    return CurateSettings(clean=CleanConfig(workers=workers, min_chars=32), **kw)  # type: ignore[arg-type]


def test_output_identical_for_one_and_two_workers(raw: Path, tmp_path: Path) -> None:
    one = run_curate(raw, tmp_path / "w1", settings(1))
    two = run_curate(raw, tmp_path / "w2", settings(2))
    for name in ("dataset", "curation", "dropped"):
        assert sha256_file(one.outputs[name]) == sha256_file(two.outputs[name]), name
    assert one.stats["workers"] == 1 and two.stats["workers"] == 2
    # and on a re-run
    again = run_curate(raw, tmp_path / "again", settings(2))
    assert sha256_file(again.outputs["dataset"]) == sha256_file(two.outputs["dataset"])


def test_every_kind_of_drop_is_counted(raw: Path, tmp_path: Path) -> None:
    res = run_curate(raw, tmp_path / "out", settings(1))
    dropped = res.stats["dropped"]
    assert dropped["dedup.exact"] > 30
    assert dropped["dedup.near"] > 30
    assert dropped["c4.lorem_ipsum"] >= 60
    assert sum(v for k, v in dropped.items() if k.startswith(("gopher", "clean"))) >= 60
    assert res.stats["pii"]["email"] >= 60
    report = json.loads(res.outputs["curation"].read_text())
    assert report["documents_in"] == 700
    assert report["documents_out"] == res.stats["documents_out"] == 700 - sum(dropped.values())
    assert set(report["by_source"]) == {"team0", "team1", "team2"}
    assert sum(s["documents_in"] for s in report["by_source"].values()) == 700
    assert sum(s["documents_out"] for s in report["by_source"].values()) == report["documents_out"]
    assert report["dedup"]["near_clusters"] >= 1 and report["dedup"]["largest_clusters"]
    texts = pq.read_table(res.outputs["dataset"]).column("text").to_pylist()
    assert not any("@example.org" in t for t in texts)
    assert any("<EMAIL>" in t for t in texts)
    assert not any("lorem ipsum" in t for t in texts)


def test_dropped_samples_name_rule_and_kept_duplicate(raw: Path, tmp_path: Path) -> None:
    res = run_curate(raw, tmp_path / "out", settings(1, dedup=DedupConfig()))
    rows = pq.read_table(res.outputs["dropped"]).to_pylist()
    by_rule: dict[str, int] = {}
    for r in rows:
        by_rule[f"{r['filter']}.{r['rule']}"] = by_rule.get(f"{r['filter']}.{r['rule']}", 0) + 1
    assert by_rule["dedup.exact"] == 20 and by_rule["c4.lorem_ipsum"] == 20  # the default sample size
    dup = next(r for r in rows if r["rule"] == "exact")
    kept_id = int(dup["detail"].rsplit(" ", 1)[1])
    kept = {r["doc_id"]: r["text"] for r in pq.read_table(res.outputs["dataset"]).to_pylist()}
    assert kept[kept_id] == dup["text"] and kept_id < dup["doc_id"]


def test_switches_turn_steps_off(raw: Path, tmp_path: Path) -> None:
    off = FiltersConfig()
    for name in ("gopher_repetition", "gopher_quality", "c4", "fineweb"):
        getattr(off, name).enabled = False
    res = run_curate(raw, tmp_path / "off", settings(1, filters=off, pii=PiiConfig(enabled=False), dedup=DedupConfig(exact=False, near=False)))
    assert set(res.stats["dropped"]) <= {"clean.too_short"}
    texts = pq.read_table(res.outputs["dataset"]).column("text").to_pylist()
    assert any("@example.org" in t for t in texts)


def test_nothing_left_names_the_rules(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw.parquet", [("a.txt", "menu\n" * 30), ("b.txt", "short")])
    with pytest.raises(DataError) as info:
        run_curate(raw, tmp_path / "out", settings(1))
    assert "no documents left" in info.value.message and "clean.too_short" in info.value.message
    assert not (tmp_path / "out" / "dataset.parquet").exists()


def test_source_group() -> None:
    assert source_group("team/a/b.txt") == "team"
    assert source_group("top.jsonl") == "top.jsonl"


def test_dropped_samples_are_redacted_too(tmp_path: Path) -> None:
    rng = random.Random(3)
    docs = [("a.txt", prose(rng)) for _ in range(5)] + [("b.txt", "lorem ipsum. Mail jane.doe@example.org today. " + prose(rng))]
    res = run_curate(write_raw(tmp_path / "raw.parquet", docs), tmp_path / "out", settings(1))
    rows = pq.read_table(res.outputs["dropped"]).to_pylist()
    sample = next(r for r in rows if r["rule"] == "lorem_ipsum")
    assert "jane.doe@example.org" not in sample["text"] and "<EMAIL>" in sample["text"]


@pytest.mark.parametrize(
    ("ensure_ascii", "expected"),
    [
        (False, b'{\n  "a": {\n    "\xc3\xa9": "\xc3\xbc\xe2\x80\xa8"\n  },\n  "m": true,\n  "z": [\n    1,\n    2.5,\n    null\n  ]\n}\n'),
        (True, b'{\n  "a": {\n    "\\u00e9": "\\u00fc\\u2028"\n  },\n  "m": true,\n  "z": [\n    1,\n    2.5,\n    null\n  ]\n}\n'),
    ],
)
def test_stage_json_bytes_are_unchanged(tmp_path: Path, ensure_ascii: bool, expected: bytes) -> None:
    # Stored digests of stage outputs depend on these exact bytes (those the plain write_text gave before
    # write_json became atomic): sorted keys, indent 2, the given ensure_ascii, one trailing newline.
    obj = {"z": [1, 2.5, None], "a": {"é": "ü\u2028"}, "m": True}
    path = write_json(tmp_path / "x.json", obj, ensure_ascii=ensure_ascii)
    assert path.read_bytes() == expected
    assert write_json(tmp_path / "y.json", dict(reversed(obj.items())), ensure_ascii=ensure_ascii).read_bytes() == expected
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # read by the service and other tools
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "y.json"]
