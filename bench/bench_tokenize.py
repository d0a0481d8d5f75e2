"""Tokenize + shard throughput against raw SentencePiece batched encode on the same text.

Raw ``SentencePieceProcessor.encode(list, num_threads=1)`` over the same documents is the
physical limit of the shard stage on one core: everything else the stage does (reading
parquet, framing documents, splitting train/val, writing and hashing shards) is overhead
on top of it. The figures are printed as ratios, never asserted.

    .venv/bin/python bench/bench_tokenize.py [--mb 40] [--workers 1 2]

The text is the running Python's standard-library documentation (real prose and code,
no download), repeated with a counter until it reaches --mb.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import sentencepiece as spm  # noqa: E402

from appliance.demo import build_stdlib_corpus  # noqa: E402
from pipeline.shard import ShardConfig, run_shard  # noqa: E402
from pipeline.tokenizer import TokenizerConfig, run_tokenizer  # noqa: E402


def build_dataset(work: Path, megabytes: float) -> tuple[Path, list[str]]:
    corpus = work / "corpus"
    build_stdlib_corpus(corpus, max_bytes=3_000_000)
    base = []
    import json

    for line in (corpus / "docstrings.jsonl").read_text(encoding="utf-8").splitlines():
        base.append(json.loads(line)["text"])
    texts: list[str] = []
    size, i = 0, 0
    target = int(megabytes * 1e6)
    while size < target:
        text = f"{base[i % len(base)]}\n(copy {i // len(base)})"
        texts.append(text)
        size += len(text.encode("utf-8"))
        i += 1
    path = work / "dataset.parquet"
    import hashlib

    table = pa.table(
        {
            "doc_id": list(range(len(texts))),
            "source": ["bench"] * len(texts),
            "text": texts,
            "sha256": [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts],
        }
    )
    pq.write_table(table, path)
    return path, texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=40.0, help="megabytes of text (default 40)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure (default 1 2)")
    parser.add_argument("--vocab", type=int, default=8000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset, texts = build_dataset(work, args.mb)
        megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(f"text: {len(texts):,} documents, {megabytes:.1f} MB")
        tok = run_tokenizer(dataset, work / "tok", TokenizerConfig(vocab_size=args.vocab, sample_sentences=200_000))
        model = tok.outputs["tokenizer"]
        sp = spm.SentencePieceProcessor(model_file=str(model))

        start = time.perf_counter()
        n_tokens = 0
        for i in range(0, len(texts), 512):
            n_tokens += sum(len(ids) for ids in sp.encode(texts[i : i + 512], out_type=int, num_threads=1))
        raw_s = time.perf_counter() - start
        raw_rate = megabytes / raw_s
        print(f"sentencepiece encode (batched, 1 thread):  {raw_rate:6.2f} MB/s  ({n_tokens:,} tokens, {raw_s:.1f} s)")

        for workers in args.workers:
            out = work / f"shard-{workers}"
            start = time.perf_counter()
            res = run_shard(dataset, model, out, ShardConfig(workers=workers))
            secs = time.perf_counter() - start
            rate = megabytes / secs
            tokens = res.stats["train_tokens"] + res.stats["val_tokens"]
            print(
                f"appliance shard stage, {workers} worker(s):   {rate:6.2f} MB/s  ({tokens:,} tokens incl. bos/eos, {secs:.1f} s)"
                f"  ratio vs raw encode: {rate / raw_rate:.2f}x total, {rate / raw_rate / workers:.2f}x per core"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
