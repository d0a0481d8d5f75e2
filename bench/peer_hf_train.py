"""The peer of ``bench_train.py``: a plain Hugging Face ``LlamaForCausalLM`` training loop.

What a practitioner writes without the appliance: ``transformers`` builds the model (SDPA
attention), the whole train split sits in memory as one tensor, each step draws random
windows, and torch's AdamW, gradient clipping, bf16 autocast and ``torch.compile`` are used
the ordinary way. Every setting comes from the same spec as the appliance's run, so the only
difference measured is the training loop and the model code.

    .venv/bin/python bench/peer_hf_train.py SPEC.json RESULT.json

The spec is written by ``bench_train.py``; the result is JSON with the measured rate.
For a like-for-like loss check the model starts from the appliance's initial weights (same
seed, same parameter names) and sees the windows the appliance's loader
(``pipeline.training.loader``) gives it, in the same order.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from pipeline.model import LlamaModel, ModelConfig, hf_config  # noqa: E402
from pipeline.shard_format import open_shards  # noqa: E402


def lr_at(step: int, train: dict[str, Any]) -> float:
    """Linear warmup, then cosine to min_lr at the last step: the appliance's default schedule."""
    lr, min_lr, warmup, steps = train["lr"], train["min_lr"], train["warmup_steps"], train["steps"]
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    ratio = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


class Windows:
    """Non-overlapping windows of seq_len + 1 tokens from an in-memory tensor, in the order the
    appliance's loader visits them: per epoch a permutation and a start offset drawn from
    default_rng([seed, epoch]). Same batches, so the two loss curves are comparable."""

    def __init__(self, data: torch.Tensor, *, batch: int, seq_len: int, seed: int) -> None:
        self.data, self.batch, self.seq_len, self.seed = data, batch, seq_len, seed
        self.count = (len(data) - 1) // seq_len - 1
        self.position, self._epoch = 0, -1
        self._order, self._offset = torch.empty(0, dtype=torch.int64), 0
        self._span = torch.arange(seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = [self._start(self.position + i) for i in range(self.batch)]
        self.position += self.batch
        w = self.data[torch.tensor(starts)[:, None] + self._span]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def _start(self, index: int) -> int:
        epoch, slot = divmod(index, self.count)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = torch.from_numpy(rng.permutation(self.count))
            self._offset, self._epoch = int(rng.integers(0, self.seq_len)), epoch
        return self._offset + int(self._order[slot]) * self.seq_len


def build_model(model_cfg: ModelConfig, *, bos_id: int, eos_id: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(**hf_config(model_cfg, bos_id=bos_id, eos_id=eos_id), attn_implementation="sdpa")
    config.use_cache = False  # training: no KV cache to build
    model = LlamaForCausalLM(config)
    # Start from the appliance's initial weights so the two loss curves can be compared.
    torch.manual_seed(seed)
    model.load_state_dict(LlamaModel(model_cfg).state_dict())
    return model


def run_peer(spec: dict[str, Any]) -> dict[str, Any]:
    """Train as the spec says; return the rate over the steps after ``skip`` and the losses."""
    train = spec["train"]
    device = torch.device(train["device"])
    if train["num_threads"]:
        torch.set_num_threads(train["num_threads"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = train["tf32"]
        torch.backends.cudnn.allow_tf32 = train["tf32"]
    shards = open_shards(Path(spec["shards"]))
    data = torch.from_numpy(np.asarray(shards.tokens("train"), dtype=np.int64))  # all in memory
    mcfg = ModelConfig(**spec["model"]).resolved(vocab_size=shards.vocab_size)
    model = build_model(mcfg, bos_id=shards.bos_id, eos_id=shards.eos_id, seed=train["seed"]).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=train["lr"], betas=(train["beta1"], train["beta2"]), fused=device.type == "cuda")
    forward = torch.compile(model) if train["compile"] else model
    bf16 = train["precision"] == "bf16" or (train["precision"] == "auto" and device.type == "cuda")

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps, skip, log_every = train["steps"], spec["skip"], train["log_every"]
    batch, seq_len = train["batch_size"], train["seq_len"]
    losses: list[tuple[int, float]] = []
    marks: dict[int, float] = {}
    sync()
    marks[0] = time.perf_counter()
    batches = Windows(data, batch=batch, seq_len=seq_len, seed=train["seed"])
    for step in range(steps):
        x, y = batches.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, train)
        with autocast():
            # shift_labels: y is already the next token of each x position (no HF-side shift).
            loss = forward(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
        loss.backward()
        if train["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, train["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        # A plain loop reads the loss (a device sync) only when it logs.
        if done % log_every == 0 or done == steps:
            losses.append((done, loss.item()))
            sync()
            marks[done] = time.perf_counter()
    tokens_per_step = batch * seq_len
    measured = (steps - skip) * tokens_per_step / (marks[steps] - marks[skip])
    return {
        "side": "peer",
        "name": "transformers LlamaForCausalLM (sdpa)",
        "tokens_per_s": measured,
        "tokens_per_s_all": steps * tokens_per_step / (marks[steps] - marks[0]),
        "losses": losses,
        "parameters": sum(p.numel() for p in params),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "transformers": __import__("transformers").__version__,
    }


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    result = run_peer(spec)
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
