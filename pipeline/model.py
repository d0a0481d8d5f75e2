"""A Llama-style decoder whose parameter names are those of Hugging Face's LlamaForCausalLM.

RMSNorm, rotary position embeddings (HF's ``rotate_half`` layout, so logits match
``transformers``), SwiGLU feed-forward, optional grouped-query attention, attention through
``scaled_dot_product_attention``. Because the module tree mirrors ``LlamaForCausalLM``
(``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``, …, ``lm_head``), our
``state_dict`` *is* the HF state dict: packaging is a file copy plus ``config.json``.

Checkpoint directories (training steps, ``final``) hold ``model.safetensors`` and
``model_config.json``; ``save_weights`` / ``load_checkpoint`` are the one way to write and read them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import from_mapping
from pipeline.errors import TrainingError

# The [model] table lives in a torch-free module, so a recipe loads without torch; its names stay importable from here.
from pipeline.settings.model import DEFAULT_SHAPE, PRESETS, SHAPE_FIELDS, ModelConfig  # noqa: F401

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
MODEL_CONFIG_FORMAT = "appliance-llama"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 even under bf16 autocast, as HF does, so the two agree.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (max_seq_len, head_dim), computed exactly as HF's default rotary embedding."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    freqs = torch.arange(cfg.max_seq_len, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # HF's layout pairs dimension i with i + head_dim/2 (not interleaved pairs as in Meta's code).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Keys and values of every layer for positions 0..length-1, so generation feeds each new token alone.

    ``LlamaModel.forward(idx, cache=cache)`` fills it: each layer's attention stores the keys and
    values of the positions it is given and attends to all stored so far; the model then advances
    ``length``. A layer's buffers are allocated for the whole context on its first call.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` (batch, kv_heads, t, head_dim) at positions length…length+t-1; return all stored."""
        start, end = self.length, self.length + k.shape[2]
        if layer == len(self.k):
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.k.append(k.new_zeros(shape))
            self.v.append(v.new_zeros(shape))
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # Which of a KVCache's layers is this one's.
        self.layer = layer
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.hd, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        causal, mask = True, None
        if cache is not None:
            start = cache.length
            k, v = cache.update(self.layer, k, v)
            # SDPA's causal mask is aligned top-left: right for a prefill from position 0. One new
            # token attends to everything cached (no mask); a later block needs the diagonal moved.
            causal = t > 1 and start == 0
            if t > 1 and start > 0:
                mask = torch.ones(t, start + t, dtype=torch.bool, device=q.device).tril(start)
        if self.n_kv != self.n_heads:
            # repeat_interleave rather than SDPA's enable_gqa: the latter needs torch >= 2.5 (GPU
            # sites may bring 2.4), and the copy measured no slower at the sizes trained here.
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF's ``LlamaModel``: the part under the ``model.`` prefix."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rope_tables(cfg)
        # Not persistent: derived from the config, and HF's state dict has no such keys.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx: torch.Tensor, recompute: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        t = idx.shape[1]
        start = 0 if cache is None else cache.length
        if cache is not None and start + t > cache.capacity:
            raise TrainingError(
                f"{t} more positions do not fit the KV cache ({start} of {cache.capacity} used)", "start a new KVCache with the last max_seq_len tokens"
            )
        x = self.embed_tokens(idx)
        cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        for layer in self.layers:
            # Non-reentrant, as PyTorch recommends: the reentrant variant needs an input that
            # requires grad and does not mix with DDP/FSDP's backward hooks.
            x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False) if recompute else layer(x, cos, sin, cache)
        if cache is not None:
            cache.length = start + t
        return self.norm(x)


class LlamaModel(nn.Module):
    """The causal LM. ``forward(idx, targets)`` returns (logits, mean cross-entropy or None).

    With ``cache`` (generation), ``idx`` continues the positions the cache holds and extends it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0 or any(getattr(cfg, name) <= 0 for name in SHAPE_FIELDS):
            raise TrainingError(
                f"LlamaModel needs a resolved ModelConfig (vocab_size and {', '.join(SHAPE_FIELDS)} filled in)",
                "build it from cfg.resolved(vocab_size=shards.vocab_size)",
            )
        self.cfg = cfg
        # Set by the trainer: recompute each layer's activations in backward instead of storing
        # them, trading ~1/3 more compute for activation memory that no longer grows with depth.
        self.activation_checkpointing = False
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm gains start as the identity
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # GPT-2's trick: each residual branch adds variance, so scale its output layer down
                # to keep the residual stream's scale independent of depth.
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                p.normal_(0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        logits = self.lm_head(self.model(idx, recompute, cache))
        if targets is None:
            return logits, None
        # Loss in float32: cross-entropy over a large vocabulary loses precision in bf16.
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding counts once). ZeRO-3 leaves each rank an empty
        placeholder per parameter; ``ds_numel`` is the real size then."""
        return sum(getattr(p, "ds_numel", None) or p.numel() for p in self.parameters())


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) by PaLM's appendix B: 6·N + 12·L·H·Q·T.

    N counts the matmul weights: per layer q/k/v/o and gate/up/down, plus lm_head (dim·vocab)
    even when tied, since the output projection is a matmul however it is stored. Left out:
    the embedding lookup (a gather), RMSNorm gains, RoPE, softmax and SiLU (elementwise, as
    PaLM leaves them out). 12·L·H·Q·T is QKᵀ and attention·V over the full T×T square with no
    causal halving, PaLM's convention, so MFU compares with published figures.
    """
    c = cfg.resolved()
    if c.vocab_size <= 0:
        raise TrainingError("model_flops_per_token needs the vocabulary size", "pass cfg.resolved(vocab_size=shards.vocab_size)")
    attn = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
    n = c.n_layers * (attn + 3 * c.dim * c.ffn_dim) + c.dim * c.vocab_size
    return float(6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len)


def hf_config(model_cfg: ModelConfig, bos_id: int, eos_id: int, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` that makes ``transformers`` load our weights as LlamaForCausalLM."""
    cfg = model_cfg.resolved()
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 4.x reads rope_theta, 5.x reads rope_parameters: write both.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        # 4.x calls it torch_dtype, 5.x dtype.
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def weights_state_dict(model: LlamaModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The HF-named tensors to save; a tied ``lm_head.weight`` is left out, as HF does."""
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in sd.items()}


def save_weights(model: LlamaModel, path: Path, dtype: torch.dtype | None = None) -> None:
    # "format": "pt" is what transformers looks for in the safetensors metadata.
    save_file(weights_state_dict(model, dtype), str(path), metadata={"format": "pt"})


def load_weights(model: LlamaModel, path: Path) -> None:
    """Load ``model.safetensors`` into ``model``; a missing/extra tensor is a TrainingError naming the file."""
    tensors = load_file(str(path))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if model.cfg.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise TrainingError(
            f"{path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}",
            f"check that {MODEL_CONFIG} beside it belongs to the same checkpoint",
        )


def save_model_config(directory: Path, cfg: ModelConfig, *, bos_id: int, eos_id: int) -> Path:
    """Write ``model_config.json``: the resolved ModelConfig under "model", plus the special token ids."""
    path = Path(directory) / MODEL_CONFIG
    body = {"format": MODEL_CONFIG_FORMAT, "version": 1, "model": dataclasses.asdict(cfg), "bos_id": bos_id, "eos_id": eos_id}
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_model_config(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, whole file) from a checkpoint directory's ``model_config.json``."""
    path = Path(directory) / MODEL_CONFIG
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(
            f"no {MODEL_CONFIG} in {directory}: not a model checkpoint", "point at the train stage's final/ or a checkpoints/step_* directory"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainingError(f"{path} is not valid JSON ({exc})", "restore the checkpoint from the store") from None
    if body.get("format") != MODEL_CONFIG_FORMAT:
        raise TrainingError(f"{path} is not an {MODEL_CONFIG_FORMAT} model config", "point at a checkpoint written by the train stage")
    cfg = from_mapping(ModelConfig, body.get("model", {}), source=str(path), prefix="model")
    return cfg.resolved(), body


def load_checkpoint(directory: Path, device: str | torch.device = "cpu") -> tuple[LlamaModel, dict[str, Any]]:
    """Build the model a checkpoint directory describes and load its weights (eval mode)."""
    cfg, body = read_model_config(directory)
    model = LlamaModel(cfg)
    load_weights(model, Path(directory) / WEIGHTS)
    return model.to(device).eval(), body
