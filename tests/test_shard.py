"""Shard: byte-identical reruns, order-independent splits, lossless encoding, tamper detection."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keys.digest import dir_manifest, sha256_file
from pipeline.config import from_mapping
from pipeline.errors import ConfigError, DataError, ShardIntegrityError
from pipeline.shard import ShardConfig, assign_splits, run_shard
from pipeline.shard_format import open_shards
from pipeline.tokenizer import TokenizerConfig, load_tokenizer, run_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()


def documents(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [
        "\n".join(("    " if rng.random() < 0.3 else "") + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 6)))
        + f" {i}"  # every document distinct
        for i in range(n)
    ]


def write_dataset(path: Path, texts: list[str], with_sha: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list] = {"doc_id": list(range(len(texts))), "text": texts}
    if with_sha:
        columns["sha256"] = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shard")
    write_dataset(root / "dataset.parquet", documents(200))
    run_tokenizer(root / "dataset.parquet", root, TokenizerConfig(vocab_size=300))
    return root


CFG = ShardConfig(val_fraction=0.1, shard_tokens=1000, seed=5)


def test_reruns_are_byte_identical(work: Path, tmp_path: Path) -> None:
    a = run_shard(work / "dataset.parquet", work / "tokenizer.model", tmp_path / "a", CFG)
    b = run_shard(work / "dataset.parquet", work / "tokenizer.model", tmp_path / "b", CFG)
    assert a.outputs == {"shards": tmp_path / "a" / "shards"}
    assert dir_manifest(tmp_path / "a" / "shards") == dir_manifest(tmp_path / "b" / "shards")
    assert a.stats == b.stats
    assert not (tmp_path / "a" / "shards.partial").exists()


def test_shards_hold_every_document_losslessly(work: Path, tmp_path: Path) -> None:
    seen: list[int] = []
    result = run_shard(work / "dataset.parquet", work / "tokenizer.model", tmp_path, CFG, progress=lambda d, t, f: seen.append(d))
    stats = result.stats
    assert stats["documents"] == 200 == stats["train_documents"] + stats["val_documents"]
    assert stats["val_documents"] >= 1 and stats["train_shards"] > 1 and seen[-1] == 200
    shards = open_shards(tmp_path / "shards")
    manifest = shards.manifest
    assert manifest["tokenizer_sha256"] == sha256_file(work / "tokenizer.model")
    assert manifest["documents"] == {"train": stats["train_documents"], "val": stats["val_documents"]}
    assert manifest["seed"] == 5 and manifest["vocab_size"] == 300
    assert all(s["tokens"] <= 1000 for s in manifest["shards"])
    assert len(shards.shard_files("train")) == stats["train_shards"]

    sp = load_tokenizer(work / "tokenizer.model")
    texts = documents(200)
    shas = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    splits = assign_splits(shas, 5, 0.1)
    for split in ("train", "val"):
        ids = np.asarray(shards.tokens(split), dtype=np.int64)
        assert ids.size == stats[f"{split}_tokens"]
        # Cut the stream at each eos: every document comes back exactly, in doc_id order.
        ends = np.flatnonzero(ids == shards.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        decoded = [sp.decode(ids[s + 1 : e].tolist()) for s, e in zip(starts, ends)]
        assert all(ids[s] == shards.bos_id for s in starts)
        assert decoded == [t for t, sp_ in zip(texts, splits) if sp_ == split]


def test_split_depends_only_on_the_document(work: Path) -> None:
    shas = [hashlib.sha256(t.encode()).hexdigest() for t in documents(300)]
    base = dict(zip(shas, assign_splits(shas, 5, 0.1)))
    shuffled = shas[:]
    random.Random(0).shuffle(shuffled)
    assert dict(zip(shuffled, assign_splits(shuffled, 5, 0.1))) == base
    subset = shuffled[:150]
    assert dict(zip(subset, assign_splits(subset, 5, 0.1))) == {s: base[s] for s in subset}
    assert 10 < list(base.values()).count("val") < 50  # about 10 % of 300
    assert assign_splits(shas, 6, 0.1) != assign_splits(shas, 5, 0.1)


def test_tiny_corpus_still_has_both_splits(work: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "two.parquet", ["one small document", "another small document"], with_sha=False)
    result = run_shard(data, work / "tokenizer.model", tmp_path / "out", ShardConfig(val_fraction=0.001))
    assert result.stats["train_documents"] == 1 and result.stats["val_documents"] == 1
    assert result.stats["train_shards"] == 1 and result.stats["val_shards"] == 1
    assert assign_splits(["a" * 64], 0, 0.999) == ["train"]  # a lone document is for training


def test_tampered_shard_is_named(work: Path, tmp_path: Path) -> None:
    run_shard(work / "dataset.parquet", work / "tokenizer.model", tmp_path, CFG)
    victim = tmp_path / "shards" / "train_000001.bin"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="train_000001.bin"):
        open_shards(tmp_path / "shards")


def test_bad_inputs(work: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.model"):
        run_shard(work / "dataset.parquet", tmp_path / "missing.model", tmp_path / "out", CFG)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match=r"nocol\.parquet has no column 'text'"):
        run_shard(tmp_path / "nocol.parquet", work / "tokenizer.model", tmp_path / "out", CFG)
    pq.write_table(pa.table({"text": ["fine", None]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null\.parquet row 1"):
        run_shard(tmp_path / "null.parquet", work / "tokenizer.model", tmp_path / "out", CFG)
    assert not (tmp_path / "out" / "shards").exists() and not (tmp_path / "out" / "shards.partial").exists()


def test_config_validation() -> None:
    assert from_mapping(ShardConfig, {"val_fraction": 0.2}, source="recipe.toml", prefix="shard").val_fraction == 0.2
    with pytest.raises(ConfigError, match=r"shard\.val_frac"):
        from_mapping(ShardConfig, {"val_frac": 0.2}, source="recipe.toml", prefix="shard")
    with pytest.raises(ConfigError, match="val_fraction"):
        from_mapping(ShardConfig, {"val_fraction": 1.0}, source="recipe.toml", prefix="shard")


def test_worker_count_does_not_change_the_shards(work: Path, tmp_path: Path) -> None:
    # Several encode batches (512 documents each), so two workers really split the work.
    data = write_dataset(tmp_path / "many.parquet", documents(1500, seed=9))
    one = run_shard(data, work / "tokenizer.model", tmp_path / "one", ShardConfig(val_fraction=0.1, shard_tokens=5000, workers=1))
    two = run_shard(data, work / "tokenizer.model", tmp_path / "two", ShardConfig(val_fraction=0.1, shard_tokens=5000, workers=2))
    assert dir_manifest(tmp_path / "one" / "shards") == dir_manifest(tmp_path / "two" / "shards")
    assert one.stats["workers"] == 1 and two.stats["workers"] == 2
    assert {k: v for k, v in one.stats.items() if k != "workers"} == {k: v for k, v in two.stats.items() if k != "workers"}
