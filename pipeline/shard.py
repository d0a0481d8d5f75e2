"""Shard: ``dataset.parquet`` + ``tokenizer.model`` -> token shards (train/val) + manifest.

Each document becomes ``[bos] + ids + [eos]``; the documents of a split are concatenated
in doc_id order and cut into files of ``shard_tokens`` ids (a document may straddle two
files: the trainer reads a split as one stream). A document's split depends only on
(seed, sha256 of its text): adding, removing or reordering other documents never moves it
between train and val, and a duplicate can never sit on both sides.

The stage always writes validation tokens. With two or more documents some document goes
to val (``assign_splits``); a corpus of one document (one big file ingested whole) is split
inside that document by token range instead: its tail goes to val (``token_range_cut``).
The manifest's ``val_split`` ("documents" or "token_range") says which was done.

Encoding runs in worker processes (``pipeline.parallel``) on fixed-size batches whose
results are consumed in order, so the shards are byte-identical for any worker count.
The dataset is read memory-mapped, and so are the shards when the trainer opens them.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from keys.digest import sha256_file
from keys.files import publish_dir
from pipeline.errors import DataError
from pipeline.parallel import ordered_map, resolve_workers
from pipeline.parquet_io import iter_rows, open_parquet
from pipeline.result import ProgressFn, StageResult, no_progress

# The [shard] table lives in a torch-free module, so a recipe loads without pyarrow; its names stay importable from here.
from pipeline.settings.shard import ShardConfig
from pipeline.shard_format import dtype_for_vocab, write_manifest, write_shard
from pipeline.tokenizer import load_tokenizer

SPLITS = ("train", "val")
_HINT = "point at the clean stage's dataset.parquet"
# A side of a token-range split must hold at least this many of the document's own tokens:
# fewer cannot be called a training or validation set (one token predicts nothing).
MIN_SIDE_TOKENS = 2


def split_key(doc_sha256: str, seed: int) -> float:
    """A document's position in [0, 1): it goes to val when below val_fraction."""
    digest = hashlib.sha256(f"{seed}:{doc_sha256}".encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(doc_sha256s: list[str], seed: int, val_fraction: float) -> list[str]:
    """ "train" or "val" for each document, by its own hash only.

    There is always a training document (the highest key), and with two or more documents
    at least one validation document (the lowest key), so a tiny corpus still has a
    validation loss.
    """
    keys = [split_key(s, seed) for s in doc_sha256s]
    splits = ["val" if k < val_fraction else "train" for k in keys]
    if keys and "train" not in splits:
        splits[max(range(len(keys)), key=keys.__getitem__)] = "train"
    if len(keys) >= 2 and "val" not in splits:
        splits[min(range(len(keys)), key=keys.__getitem__)] = "val"
    return splits


def token_range_cut(text_tokens: int, val_fraction: float, dataset: Path) -> int:
    """Text tokens of a lone document that stay in train; the other ``ceil(val_fraction × n)`` go to val.

    Raises DataError when either side would hold fewer than MIN_SIDE_TOKENS.
    """
    # The decimal the recipe wrote (0.1), not its binary approximation: ceil(0.1 × 30) must be 3, not 4.
    val = math.ceil(Fraction(repr(val_fraction)) * text_tokens)
    train = text_tokens - val
    if min(val, train) < MIN_SIDE_TOKENS:
        raise DataError(
            f"{dataset} holds a single document of {text_tokens} tokens: holding out [shard] val_fraction = {val_fraction} of it"
            f" by token range would leave train {train} and val {val} (each needs at least {MIN_SIDE_TOKENS} tokens),"
            " so there can be no usable validation set",
            'give the corpus more documents (`[ingest] split = "paragraphs"` makes one document per paragraph of a big file)'
            " or more text, or change [shard] val_fraction so both sides get tokens; then start a new run (`appliance run RECIPE`)",
        )
    return train


class _SplitWriter:
    """Accumulates one split's ids and writes full ``shard_tokens``-sized files as they fill."""

    def __init__(self, root: Path, split: str, shard_tokens: int, vocab_size: int) -> None:
        self.root, self.split, self.size, self.vocab = root, split, shard_tokens, vocab_size
        self.parts: list[np.ndarray] = []
        self.pending = 0
        self.tokens = 0
        self.documents = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, ids: np.ndarray) -> None:
        self.parts.append(ids)
        self.pending += ids.size
        self.tokens += ids.size
        self.documents += 1
        if self.pending >= self.size:
            self._write(final=False)

    def _write(self, final: bool) -> None:
        if not self.parts:
            return
        stream = np.concatenate(self.parts)
        start = 0
        while stream.size - start >= self.size or (final and start < stream.size):
            chunk = stream[start : start + self.size]
            name = f"{self.split}_{len(self.shards):06d}.bin"
            write_shard(self.root / name, chunk, self.vocab)
            self.shards.append({"file": name, "split": self.split, "tokens": int(chunk.size)})
            start += chunk.size
        rest = stream[start:]
        self.parts, self.pending = ([rest], rest.size) if rest.size else ([], 0)

    def close(self) -> None:
        self._write(final=True)


def run_shard(dataset_parquet: Path, tokenizer_model: Path, out_dir: Path, cfg: ShardConfig, progress: ProgressFn = no_progress) -> StageResult:
    """Encode the dataset with the tokenizer into ``out_dir/shards`` (shard files + manifest.json)."""
    dataset_parquet, tokenizer_model, out_dir = Path(dataset_parquet), Path(tokenizer_model), Path(out_dir)
    sp = load_tokenizer(tokenizer_model)
    vocab, bos, eos = sp.get_piece_size(), sp.bos_id(), sp.eos_id()
    if bos < 0 or eos < 0:
        raise DataError(f"tokenizer {tokenizer_model} has no <s>/</s> pieces (bos {bos}, eos {eos})", "train it with the tokenizer stage")
    with open_parquet(dataset_parquet, ["text"], _HINT) as pf:
        return _shard(pf, dataset_parquet, tokenizer_model, out_dir, cfg, progress, (vocab, bos, eos))


def _shard(
    pf: pq.ParquetFile, dataset_parquet: Path, tokenizer_model: Path, out_dir: Path, cfg: ShardConfig, progress: ProgressFn, ids: tuple[int, int, int]
) -> StageResult:
    """`run_shard` over the opened dataset (which the caller closes); ``ids`` is (vocab size, bos, eos)."""
    vocab, bos, eos = ids
    total = pf.metadata.num_rows
    splits = assign_splits(_doc_digests(pf, dataset_parquet), cfg.seed, cfg.val_fraction)
    # assign_splits gives val a document whenever there are two; so this is the one-document corpus.
    val_split = "documents" if "val" in splits else "token_range"

    final, tmp = out_dir / "shards", out_dir / "shards.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    workers = resolve_workers(cfg.workers)
    try:
        writers = {s: _SplitWriter(tmp, s, cfg.shard_tokens, vocab) for s in SPLITS}
        done = 0
        batches = _text_batches(pf, dataset_parquet)
        for lengths, flat in ordered_map(_encode_batch, batches, workers=workers, initializer=_init_encoder, initargs=(str(tokenizer_model),)):
            start = 0
            for n in lengths.tolist():
                doc = flat[start : start + n]
                if val_split == "token_range":
                    # Head to train, tail to val, bos and eos left where they are: train gets
                    # [bos] + head, val gets tail + [eos]. The two pieces joined are the document
                    # as any other corpus would shard it, and no <s>/</s> is invented at the cut,
                    # which would teach the model that text ends (or starts) mid-sentence.
                    cut = 1 + token_range_cut(n - 2, cfg.val_fraction, dataset_parquet)
                    writers["train"].add(doc[:cut])
                    writers["val"].add(doc[cut:])
                else:
                    writers[splits[done]].add(doc)
                start += n
                done += 1
            progress(done, total, {"train_tokens": writers["train"].tokens, "val_tokens": writers["val"].tokens})
        for w in writers.values():
            w.close()
        write_manifest(
            tmp,
            vocab_size=vocab,
            bos_id=bos,
            eos_id=eos,
            shards=writers["train"].shards + writers["val"].shards,
            extra={
                "tokenizer_sha256": sha256_file(tokenizer_model),
                "dataset_sha256": sha256_file(dataset_parquet),
                # Documents each split holds text of: with "token_range" the one document is in both.
                "documents": {s: writers[s].documents for s in SPLITS},
                "val_split": val_split,
                "seed": cfg.seed,
                "val_fraction": cfg.val_fraction,
                "shard_tokens": cfg.shard_tokens,
            },
        )
        publish_dir(tmp, final, replace=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats: dict[str, Any] = {"documents": done, "workers": workers, "val_split": val_split}
    for s in SPLITS:
        stats[f"{s}_documents"] = writers[s].documents
        stats[f"{s}_tokens"] = writers[s].tokens
        stats[f"{s}_shards"] = len(writers[s].shards)
    return StageResult(
        outputs={"shards": final},
        stats=stats,
    )


def _doc_digests(pf: pq.ParquetFile, path: Path) -> list[str]:
    """sha256 of each document's text: the clean stage's column, or computed when it is absent."""
    column = "sha256" if "sha256" in pf.schema_arrow.names else "text"
    digests: list[str] = []
    for rows in iter_rows(pf, [column]):
        for value in rows[column]:
            if value is None:
                raise DataError(f"{path} row {len(digests)}: {column} is null", _HINT)
            digests.append(value if column == "sha256" else hashlib.sha256(value.encode("utf-8")).hexdigest())
    if not digests:
        raise DataError(f"{path} holds no documents", _HINT)
    return digests


# Documents per encode batch: fixed, so batch boundaries never depend on the worker count.
ENCODE_BATCH = 512
_ENCODER: Any = None


def _text_batches(pf: pq.ParquetFile, path: Path) -> Any:
    done = 0
    for rows in iter_rows(pf, ["text"], batch_size=ENCODE_BATCH):
        if None in rows["text"]:
            raise DataError(f"{path} row {done + rows['text'].index(None)}: text is null", _HINT)
        done += len(rows["text"])
        yield rows["text"]


def _init_encoder(tokenizer_model: str) -> None:
    global _ENCODER
    _ENCODER = load_tokenizer(Path(tokenizer_model))


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens per document, all documents' ``[bos] + ids + [eos]`` concatenated)."""
    sp = _ENCODER
    dtype = dtype_for_vocab(sp.get_piece_size())
    # One batched call: SentencePiece encodes a list much faster than text by text. One
    # thread per worker: parallelism comes from the worker processes, one per core.
    encoded = sp.encode(texts, out_type=int, num_threads=1)
    lengths = np.fromiter((len(ids) + 2 for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    bos, eos = sp.bos_id(), sp.eos_id()
    for ids in encoded:
        flat[pos] = bos
        flat[pos + 1 : pos + 1 + len(ids)] = ids
        flat[pos + 1 + len(ids)] = eos
        pos += len(ids) + 2
    return lengths, flat
