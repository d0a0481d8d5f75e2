"""The ``[evaluate]`` recipe table: how much validation text to score, and the sample prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import check

DEFAULT_PROMPTS = [
    "The",
    "Once upon a time",
    "The most important thing to know is",
    "In this report we",
]


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    # 50 × 8 windows of 256 = ~100k tokens: enough for a loss stable to ~0.01 on a CPU in seconds.
    max_batches: int = 50
    batch_size: int = 8
    # 0 = the model's max_seq_len, the context it was built for.
    seq_len: int = 0
    # Generic openings that any English corpus can continue; replace with domain prompts in a recipe.
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    # Long enough to judge fluency, short enough that sampling adds little to the evaluation's time.
    max_new_tokens: int = 64
    # 0.8 / top-50: the usual "readable but not greedy-repetitive" sampling settings.
    temperature: float = 0.8
    top_k: int = 50
    # Seeds sampling so the report of a checkpoint is reproducible.
    seed: int = 1337
    # "auto" = CUDA when present, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        check(self.max_batches > 0, f"max_batches must be positive, got {self.max_batches}")
        check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        check(self.seq_len >= 0, f"seq_len must be >= 0 (0 = model's max_seq_len), got {self.seq_len}")
        check(self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        check(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        check(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
