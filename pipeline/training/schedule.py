"""Learning-rate schedules: a pure function of the step, so resuming needs no scheduler state."""

from __future__ import annotations

import math

from pipeline.training.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for optimizer update ``step`` (0-based).

    All schedules warm up linearly to ``lr`` over ``warmup_steps``. Then:
    - cosine: half a cosine down to ``min_lr`` at the last step (nanoGPT, Llama);
    - wsd: flat at ``lr`` until the last ``decay_fraction`` of steps, then linear to ``min_lr``
      (warmup-stable-decay, MiniCPM): a run can be extended from any pre-decay checkpoint;
    - constant: flat at ``lr``.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.steps * cfg.decay_fraction))
        decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        ratio = min(1.0, (step - decay_start + 1) / max(1, cfg.steps - decay_start))
        return cfg.lr + ratio * (cfg.min_lr - cfg.lr)
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    ratio = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)
