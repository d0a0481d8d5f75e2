"""Typed training and distributed settings: the ``[train]`` and ``[distributed]`` recipe tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import check

Precision = Literal["auto", "fp32", "bf16"]
Schedule = Literal["cosine", "wsd", "constant"]
EngineName = Literal["auto", "single", "ddp", "fsdp", "deepspeed"]


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    # Optimizer updates; the cosine schedule decays to min_lr exactly at the last one.
    steps: int = 2000
    # Sequences per micro-batch per rank; 16 × 256 = 4k tokens keeps a CPU step around a second
    # for the default model. The global batch is batch_size × grad_accum × ranks.
    batch_size: int = 16
    # Micro-batches summed into one optimizer update: a large batch on a small device.
    grad_accum: int = 1
    # Tokens per sequence; must not exceed the model's max_seq_len.
    seq_len: int = 256
    # 1e-3 suits models of a few million parameters (nanoGPT's small-model choice); lower it for bigger ones.
    lr: float = 1e-3
    # Decay to a tenth of lr (Chinchilla's practice), not to zero, so late steps still learn.
    min_lr: float = 1e-4
    # cosine: warmup then cosine to min_lr (GPT-3, Llama). wsd: warmup, constant, then a linear
    # decay over the last decay_fraction of steps (MiniCPM): a run can be extended from any
    # pre-decay checkpoint. constant: warmup then flat (fine-tuning, debugging).
    schedule: Schedule = "cosine"
    # A short linear warmup keeps Adam's first, badly-estimated updates from blowing up the weights.
    warmup_steps: int = 100
    # wsd only: the share of all steps spent decaying; 0.1–0.2 is what the WSD papers found enough.
    decay_fraction: float = 0.2
    # 0.1 as in GPT-3/Llama; applied to matrices only (see engine.param_groups).
    weight_decay: float = 0.1
    beta1: float = 0.9
    # 0.95 rather than Adam's 0.999: adapts faster to the shifting gradient scale of LM training.
    beta2: float = 0.95
    # Clip the global gradient norm at 1.0 (GPT-3/Llama); 0 disables clipping.
    grad_clip: float = 1.0
    # Save a resumable checkpoint every this many steps (and always at the end / on stop).
    checkpoint_every: int = 200
    # Retention: keep the newest keep_last checkpoints (each holds weights + 2 Adam moments, 3× the
    # model) ...
    keep_last: int = 2
    # ... plus every checkpoint whose step is a multiple of keep_every (0 = none), for
    # looking back at a long run without keeping all of it.
    keep_every: int = 0
    # Seeds model init and the batch sequence.
    seed: int = 1337
    # "auto" = CUDA when present, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto = bf16 autocast on CUDA, fp32 on CPU (CPU bf16 gains are small and differ by CPU);
    # bf16 asks for autocast on CPU too. Weights and optimizer state stay fp32 either way.
    precision: Precision = "auto"
    # TF32 matmuls on Ampere+ GPUs: ~2× over fp32 for the few ops autocast leaves in fp32.
    tf32: bool = True
    # torch.compile gives ~10-20 % on CPU after a 12-19 s compile: off until runs are long.
    compile: bool = False
    # Recompute each layer's activations in backward: ~30 % more compute for memory that no
    # longer grows with depth. For models that do not otherwise fit.
    activation_checkpointing: bool = False
    # 0 = torch's default (one per core); set it when sharing the machine with other jobs.
    num_threads: int = 0
    # Record loss, lr, grad norm, tokens/s, MFU and memory every this many steps.
    log_every: int = 10
    # Measure validation loss every this many steps (0 = only at the end); the evaluate
    # stage measures it again on the final weights.
    eval_every: int = 0
    # Validation batches per in-training evaluation; a few suffice to see over-fitting.
    eval_batches: int = 10
    # Peak dense FLOP/s of one device for MFU; 0 = look the device up in monitor.PEAK_FLOPS.
    peak_tflops: float = 0.0

    def __post_init__(self) -> None:
        check(self.steps > 0, f"steps must be positive, got {self.steps}")
        check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        check(self.grad_accum > 0, f"grad_accum must be positive, got {self.grad_accum}")
        check(self.seq_len > 0, f"seq_len must be positive, got {self.seq_len}")
        check(self.lr > 0, f"lr must be positive, got {self.lr}")
        check(0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        check(self.checkpoint_every > 0, f"checkpoint_every must be positive, got {self.checkpoint_every}")
        check(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        check(self.keep_every >= 0, f"keep_every must be >= 0 (0 = off), got {self.keep_every}")
        check(self.num_threads >= 0, f"num_threads must be >= 0 (0 = default), got {self.num_threads}")
        check(self.log_every > 0, f"log_every must be positive, got {self.log_every}")
        check(self.eval_every >= 0, f"eval_every must be >= 0 (0 = only at the end), got {self.eval_every}")
        check(self.eval_batches > 0, f"eval_batches must be positive, got {self.eval_batches}")
        check(self.peak_tflops >= 0, f"peak_tflops must be >= 0 (0 = look it up), got {self.peak_tflops}")


@dataclass(kw_only=True, slots=True)
class DistConfig:
    # auto = single with one process, ddp with several. fsdp shards parameters, gradients and
    # optimizer state (FSDP2 fully_shard) for models that do not fit one device; deepspeed runs
    # ZeRO from deepspeed_config.
    engine: EngineName = "auto"
    # Processes per node (one per GPU; on CPU, 2 processes of 1 thread each is a test setup).
    nproc_per_node: int = 1
    # Nodes in the job; `appliance train --nnodes` overrides it.
    nnodes: int = 1
    # A DeepSpeed JSON config (relative to the recipe), for engine = "deepspeed".
    deepspeed_config: str = ""
    # Process-group timeout: a collective that waits longer fails the run instead of hanging
    # (a dead rank otherwise leaves the others waiting ~300 s, or forever on NCCL).
    timeout_s: int = 300
    # gloo on CPU, nccl on CUDA; "auto" picks by device.
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def __post_init__(self) -> None:
        check(self.nproc_per_node > 0, f"nproc_per_node must be positive, got {self.nproc_per_node}")
        check(self.nnodes > 0, f"nnodes must be positive, got {self.nnodes}")
        check(self.timeout_s > 0, f"timeout_s must be positive, got {self.timeout_s}")
        check(self.engine != "deepspeed" or bool(self.deepspeed_config), 'engine = "deepspeed" needs deepspeed_config = "path/to/ds_config.json"')
