"""Tiny tokenizer, shard set and model config for the training-stage tests.

Everything is small enough that a full train → evaluate → package round trip runs in a few
seconds on two shared CPU cores.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from pipeline.model import ModelConfig
from pipeline.shard_format import write_manifest, write_shard
from pipeline.train import TrainConfig

SUBJECTS = ["the cat", "a dog", "the farmer", "my sister", "the old man", "a small bird"]
VERBS = ["sees", "likes", "feeds", "follows", "paints", "finds"]
OBJECTS = ["the red barn", "a green apple", "the quiet river", "a yellow kite", "the tall tree"]


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Repetitive, grammatical English: easy to learn, so the loss must fall quickly."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(n_lines)]


def make_tokenizer(directory: Path) -> Path:
    """Train a ~300-piece BPE SentencePiece model (unk=0, bos=1, eos=2, byte fallback)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(400)),
        model_writer=buf,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path = Path(directory) / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def make_shards(directory: Path, tokenizer: Path) -> Path:
    """Encode the corpus as <bos> line <eos> ...; 90 % train, 10 % val, one shard each."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids: list[int] = []
    for line in corpus(400, seed=1):
        ids += [sp.bos_id(), *sp.encode(line), sp.eos_id()]
    arr = np.array(ids, dtype=np.int64)
    cut = int(len(arr) * 0.9)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    vocab = sp.get_piece_size()
    write_shard(root / "train_000.bin", arr[:cut], vocab)
    write_shard(root / "val_000.bin", arr[cut:], vocab)
    write_manifest(
        root,
        vocab_size=vocab,
        bos_id=sp.bos_id(),
        eos_id=sp.eos_id(),
        shards=[
            {"file": "train_000.bin", "split": "train", "tokens": cut},
            {"file": "val_000.bin", "split": "val", "tokens": len(arr) - cut},
        ],
        extra={},
    )
    return root


def tiny_model(**overrides: object) -> ModelConfig:
    """2 layers, width 32, GQA (4 query heads sharing 2 key/value heads)."""
    base = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32, "multiple_of": 16}
    return ModelConfig(**{**base, **overrides})  # type: ignore[arg-type]


def tiny_train(**overrides: object) -> TrainConfig:
    base = {"steps": 10, "batch_size": 4, "seq_len": 16, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "checkpoint_every": 5, "log_every": 1, "device": "cpu"}
    return TrainConfig(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"), tokenizer_path)
