"""A few DeepSpeed ZeRO steps on a tiny model, run by tests/test_deepspeed.py under torchrun.

    torchrun --standalone --nproc_per_node=2 -m tests.dist_workers.ds_worker CONFIG --out DIR

Rank 0 writes ``result.json`` (losses, grad norms, per-rank weight digests, checkpoint checks)
and ``weights.safetensors`` (the gathered fp32 weights) into ``--out``. ``--mode resume`` loads an
existing checkpoint instead and reports the error it meets. The data and the plain single-process
torch reference live here too, so the test and the ranks draw the very same batches.

deepspeed is never imported at module level: the test imports this module for the reference.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.errors import TrainingError
from pipeline.model import LlamaModel, ModelConfig
from pipeline.training import dist
from pipeline.training.config import TrainConfig
from pipeline.training.engine import param_groups
from tests.training_fixtures import tiny_model

VOCAB = 300
# Tokens come from the first few ids only, so even a handful of steps visibly lowers the loss.
ACTIVE_TOKENS = 20
SEQ_LEN = 16
SEED = 1234


def model_config() -> ModelConfig:
    return tiny_model().resolved(vocab_size=VOCAB)


def train_config(batch_size: int, grad_accum: int, steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=SEQ_LEN, lr=3e-3, min_lr=3e-4, warmup_steps=0, grad_clip=1.0, device="cpu"
    )


def lr_at(step: int, train: TrainConfig) -> float:
    # A ramp, so a rank that ignored the lr it was handed would drift from the reference.
    return train.lr * (step + 1) / train.steps


def global_micro_batch(step: int, micro: int, rows: int) -> torch.Tensor:
    """Every rank's rows of one micro-batch, (rows, SEQ_LEN + 1); rank r takes its own slice."""
    g = torch.Generator().manual_seed(SEED * 10_000 + step * 100 + micro)
    return torch.randint(0, ACTIVE_TOKENS, (rows, SEQ_LEN + 1), generator=g)


def fresh_model(seed: int = SEED) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(model_config())


def reference_run(*, steps: int, batch_size: int, grad_accum: int, world: int) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """(losses, grad norms, final weights) of a plain torch loop with no accumulation: each step is
    one batch holding all ranks' micro-batches, the doubled batch a ZeRO run accumulates."""
    train = train_config(batch_size, grad_accum, steps)
    model = fresh_model()
    opt = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=(train.beta1, train.beta2))
    losses, norms = [], []
    for step in range(steps):
        tokens = torch.cat([global_micro_batch(step, m, batch_size * world) for m in range(grad_accum)])
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    return losses, norms, weights


def run_step(engine, ctx: dist.DistContext, train: TrainConfig, step: int) -> tuple[float, float]:
    rows = train.batch_size * ctx.world
    lo, hi = ctx.rank * train.batch_size, (ctx.rank + 1) * train.batch_size
    micro_losses = []
    for m in range(train.grad_accum):
        tokens = global_micro_batch(step, m, rows)[lo:hi]
        loss = engine.forward_backward(tokens[:, :-1], tokens[:, 1:], accum_steps=train.grad_accum, last=m == train.grad_accum - 1)
        micro_losses.append(float(loss))
    norm = engine.optimizer_step(lr_at(step, train), train.grad_clip)
    return mean_over_ranks(ctx, sum(micro_losses) / len(micro_losses)), norm


def mean_over_ranks(ctx: dist.DistContext, value: float) -> float:
    if not ctx.initialised:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / ctx.world


def build(ctx: dist.DistContext, args: argparse.Namespace, seed: int):
    from pipeline.training.ds_config import load_deepspeed_config
    from pipeline.training.engine_deepspeed import build_deepspeed_engine

    train = train_config(args.batch_size, args.grad_accum, args.steps)
    config = load_deepspeed_config(Path(args.config), train, ctx.world, "cpu")
    return build_deepspeed_engine(fresh_model(seed), train, config, torch.device("cpu")), train


def train_and_check(ctx: dist.DistContext, args: argparse.Namespace, out: Path) -> None:
    engine, train = build(ctx, args, SEED)
    import deepspeed.comm.comm as ds_comm

    # The communication backend DeepSpeed made on top of our process group, without its shm op.
    shm_off = ds_comm.cdb is not None and getattr(ds_comm.cdb, "shm_comm_op", "absent") is None
    losses, norms = [], []
    for step in range(args.steps):
        loss, norm = run_step(engine, ctx, train, step)
        losses.append(loss)
        norms.append(norm)
    digests = dist.gather_objects(ctx, engine.weights_digest())
    weights = engine.full_weights()

    ckpt = out / "ckpt"
    if ctx.is_main:
        ckpt.mkdir(parents=True, exist_ok=True)
    dist.barrier(ctx)
    files = dist.gather_objects(ctx, [str(p.relative_to(ckpt)) for p in engine.save(ckpt)])

    # A fresh engine from a different init must come back to exactly the saved state...
    restored_engine, _ = build(ctx, args, SEED + 1)
    restored_engine.load(ckpt)
    restored = restored_engine.full_weights()
    # ...optimizer moments included: one more step on each must land on the same weights.
    run_step(engine, ctx, train, args.steps)
    run_step(restored_engine, ctx, train, args.steps)
    after, after_restored = engine.full_weights(), restored_engine.full_weights()

    if ctx.is_main:
        assert weights is not None and restored is not None and after is not None and after_restored is not None
        save_file(weights, str(out / "weights.safetensors"))
        result = {
            "world": ctx.world,
            "shm_off": shm_off,
            "losses": losses,
            "grad_norms": norms,
            "digests": digests,
            "files": files,
            "restored_equal": sorted(weights) == sorted(restored) and all(torch.equal(weights[k], restored[k]) for k in weights),
            "continued_max_diff": max(float((after[k] - after_restored[k]).abs().max()) for k in after),
            "continued_moved": any(not torch.equal(after[k], weights[k]) for k in after),
        }
        (out / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")


def resume_elsewhere(ctx: dist.DistContext, args: argparse.Namespace, out: Path) -> None:
    engine, _ = build(ctx, args, SEED)
    try:
        engine.load(Path(args.checkpoint))
        outcome = {"error": None}
    except TrainingError as exc:
        outcome = {"error": exc.message, "hint": exc.hint}
    if ctx.is_main:
        (out / "resume.json").write_text(json.dumps(outcome), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", help="a DeepSpeed JSON")
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["train", "resume"], default="train")
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctx = dist.init("gloo", timeout_s=120)
    out = Path(args.out)
    try:
        if args.mode == "train":
            train_and_check(ctx, args, out)
        else:
            resume_elsewhere(ctx, args, out)
    finally:
        dist.shutdown(ctx)


if __name__ == "__main__":
    main()
    dist.exit_process(0)  # skip exit-time destructors that can abort a gloo worker
