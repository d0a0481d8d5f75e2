"""Sampling settings for ``appliance generate``: checked by the CLI before torch is imported."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import check

# Past a model's context every new token is recomputed by a sliding window; 65,536 tokens is
# a long book chapter, far past any sample worth waiting for, and still ends.
MAX_NEW_TOKENS = 1 << 16


@dataclass(kw_only=True, slots=True)
class SampleConfig:
    # Long enough for a sentence or two; the model's context bounds what it can condition on anyway.
    max_new_tokens: int = 64
    # 0.8 / top-50, as the evaluate stage samples: readable without greedy repetition. 0 = greedy.
    temperature: float = 0.8
    # 0 = off.
    top_k: int = 50
    # Nucleus sampling: keep the smallest set of tokens whose probability is at least top_p. 1.0 = off.
    top_p: float = 1.0
    # Prompt i is sampled with seed + i, so adding a prompt does not change the others' text.
    seed: int = 1337

    def __post_init__(self) -> None:
        check(0 <= self.max_new_tokens <= MAX_NEW_TOKENS, f"max_new_tokens must be between 0 and {MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        check(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        check(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
