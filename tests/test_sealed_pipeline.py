"""The data stages and training on sealed outputs: nothing in the clear, same digests, same training.

A job told to seal its outputs (``keys.sealed.seal_path``, as the service configures it) must
write no document text or token in the clear (a marker planted in one source document is
found in no file), produce outputs whose digests equal a plain run's (digests are of the
plaintext), and train to the same bits; a home without sealing keeps its plain files.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from appliance.recipe import load_recipe
from keys import sealed
from keys.digest import sha256_path
from keys.sealed import SealedDataError
from pipeline.curate import CurateSettings, run_curate
from pipeline.ingest import run_ingest
from pipeline.parquet_io import PARQUET_OPTIONS, ParquetSink, iter_rows, open_parquet
from pipeline.shard import run_shard
from pipeline.shard_format import SealedTokens, open_shards, read_shard
from pipeline.tokenizer import load_tokenizer, run_tokenizer
from pipeline.train import run_train
from pipeline.training.loader import TokenLoader
from tests.sealed_fixtures import key_in_ring, keyring  # noqa: F401  (fixture)
from tests.training_fixtures import make_shards, tiny_model, tiny_train, tokenizer_path  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("keyring")

ASSETS = Path(__file__).with_name("assets")
MARKER = "ZQXJ-MARKER-7731"
STAGES = ("ingest", "curate", "tokenizer", "shard")


def corpus_with_marker(stdlib_corpus: Path, dest: Path) -> Path:
    """The tiny corpus with the marker planted in one document (which curation keeps)."""
    shutil.copytree(stdlib_corpus, dest)
    doc = dest / "topics" / "assignment.txt"
    text = doc.read_text(encoding="utf-8")
    cut = text.index("\n", len(text) // 2)
    doc.write_text(f"{text[:cut]}\nThe build was signed off under the code name {MARKER} by the release team.{text[cut:]}", encoding="utf-8")
    return dest


def seal_outputs(out: Path) -> dict[str, str]:
    """Seal the stage outputs as the service does: a key per artifact, a scratch key over each stage folder."""
    keys = {name: key_in_ring() for name in ("raw", "rejects", "dataset", "dropped", "shards", "scratch")}
    for stage in STAGES:
        sealed.seal_path(out / stage, keys["scratch"])
    sealed.seal_path(out / "ingest" / "raw.parquet", keys["raw"])
    sealed.seal_path(out / "ingest" / "rejects.parquet", keys["rejects"])
    sealed.seal_path(out / "curate" / "dataset.parquet", keys["dataset"])
    sealed.seal_path(out / "curate" / "dropped.parquet", keys["dropped"])
    sealed.seal_path(out / "curate" / "curate-stage1.parquet", keys["scratch"])
    sealed.seal_path(out / "shard" / "shards", keys["shards"])
    sealed.seal_path(out / "shard" / "shards.partial", keys["shards"])
    return keys


def data_stages(corpus: Path, out: Path) -> dict[str, Path]:
    """ingest -> curate -> tokenizer -> shard with the tiny recipe's settings; every output by name."""
    r = load_recipe(ASSETS / "tiny.toml").recipe
    ingest = run_ingest(corpus, out / "ingest", r.ingest)
    curate = run_curate(ingest.outputs["raw"], out / "curate", CurateSettings(clean=r.clean, filters=r.filters, pii=r.pii, dedup=r.dedup))
    tok = run_tokenizer(curate.outputs["dataset"], out / "tokenizer", r.tokenizer)
    shard = run_shard(curate.outputs["dataset"], tok.outputs["tokenizer"], out / "shard", r.shard)
    return {**ingest.outputs, **curate.outputs, **tok.outputs, **shard.outputs}


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def runs(tmp_path: Path, stdlib_corpus: Path) -> dict[str, Any]:
    corpus = corpus_with_marker(stdlib_corpus, tmp_path / "corpus")
    plain = data_stages(corpus, tmp_path / "plain")
    keys = seal_outputs(tmp_path / "sealed")
    outputs = data_stages(corpus, tmp_path / "sealed")
    return {"plain": plain, "sealed": outputs, "keys": keys, "root": tmp_path / "sealed", "plain_root": tmp_path / "plain"}


def test_sealed_data_stages_write_no_text_or_token_in_the_clear(runs: dict[str, Any]) -> None:
    plain, out, keys = runs["plain"], runs["sealed"], runs["keys"]
    marker = MARKER.encode()
    # The control: the marker survived curation, so the plain run's dataset holds it.
    with open_parquet(plain["dataset"], ["text"], "") as pf:
        assert sum(MARKER in text for rows in iter_rows(pf, ["text"]) for text in rows["text"]) == 1
    assert set(out) == set(plain)
    # Each artifact sealed under its own key (the .partial it was written as, under the final name's).
    assert sealed.header_key_id(out["raw"]) == keys["raw"]
    assert sealed.header_key_id(out["dataset"]) == keys["dataset"]
    assert sealed.header_key_id(out["dropped"]) == keys["dropped"]
    shard_files = sorted(out["shards"].glob("*.bin"))
    assert shard_files and all(sealed.header_key_id(p) == keys["shards"] for p in shard_files)
    assert not (runs["root"] / "curate" / "curate-stage1.parquet").exists()
    assert not (runs["root"] / "shard" / "shards.partial").exists()
    for path in files_under(runs["root"]):
        data = path.read_bytes()
        assert marker not in data, path
        if path.suffix in (".parquet", ".bin"):
            assert sealed.is_sealed(path), path
            # zstd hides a short string in a plain parquet file too: so no piece of the plain
            # run's file (its compressed pages, its token runs) may appear in the sealed one.
            twin = (runs["plain_root"] / path.relative_to(runs["root"])).read_bytes()
            assert not [i for i in range(0, len(twin) - 32, 256) if twin[i : i + 32] in data], path
    # The marker's token ids, as the plain shards hold them, are in no sealed shard either.
    sp = load_tokenizer(out["tokenizer"])
    ids = np.array(sp.encode(MARKER), dtype=np.uint16).tobytes()
    assert any(ids in p.read_bytes() for p in plain["shards"].glob("*.bin"))
    assert not any(ids in p.read_bytes() for p in shard_files)
    # Digests are of the plaintext: every output is the plain run's, byte for byte.
    for name in plain:
        assert sha256_path(out[name]) == sha256_path(plain[name]), name
    with open_parquet(out["dataset"], ["text"], "") as pf:
        assert any(MARKER in text for rows in iter_rows(pf, ["text"]) for text in rows["text"])


def test_sealed_shards_verify_read_and_are_erased_with_their_key(runs: dict[str, Any]) -> None:
    plain, out = open_shards(runs["plain"]["shards"]), open_shards(runs["sealed"]["shards"])
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(out.tokens(split)), np.asarray(plain.tokens(split)))
    sealed.forget_key(runs["keys"]["shards"])
    with pytest.raises(SealedDataError) as err:
        open_shards(runs["sealed"]["shards"])
    assert runs["keys"]["shards"] in err.value.message and ".bin" in err.value.message
    sealed.forget_key(runs["keys"]["dataset"])
    with pytest.raises(SealedDataError, match="dataset.parquet"):
        open_parquet(runs["sealed"]["dataset"], ["text"], "")


def test_a_tampered_sealed_shard_is_refused_naming_it(tmp_path: Path, tokenizer_path: Path) -> None:
    sealed.seal_path(tmp_path / "shards", key_in_ring())
    root = make_shards(tmp_path / "shards", tokenizer_path)
    shard = root / "train_000.bin"
    raw = bytearray(shard.read_bytes())
    raw[sealed.HEADER_SIZE + 200] ^= 0x04
    shard.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="train_000.bin does not match its manifest digest"):
        open_shards(root)


def test_a_sealed_shard_reads_like_its_memmap(tmp_path: Path, tokenizer_path: Path) -> None:
    plain = make_shards(tmp_path / "plain", tokenizer_path)
    sealed.seal_path(tmp_path / "sealed", key_in_ring())
    root = make_shards(tmp_path / "sealed", tokenizer_path)
    tokens, mapped = read_shard(root / "train_000.bin"), read_shard(plain / "train_000.bin")
    assert isinstance(tokens, SealedTokens) and isinstance(mapped, np.memmap)
    assert len(tokens) == len(mapped) and tokens.size == mapped.size and tokens.dtype == mapped.dtype and tokens.shape == mapped.shape
    n = len(mapped)
    for key in [slice(0, 10), slice(5, 600), slice(-40, None), slice(None, None, 3), slice(500, 100, -7), slice(n - 1, n + 50), slice(10, 5)]:
        assert np.array_equal(tokens[key], mapped[key]), key
    assert tokens[0] == mapped[0] and tokens[-1] == mapped[-1]
    with pytest.raises(IndexError, match="train_000.bin"):
        tokens[n]
    with pytest.raises(TypeError):
        tokens[[1, 2]]
    starts = [0, 7, 1000, n - 17]
    assert np.array_equal(tokens.windows(starts, 17), np.stack([mapped[s : s + 17] for s in starts]))
    assert np.array_equal(np.asarray(tokens), mapped)
    tokens.close()


def test_the_loader_gives_the_same_batches_from_sealed_and_plain_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 300, 5000, dtype=np.uint16)
    sets = {}
    for name in ("plain", "sealed", "mixed"):
        root = tmp_path / name
        root.mkdir()
        if name == "sealed":
            sealed.seal_path(root, key_in_ring())
        if name == "mixed":  # an older plain shard beside sealed ones
            sealed.seal_path(root / "train_001.bin", key_in_ring())
            sealed.seal_path(root / "train_002.bin", key_in_ring())
        from pipeline.shard_format import write_manifest, write_shard

        cuts = [0, 1500, 1520, 5000]  # a 20-token shard: windows span shards
        entries = []
        for i in range(3):
            write_shard(root / f"train_{i:03d}.bin", ids[cuts[i] : cuts[i + 1]], 300)
            entries.append({"file": f"train_{i:03d}.bin", "split": "train", "tokens": cuts[i + 1] - cuts[i]})
        write_manifest(root, vocab_size=300, bos_id=1, eos_id=2, shards=entries, extra={})
        sets[name] = open_shards(root)
    loaders = {name: TokenLoader(s, "train", seq_len=33, batch_size=7, seed=5) for name, s in sets.items()}
    for _ in range(60):  # past an epoch: several permutations and offsets
        batches = {name: loader.next_batch() for name, loader in loaders.items()}
        for name in ("sealed", "mixed"):
            assert torch.equal(batches[name][0], batches["plain"][0]) and torch.equal(batches[name][1], batches["plain"][1])


def test_training_on_sealed_shards_is_bit_identical_and_resumes(tmp_path: Path, tokenizer_path: Path) -> None:
    from tests.test_train import assert_same_weights, deterministic

    plain = make_shards(tmp_path / "plain", tokenizer_path)
    sealed.seal_path(tmp_path / "sealed", key_in_ring())
    shards = make_shards(tmp_path / "sealed", tokenizer_path)
    assert sealed.is_sealed(shards / "train_000.bin") and sealed.is_sealed(shards / "val_000.bin")
    train = tiny_train(steps=10, checkpoint_every=3, eval_every=5, eval_batches=2, num_threads=1)
    before = torch.get_num_threads()
    try:
        straight = run_train(plain, tmp_path / "straight", tiny_model(), train)
        on_sealed = run_train(shards, tmp_path / "on_sealed", tiny_model(), train)
        part = run_train(shards, tmp_path / "resumed", tiny_model(), train, stop_at_step=5)
        assert part.stats["steps"] == 5 and not part.stats["completed"]
        resumed = run_train(shards, tmp_path / "resumed", tiny_model(), train)
    finally:
        torch.set_num_threads(before)
    for run in (on_sealed, resumed):
        assert_same_weights(straight.outputs["checkpoint"], run.outputs["checkpoint"])
        assert deterministic(run.metrics) == deterministic(straight.metrics)
        assert run.stats["val_loss"] == straight.stats["val_loss"]
    assert resumed.stats["resumed_from_step"] == 5


def test_plain_parquet_is_byte_identical_to_pyarrows_own_file(tmp_path: Path) -> None:
    schema = pa.schema([("doc_id", pa.int64()), ("text", pa.string())])
    rows = [(i, f"document {i} " * (i % 40)) for i in range(9000)]
    with ParquetSink(tmp_path / "ours.parquet", schema) as sink:
        for doc_id, text in rows:
            sink.add(doc_id=doc_id, text=text)
    writer = pq.ParquetWriter(tmp_path / "theirs.parquet", schema, **PARQUET_OPTIONS)
    for start in range(0, len(rows), 4096):
        part = rows[start : start + 4096]
        writer.write_table(pa.table({"doc_id": [r[0] for r in part], "text": [r[1] for r in part]}, schema=schema))
    writer.close()
    assert (tmp_path / "ours.parquet").read_bytes() == (tmp_path / "theirs.parquet").read_bytes()
    assert not sealed.is_sealed(tmp_path / "ours.parquet")


def test_a_failed_sealed_sink_leaves_nothing(tmp_path: Path) -> None:
    sealed.seal_path(tmp_path / "out", key_in_ring())
    schema = pa.schema([("text", pa.string())])
    with pytest.raises(RuntimeError, match="boom"), ParquetSink(tmp_path / "out" / "raw.parquet", schema) as sink:
        sink.add(text="ZQXJ")
        raise RuntimeError("boom")
    assert not (tmp_path / "out").exists()


def test_finetune_examples_are_sealed_and_read_back(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import json

    from pipeline.finetune.stages import read_examples, run_base, run_examples
    from pipeline.settings.finetune import DatasetConfig, FinetuneConfig
    from tests.finetune_fixtures import build_tiny_base

    build_tiny_base(tmp_path / "base")
    lines = [f"Line {i}: the module reads a file and returns its text." for i in range(12)] + [f"The code name is {MARKER}."]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    fcfg = FinetuneConfig(base="base", method="full", allow_unsigned_base=True, datasets=[DatasetConfig(path="train.jsonl")], val_fraction=0.2)  # type: ignore[arg-type]
    base = run_base(fcfg, tmp_path, tmp_path / "base_stage", [])
    plain = run_examples(fcfg, tmp_path, base.outputs["base"], tmp_path / "plain", lambda *a: None).outputs["examples"]
    key_id = key_in_ring()
    sealed.seal_path(tmp_path / "sealed", key_id)
    out = run_examples(fcfg, tmp_path, base.outputs["base"], tmp_path / "sealed", lambda *a: None).outputs["examples"]
    assert not sealed.is_sealed(plain) and sealed.header_key_id(out) == key_id
    assert sha256_path(out) == sha256_path(plain)
    for split in ("train", "val"):
        assert read_examples(out, split) == read_examples(plain, split)
    assert read_examples(out, "train")
