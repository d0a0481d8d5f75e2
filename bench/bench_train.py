"""Training throughput of the appliance's loop against a plain Hugging Face loop, same run.

Our side is ``pipeline.train.run_train`` as the product calls it: shard verification,
memory-mapped loader, schedule, clipping, logging. The peer (``peer_hf_train.py``) is
``transformers.LlamaForCausalLM`` with SDPA attention trained by an ordinary torch loop. Both
get the same dimensions (through ``pipeline.model.hf_config``), initial weights, batches,
sequence length, precision, AdamW settings, clipping, compile flag and thread count. Each
measurement is a fresh process; the sides alternate, so load drift on the machine hits both,
and the medians are compared. Figures are printed, never asserted.

    .venv/bin/python bench/bench_train.py                       # CPU: default model, fp32, 2 threads
    .venv/bin/python bench/bench_train.py --device cuda --precision bf16 --compile --preset 124m

The text is the running Python's standard-library documentation, tokenized by a SentencePiece
BPE model trained on the fly; nothing is downloaded and nothing is kept outside a temporary
directory unless ``--work DIR`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402

from appliance.demo import build_stdlib_corpus  # noqa: E402
from pipeline.model import PRESETS, ModelConfig, model_flops_per_token  # noqa: E402
from pipeline.shard_format import write_manifest, write_shard  # noqa: E402
from pipeline.train import TrainConfig, run_train  # noqa: E402
from pipeline.training.monitor import device_peak_flops  # noqa: E402

PEER = Path(__file__).resolve().with_name("peer_hf_train.py")


# ---------------------------------------------------------------------------------------------
# Data: real prose, a fresh tokenizer, one train and one val shard.


def build_shards(work: Path, vocab: int) -> Path:
    """Shards of the stdlib documentation under ``work/shards-v{vocab}`` (reused when present)."""
    root = work / f"shards-v{vocab}"
    if (root / "manifest.json").is_file():
        return root
    corpus = build_stdlib_corpus(work / "corpus").path
    docs = [json.loads(line)["text"] for line in (corpus / "docstrings.jsonl").read_text(encoding="utf-8").splitlines()]
    docs += [p.read_text(encoding="utf-8") for p in sorted((corpus / "topics").glob("*.txt"))]
    lines = [line for doc in docs for line in doc.splitlines() if line.strip()]
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp / "tokenizer"),
        vocab_size=vocab,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model"))
    ids = [i for doc in sp.encode(docs, out_type=int, num_threads=2) for i in (sp.bos_id(), *doc, sp.eos_id())]
    arr = np.asarray(ids, dtype=np.int64)
    cut = int(len(arr) * 0.95)
    write_shard(tmp / "train_000.bin", arr[:cut], sp.get_piece_size())
    write_shard(tmp / "val_000.bin", arr[cut:], sp.get_piece_size())
    splits = [{"file": "train_000.bin", "split": "train", "tokens": cut}, {"file": "val_000.bin", "split": "val", "tokens": len(arr) - cut}]
    write_manifest(tmp, vocab_size=sp.get_piece_size(), bos_id=sp.bos_id(), eos_id=sp.eos_id(), shards=splits, extra={"source": "stdlib docs"})
    tmp.rename(root)  # appears complete or not at all
    return root


# ---------------------------------------------------------------------------------------------
# Our side, run in its own process like the peer.


def _train_config(train: dict[str, Any], steps: int) -> TrainConfig:
    return TrainConfig(**{**train, "steps": steps})


def _interval_rate(rows: list[tuple[int, float]], skip: int, tokens_per_step: int) -> float | None:
    """Tokens/s over the steps after ``skip`` from per-interval rates logged at the given steps."""
    seconds, steps, prev = 0.0, 0, 0
    for step, rate in sorted(rows):
        if prev >= skip and rate > 0:
            seconds += (step - prev) * tokens_per_step / rate
            steps += step - prev
        prev = step
    return steps * tokens_per_step / seconds if steps else None


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``run_train`` in this process; the rate excludes the first ``skip`` steps."""
    train, skip = spec["train"], spec["skip"]
    tokens_per_step = train["batch_size"] * train["seq_len"]
    model_cfg = ModelConfig(**spec["model"])
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)  # run_train resumes from what it finds there
    t0 = time.perf_counter()
    res = run_train(Path(spec["shards"]), out, model_cfg, _train_config(train, train["steps"]))
    wall = time.perf_counter() - t0
    logged = [(m["step"], float(m["value"])) for m in res.metrics if m["name"] == "tokens_per_s"]
    measured, method = _interval_rate(logged, skip, tokens_per_step), "per-interval tokens_per_s metric"
    if measured is None:
        # No per-interval figure: a second run of only the warmup steps; the difference in wall
        # time is the measured steps (setup, compile and the final write cancel out).
        out_short = out.with_name(out.name + "-short")
        shutil.rmtree(out_short, ignore_errors=True)
        t1 = time.perf_counter()
        run_train(Path(spec["shards"]), out_short, model_cfg, _train_config(train, skip))
        short = time.perf_counter() - t1
        shutil.rmtree(out_short, ignore_errors=True)
        measured, method = (train["steps"] - skip) * tokens_per_step / (wall - short), "two runs, difference of wall times"
    shutil.rmtree(out, ignore_errors=True)
    return {
        "side": "ours",
        "name": "appliance run_train",
        "tokens_per_s": measured,
        "tokens_per_s_all": res.stats.get("tokens_per_s"),
        "method": method,
        "losses": [(m["step"], m["value"]) for m in res.metrics if m["name"] == "loss"],
        "parameters": res.stats.get("parameters"),
        "device_name": torch.cuda.get_device_name() if res.stats.get("device", "").startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# The driver.


def _measure(side: str, spec_path: Path, result_path: Path, threads: int) -> dict[str, Any]:
    cmd = (
        [sys.executable, str(PEER), str(spec_path), str(result_path)]
        if side == "peer"
        else [sys.executable, __file__, "--ours", str(spec_path), str(result_path)]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return json.loads(result_path.read_text(encoding="utf-8"))


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model size (pipeline.model.PRESETS); default: ModelConfig()'s shape")
    parser.add_argument("--dim", type=int, help="override the width")
    parser.add_argument("--layers", type=int, help="override the depth")
    parser.add_argument("--heads", type=int, help="override the query heads")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (GQA); default = heads")
    parser.add_argument("--ffn", type=int, help="SwiGLU hidden size; default = Llama's 8/3·dim rule")
    parser.add_argument("--model-vocab", type=int, help="model vocabulary, if larger than the tokenizer's (50304 makes 124m GPT-2's 124M)")
    parser.add_argument("--vocab", type=int, default=8000, help="SentencePiece vocabulary (default 8000)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's max_seq_len)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 8 on CPU, 16 on CUDA)")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="steps run first and not measured (default 5)")
    parser.add_argument("--log-every", type=int, default=5, help="measurement interval in steps (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per side, alternating (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides (default 2)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak FLOP/s for MFU (default: monitor.PEAK_FLOPS by GPU name)")
    parser.add_argument("--work", type=Path, help="keep corpus, tokenizer and shards here (default: a temp dir)")
    parser.add_argument("--ours", nargs=2, type=Path, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours:
        spec = json.loads(args.ours[0].read_text(encoding="utf-8"))
        args.ours[1].write_text(json.dumps(run_ours(spec), indent=2) + "\n", encoding="utf-8")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but this torch sees no CUDA device (run with --device cpu)")

    shape = {"dim": args.dim, "n_layers": args.layers, "n_heads": args.heads, "n_kv_heads": args.kv_heads, "ffn_dim": args.ffn, "vocab_size": args.model_vocab}
    model: dict[str, Any] = {k: v for k, v in shape.items() if v is not None}
    if args.preset:
        model["preset"] = args.preset
    seq_len = args.seq_len or ModelConfig(**model).resolved().max_seq_len
    model["max_seq_len"] = max(ModelConfig(**model).resolved().max_seq_len, seq_len)
    batch = args.batch or (16 if args.device == "cuda" else 8)
    skip = _round_up(args.warmup, args.log_every)
    steps = skip + _round_up(args.steps, args.log_every)
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    train = {
        "steps": steps, "batch_size": batch, "grad_accum": 1, "seq_len": seq_len, "lr": 1e-3, "min_lr": 1e-4,
        "warmup_steps": skip, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0,
        # Checkpoints only at the end (after the last interval's clock stops): the steps, not the disk, are measured.
        "checkpoint_every": steps, "seed": 1337, "device": args.device, "precision": precision, "tf32": True,
        "compile": args.compile, "num_threads": args.threads, "log_every": args.log_every,
    }  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        shards = build_shards(work, args.vocab)
        manifest = json.loads((shards / "manifest.json").read_text(encoding="utf-8"))
        mcfg = ModelConfig(**model).resolved(vocab_size=manifest["vocab_size"])
        train_tokens = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")
        print(f"data: stdlib docs, {train_tokens:,} train tokens, SentencePiece BPE vocab {manifest['vocab_size']} ({time.perf_counter() - t0:.1f} s to build)")
        print(
            f"model: d {mcfg.dim}, L {mcfg.n_layers}, H {mcfg.n_heads} ({mcfg.n_kv_heads} kv), ffn {mcfg.ffn_dim}, vocab {mcfg.vocab_size};"
            f" batch {batch} x T {seq_len}, {precision}{', compiled' if args.compile else ''}, {args.threads} threads, {args.device};"
            f" {steps - skip} measured steps after {skip}, {args.rounds} rounds"
        )
        spec_path = work / "spec.json"
        spec = {"shards": str(shards), "out": str(work / "ours-run"), "model": model, "train": train, "skip": skip}
        spec_path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        load_before = os.getloadavg()
        results: dict[str, list[dict[str, Any]]] = {"peer": [], "ours": []}
        for r in range(args.rounds):
            # Alternate who goes first, so a drift in machine load hits both sides alike.
            for side in ("peer", "ours") if r % 2 == 0 else ("ours", "peer"):
                results[side].append(_measure(side, spec_path, work / f"{side}-{r}.json", args.threads))
            peer, ours = results["peer"][-1]["tokens_per_s"], results["ours"][-1]["tokens_per_s"]
            print(f"round {r + 1}: peer {peer:9,.0f} tok/s   ours {ours:9,.0f} tok/s   ratio {ours / peer:.2f}x", flush=True)
        load_after = os.getloadavg()

    med = {side: statistics.median(r["tokens_per_s"] for r in rs) for side, rs in results.items()}
    fpt = model_flops_per_token(mcfg, seq_len)
    device_name = results["ours"][0]["device_name"]
    peak, peak_name = device_peak_flops(torch.device(args.device), precision, args.peak_tflops)
    print(f"device: {device_name}; {results['peer'][0]['parameters']:,} parameters, {fpt / 1e6:.1f} MFLOP per token (6N + 12LHQT)")
    for side in ("peer", "ours"):
        mfu = f"   MFU {100 * fpt * med[side] / peak:5.1f} %" if peak else ""
        print(f"{results[side][0]['name']:38s} {med[side]:9,.0f} tok/s (median){mfu}")
    if peak:
        print(f"peak: {peak_name}")
    print(f"ratio ours / peer: {med['ours'] / med['peer']:.2f}x   (our rate from the {results['ours'][0]['method']})")
    last_ours, last_peer = results["ours"][0]["losses"][-1], results["peer"][0]["losses"][-1]
    print(f"loss at step {last_ours[0]}: ours {last_ours[1]:.4f}, peer {last_peer[1]:.4f} (same initial weights and batches)")
    print(f"load average (1 min): {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
