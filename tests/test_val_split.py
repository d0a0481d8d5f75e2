"""Every run has validation tokens: a one-document corpus is split by token range, and an
empty or too-short val split is refused before training, not found after it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentencepiece as spm

from appliance.recipe import parse_recipe
from appliance.service.training import StageContext, require_validation, train_stage
from keys.digest import dir_manifest
from pipeline.errors import DataError
from pipeline.shard import MIN_SIDE_TOKENS, ShardConfig, run_shard, token_range_cut
from pipeline.shard_format import MANIFEST, open_shards, read_manifest, read_shard, write_manifest, write_shard
from pipeline.train import run_train
from tests.test_shard import write_dataset
from tests.training_fixtures import corpus, shards_dir, tiny_model, tiny_train, tokenizer_path  # noqa: F401  (fixtures)

ASSETS = Path(__file__).parent / "assets"


def one_big_document() -> str:
    return "\n".join(corpus(300, seed=4))


def test_one_document_is_split_by_token_range(tokenizer_path: Path, tmp_path: Path) -> None:
    text = one_big_document()
    data = write_dataset(tmp_path / "one.parquet", [text])
    cfg = {"val_fraction": 0.1, "shard_tokens": 700, "seed": 3}
    one = run_shard(data, tokenizer_path, tmp_path / "w1", ShardConfig(**cfg, workers=1))
    two = run_shard(data, tokenizer_path, tmp_path / "w2", ShardConfig(**cfg, workers=2))
    assert dir_manifest(tmp_path / "w1" / "shards") == dir_manifest(tmp_path / "w2" / "shards")
    assert {k: v for k, v in one.stats.items() if k != "workers"} == {k: v for k, v in two.stats.items() if k != "workers"}

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = sp.encode(text)
    n = len(ids)
    tail = math.ceil(n / 10)
    s = one.stats
    assert s["val_split"] == "token_range" and s["documents"] == 1
    assert s["val_tokens"] == tail + 1 and s["train_tokens"] == 1 + n - tail  # + eos, + bos
    assert s["train_shards"] > 1  # the head still fills several files

    shards = open_shards(tmp_path / "w1" / "shards")
    assert shards.manifest["val_split"] == "token_range"
    assert shards.manifest["documents"] == {"train": 1, "val": 1}
    train, val = (np.asarray(shards.tokens(split), dtype=np.int64) for split in ("train", "val"))
    # Joined, the two pieces are the document framed once: no <s> or </s> invented at the cut.
    assert np.concatenate([train, val]).tolist() == [sp.bos_id(), *ids, sp.eos_id()]
    assert sp.eos_id() not in train.tolist() and sp.bos_id() not in val.tolist()


def test_two_documents_keep_the_document_split(tokenizer_path: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "two.parquet", [one_big_document(), "a small bird finds the tall tree."])
    result = run_shard(data, tokenizer_path, tmp_path / "out", ShardConfig(val_fraction=0.1, workers=1))
    assert result.stats["val_split"] == "documents" and result.stats["val_documents"] == 1
    assert open_shards(tmp_path / "out" / "shards").manifest["val_split"] == "documents"


def test_token_range_cut_uses_the_decimal_fraction() -> None:
    # 0.1 × 30 is 3.0000000000000004 in binary floating point; the cut must hold out 3, not 4.
    assert token_range_cut(30, 0.1, Path("d.parquet")) == 27
    assert token_range_cut(2 * MIN_SIDE_TOKENS, 0.5, Path("d.parquet")) == MIN_SIDE_TOKENS


@pytest.mark.parametrize(("text", "fraction"), [("the cat sees", 0.05), ("the cat sees a dog.", 0.9)], ids=["no-val-side", "no-train-side"])
def test_a_document_too_short_to_split_names_the_settings(tokenizer_path: Path, tmp_path: Path, text: str, fraction: float) -> None:
    data = write_dataset(tmp_path / "short.parquet", [text])
    with pytest.raises(DataError, match=rf"single document of \d+ tokens.*\[shard\] val_fraction = {fraction}") as err:
        run_shard(data, tokenizer_path, tmp_path / "out", ShardConfig(val_fraction=fraction, workers=1))
    assert "[ingest] split" in err.value.hint and "[shard] val_fraction" in err.value.hint
    assert "`appliance run RECIPE`" in err.value.hint
    assert not (tmp_path / "out" / "shards").exists() and not (tmp_path / "out" / "shards.partial").exists()


def strip_val(shards_dir: Path, out: Path, keep_val_tokens: int = 0) -> Path:
    """A copy of the shard set whose val split is empty (as sharded before this change) or cut short."""
    shutil.copytree(shards_dir, out)
    manifest = json.loads((out / MANIFEST).read_text())
    train = [{k: e[k] for k in ("file", "split", "tokens")} for e in manifest["shards"] if e["split"] == "train"]
    val = out / "val_000.bin"
    entries = train
    if keep_val_tokens:
        ids = np.asarray(read_shard(val))[:keep_val_tokens].copy()
        write_shard(val, ids, manifest["vocab_size"])
        entries = train + [{"file": "val_000.bin", "split": "val", "tokens": keep_val_tokens}]
    else:
        val.unlink()
    (out / MANIFEST).unlink()
    documents = {"train": 1, "val": 1 if keep_val_tokens else 0}
    write_manifest(out, vocab_size=manifest["vocab_size"], bos_id=manifest["bos_id"], eos_id=manifest["eos_id"], shards=entries, extra={"documents": documents})
    open_shards(out)  # consistent: digests and counts verify
    return out


def test_training_refuses_an_empty_val_split_before_step_one(shards_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    bad = strip_val(shards_dir, tmp_path / "shards")
    events: list[dict[str, Any]] = []
    with pytest.raises(DataError) as err:
        run_train(bad, tmp_path / "out", tiny_model(), tiny_train(steps=3, num_threads=1), on_event=events.append)
    assert f"shard set {bad} has no validation tokens (its manifest lists 0 validation documents)" in err.value.message
    assert "not damaged" in err.value.message
    assert "[ingest] split" in err.value.hint and "[shard] val_fraction" in err.value.hint and "start a new run" in err.value.hint
    assert events == []  # not even "started": no model was built
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "final").exists()


def test_training_refuses_a_val_split_shorter_than_one_window(shards_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    bad = strip_val(shards_dir, tmp_path / "shards", keep_val_tokens=10)
    with pytest.raises(DataError, match=r"holds 10 validation tokens, fewer than one evaluation window of 17 \(train\.seq_len = 16") as err:
        run_train(bad, tmp_path / "out", tiny_model(), tiny_train(steps=3, seq_len=16, num_threads=1))
    assert "lower train.seq_len" in err.value.hint and "[shard] val_fraction" in err.value.hint
    assert not (tmp_path / "out" / "checkpoints").exists()
    # The same val split is enough for a shorter window: in-training eval then runs, at the last step.
    res = run_train(bad, tmp_path / "ok", tiny_model(), tiny_train(steps=2, seq_len=8, batch_size=2, num_threads=1))
    assert res.stats["val_loss"] is not None


def test_the_service_refuses_before_launching_the_job(shards_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    recipe = parse_recipe((ASSETS / "tiny.toml").read_text(), source="tiny.toml")  # train.seq_len 32, model.max_seq_len 64
    ctx = StageContext(run_id="r1", provenance={}, recipe_dir=tmp_path)
    empty = strip_val(shards_dir, tmp_path / "empty")
    with pytest.raises(DataError, match="has no validation tokens"):
        train_stage(recipe, {"shards": empty}, tmp_path / "work", lambda d, t, f: None, ctx)
    assert not (tmp_path / "work").exists()  # no job spec, no job
    # 40 tokens: enough for training's window of 33, not for the evaluate stage's of 65.
    short = strip_val(shards_dir, tmp_path / "short", keep_val_tokens=40)
    with pytest.raises(DataError, match=r"window of 65 \(model\.max_seq_len = 64") as err:
        require_validation(recipe, short)
    assert "lower evaluate.seq_len (0 uses model.max_seq_len)" in err.value.hint
    assert read_manifest(short)["documents"] == {"train": 1, "val": 1}
    require_validation(recipe, shards_dir)  # the fixture's val split is long enough for both
