"""The ``[model]`` recipe table: the decoder's shape, named presets and how a shape is resolved.

Torch-free, so that a recipe can be read and checked without importing torch;
``pipeline.model`` builds the module from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pipeline.config import check

# Named sizes for ModelConfig.preset. 0 means "derived": n_kv_heads 0 = n_heads, ffn_dim 0 = the
# Llama rule 8/3·dim rounded up to multiple_of (a preset's own ffn_dim, as in 1b, stays when a
# recipe changes dim: set ffn_dim too). Parameter counts are for tied embeddings.
PRESETS: dict[str, dict[str, int]] = {
    # Smoke tests and CI: head_dim 16 with GQA 4:2, so every code path runs in seconds on a CPU.
    # 0.10M parameters without the embedding; 0.61M with an 8k vocabulary, 2.15M with 32k.
    "tiny": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 0, "max_seq_len": 128},
    # A CPU/single-GPU size between the default and GPT-2 small; head_dim 64 as in GPT-2/Llama.
    # 10.6M without the embedding; 13.7M with an 8k vocabulary, 16.8M with 16k, 22.9M with 32k.
    "20m": {"dim": 384, "n_layers": 6, "n_heads": 6, "n_kv_heads": 0, "ffn_dim": 0, "max_seq_len": 512},
    # GPT-2 small's shape (Radford et al. 2019); SwiGLU at 8/3·768 = 2048 has the parameters of
    # its 4·dim MLP. 85.0M without the embedding; 91.1M with 8k, 109.5M with 32k (GPT-2's 50257 gives 123.6M).
    "124m": {"dim": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 0, "ffn_dim": 0, "max_seq_len": 1024},
    # GPT-2 medium's shape. 303.6M without the embedding; 311.8M with 8k, 336.4M with 32k
    # (GPT-2's 50257 gives 355.1M).
    "350m": {"dim": 1024, "n_layers": 24, "n_heads": 16, "n_kv_heads": 0, "ffn_dim": 0, "max_seq_len": 1024},
    # Llama-3.2-1B's shape (Meta's config.json: hidden 2048, 16 layers, 32 heads, 8 KV heads,
    # intermediate 8192), with its 128k vocabulary replaced by ours and its context cut to 2048.
    # 973.1M without the embedding; 989.5M with 8k, 1038.7M with 32k.
    "1b": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 8192, "max_seq_len": 2048},
}
# ModelConfig() with no preset: 256 wide / 6 deep (~6.6M parameters with an 8k vocabulary)
# trains at a few k tok/s on a CPU; head_dim 32 because small models do better with more,
# narrower heads than with few wide ones.
DEFAULT_SHAPE: dict[str, int] = {"dim": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 0, "ffn_dim": 0, "max_seq_len": 256}
SHAPE_FIELDS = tuple(DEFAULT_SHAPE)


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    # 0 = take it from the shard set, so a recipe never disagrees with its tokenizer.
    vocab_size: int = 0
    # "" or a PRESETS name. A preset fills every shape field below left at 0; fields the recipe
    # sets win, so `preset = "124m"` with `max_seq_len = 512` is GPT-2 small with a shorter context.
    preset: str = ""
    # Shape fields: 0 = from the preset, else DEFAULT_SHAPE. resolved() makes them concrete.
    dim: int = 0
    n_layers: int = 0
    n_heads: int = 0
    # 0 = the preset's, else n_heads (plain multi-head attention); fewer shares K/V between heads
    # (GQA), shrinking the KV cache.
    n_kv_heads: int = 0
    # 0 = the preset's, else the Llama rule 8/3·dim rounded up to multiple_of, which keeps SwiGLU
    # at the FLOPs of a 4·dim MLP.
    ffn_dim: int = 0
    # Llama's rounding: matmul shapes that are multiples of 64 run on fast kernel paths.
    multiple_of: int = 64
    # Longest context; RoPE tables are built for it. Training seq_len may be shorter.
    max_seq_len: int = 0
    # 10000 is the RoPE base of Llama 1/2; larger bases only matter for long contexts.
    rope_theta: float = 10000.0
    # 1e-5 as in Llama 2; small enough to be harmless, large enough to be safe in bf16.
    norm_eps: float = 1e-5
    # Sharing input and output embeddings saves vocab·dim parameters, a large share in small models.
    tie_embeddings: bool = True
    # GPT-2 / Llama initialisation; the residual output projections are further scaled by 1/sqrt(2·n_layers).
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check(self.vocab_size >= 0, f"vocab_size must be >= 0 (0 = from the shard set), got {self.vocab_size}")
        check(self.preset in ("", *PRESETS), f"preset {self.preset!r} is not one of: {', '.join(PRESETS)}")
        for name in SHAPE_FIELDS:
            check(getattr(self, name) >= 0, f"{name} must be >= 0 (0 = from the preset or the default), got {getattr(self, name)}")
        check(self.multiple_of > 0, f"multiple_of must be positive, got {self.multiple_of}")
        # Checked on the resolved shape, so a bad value fails when the recipe loads, whether it
        # came from the recipe, the preset or the default.
        s = self.shape()
        src = f" (preset {self.preset!r} with the recipe's overrides)" if self.preset else ""
        check(s["dim"] % s["n_heads"] == 0, f"dim ({s['dim']}) must be divisible by n_heads ({s['n_heads']}){src}")
        check((s["dim"] // s["n_heads"]) % 2 == 0, f"head size dim/n_heads = {s['dim'] // s['n_heads']} must be even for RoPE{src}")
        check(s["n_heads"] % s["n_kv_heads"] == 0, f"n_heads ({s['n_heads']}) must be a multiple of n_kv_heads ({s['n_kv_heads']}){src}")
        check(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        check(0 < self.norm_eps < 1, f"norm_eps must be in (0, 1), got {self.norm_eps}")
        check(0 < self.init_std < 1, f"init_std must be in (0, 1), got {self.init_std}")

    def shape(self) -> dict[str, int]:
        """The concrete shape fields: the recipe's where set, else the preset's, else the default."""
        base = PRESETS.get(self.preset, DEFAULT_SHAPE)
        s = {name: getattr(self, name) or base[name] for name in SHAPE_FIELDS}
        s["n_kv_heads"] = s["n_kv_heads"] or s["n_heads"]
        s["ffn_dim"] = s["ffn_dim"] or self.multiple_of * math.ceil(int(8 * s["dim"] / 3) / self.multiple_of)
        return s

    @property
    def head_dim(self) -> int:
        s = self.shape()
        return s["dim"] // s["n_heads"]

    def resolved(self, vocab_size: int | None = None) -> ModelConfig:
        """A copy with every 0 = "derive it" field filled in (what a checkpoint records)."""
        return dataclasses.replace(self, vocab_size=self.vocab_size or (vocab_size or 0), **self.shape())
