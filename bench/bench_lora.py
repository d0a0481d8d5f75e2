"""LoRA tokens/s: the appliance's `train_adapter` against a plain transformers + peft loop.

Same random-initialised Llama shape, same LoRA settings, same packed batches, same dtype and
optimizer (AdamW on the adapters), in the same process, alternating rounds so neither side
gets a warmer machine. Printed, never asserted. The plain loop is the reference every
trainer our users know starts from: `model(**batch).loss.backward(); opt.step()`.

    .venv/bin/python bench/bench_lora.py [--shape cpu|7b] [--steps 12] [--rounds 3]

`--shape 7b` is Llama-2-7B's shape (4096 wide, 32 layers) in bf16 for a GPU; `cpu` is small
enough for two cores. No weights are downloaded: throughput does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "cpu": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 8000},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
}


def build_base(path: Path, shape: str, dtype: Any) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    # A tokenizer is not needed to train on ids; the spec loads only the model.


def batches_for(vocab: int, batch: int, seq: int, steps: int, device: Any) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # a prompt that carries no loss
        out.append({"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": torch.ones_like(ids).to(device)})
    return out


def run_plain(base: Path, data: list[dict[str, Any]], fcfg: Any, dtype: Any, device: Any) -> float:
    """Tokens/s of the plain loop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=fcfg.lora_r, lora_alpha=fcfg.lora_alpha, lora_dropout=fcfg.lora_dropout, target_modules=fcfg.target_modules))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    tokens, start = 0, time.perf_counter()
    for b in data:
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += b["input_ids"].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def run_ours(base: Path, data: list[dict[str, Any]], fcfg: Any, tcfg: Any, dtype_name: str, device: Any, out: Path) -> float:
    from pipeline.finetune.spec import build_spec
    from pipeline.finetune.train import train_adapter

    spec = build_spec(fcfg, base, dtype=dtype_name)
    stats = train_adapter(spec, lambda step, micro: data[step], tcfg, out, device=device)
    return float(stats["tokens_per_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()

    import torch

    from pipeline.settings.finetune import DatasetConfig, FinetuneConfig
    from pipeline.training.config import TrainConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    fcfg = FinetuneConfig(base="bench", allow_unsigned_base=True, lora_r=16, lora_alpha=32, lora_dropout=0.05, datasets=[DatasetConfig(path="x.jsonl")])
    tcfg = TrainConfig(
        steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=1e-4, min_lr=1e-4, warmup_steps=0, schedule="constant",
        checkpoint_every=10**6, log_every=10**6, precision="bf16" if device.type == "cuda" else "fp32",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        build_base(base, args.shape, dtype)
        data = batches_for(SHAPES[args.shape]["vocab_size"], args.batch, args.seq, args.steps, device)
        ours, plain = [], []
        for r in range(args.rounds):
            plain.append(run_plain(base, data, fcfg, dtype, device))
            ours.append(run_ours(base, data, fcfg, tcfg, dtype_name, device, Path(tmp) / f"out{r}"))
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            print(f"round {r}: appliance {ours[-1]:,.0f} tok/s, plain transformers+peft {plain[-1]:,.0f} tok/s", flush=True)
    o, p = statistics.median(ours), statistics.median(plain)
    result = {
        "shape": args.shape,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(0),
        "dtype": dtype_name,
        "batch": args.batch,
        "seq_len": args.seq,
        "steps": args.steps,
        "appliance_tokens_per_s": round(o, 1),
        "plain_peft_tokens_per_s": round(p, 1),
        "ratio": round(o / p, 3),
        "peak_gpu_gib": round(peak, 2) if peak is not None else None,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
