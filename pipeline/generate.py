"""Text generation from a trained checkpoint or a packaged model, with a KV cache.

Two kinds of model directory load here: a training checkpoint (``model_config.json`` +
``model.safetensors``; it carries no tokenizer, so one must be given) and a packaged model
(Hugging Face ``config.json`` + ``model.safetensors`` + ``tokenizer.model``), whose
``ModelConfig`` is rebuilt from the HF config.

This is the one sampler: ``appliance generate`` and the evaluate stage's samples both go
through ``generate_text``. Greedy at temperature 0, else temperature, top-k, then top-p, drawn
with a seeded CPU generator; it stops at the end-of-sequence token. Decoding feeds one token at
a time through the model's own KV cache (``pipeline.model.KVCache``); once the context is full
it recomputes the last ``max_seq_len`` tokens from position 0 each step, a sliding window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm
import torch
import torch.nn.functional as F

from pipeline.config import from_mapping
from pipeline.errors import ConfigError, TrainingError
from pipeline.model import MODEL_CONFIG, WEIGHTS, KVCache, LlamaModel, ModelConfig, load_checkpoint, load_weights
from pipeline.settings.generate import SampleConfig

HF_CONFIG = "config.json"
TOKENIZER = "tokenizer.model"


@dataclass(frozen=True, slots=True)
class GenerationModel:
    """A model ready to generate: weights on their device, the tokenizer and its special ids."""

    model: LlamaModel
    tokenizer: spm.SentencePieceProcessor
    bos_id: int
    eos_id: int
    path: Path
    kind: Literal["checkpoint", "package"]
    tokenizer_path: Path


@dataclass(frozen=True, slots=True)
class Generation:
    prompt: str
    # The continuation only (the prompt is not repeated), with its leading space if it has one.
    text: str
    prompt_tokens: int
    # Generated tokens, not counting the end-of-sequence token that stopped generation.
    new_tokens: int
    stopped_at_eos: bool


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when present, else CPU; ``cuda`` without a CUDA device is a ConfigError."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device '{name}' is not one of auto, cpu, cuda", "pass --device auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is available", "pass --device auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _hf_field(body: dict[str, Any], key: str, path: Path) -> Any:
    if key not in body:
        raise TrainingError(f"{path} has no '{key}': not a Llama config.json", "point at a model directory written by the package stage")
    return body[key]


def _special_id(value: Any, key: str, path: Path) -> int:
    # transformers allows a list of eos ids; the first is the one the tokenizer writes.
    if isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TrainingError(f"{path}: '{key}' must be a token id, got {value!r}", "point at a model directory written by the package stage")
    return value


def read_hf_config(model_dir: Path) -> tuple[ModelConfig, int, int]:
    """(ModelConfig, bos_id, eos_id) from a packaged model's Hugging Face ``config.json``."""
    path = Path(model_dir) / HF_CONFIG
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"no {HF_CONFIG} in {model_dir}: not a packaged model", "point at a model directory written by the package stage") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainingError(f"{path} is not valid JSON ({exc})", "restore the model directory from the store") from None
    if not isinstance(body, dict) or body.get("model_type") != "llama":
        raise TrainingError(f"{path} does not describe a Llama model (model_type is not 'llama')", "only LlamaForCausalLM models can be loaded here")
    # The features our decoder does not have: loading such weights would silently compute something else.
    unsupported = [
        key
        for key, ok in (
            ("hidden_act", body.get("hidden_act", "silu") == "silu"),
            ("attention_bias", not body.get("attention_bias", False)),
            ("mlp_bias", not body.get("mlp_bias", False)),
            ("rope_scaling", not body.get("rope_scaling")),
            ("rope_parameters", (body.get("rope_parameters") or {}).get("rope_type", "default") == "default"),
        )
        if not ok
    ]
    if unsupported:
        raise TrainingError(
            f"{path}: {', '.join(unsupported)} set to something this decoder does not implement",
            "only plain Llama models (SiLU, no biases, default RoPE) can be loaded here",
        )
    rope = body.get("rope_theta") or (body.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    mapping = {
        "vocab_size": _hf_field(body, "vocab_size", path),
        "dim": _hf_field(body, "hidden_size", path),
        "n_layers": _hf_field(body, "num_hidden_layers", path),
        "n_heads": _hf_field(body, "num_attention_heads", path),
        "n_kv_heads": body.get("num_key_value_heads") or body["num_attention_heads"],
        "ffn_dim": _hf_field(body, "intermediate_size", path),
        "max_seq_len": _hf_field(body, "max_position_embeddings", path),
        "rope_theta": rope,
        "norm_eps": body.get("rms_norm_eps", 1e-5),
        "tie_embeddings": body.get("tie_word_embeddings", True),
        "init_std": body.get("initializer_range", 0.02),
    }
    cfg = from_mapping(ModelConfig, mapping, source=str(path))
    head_dim = body.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise TrainingError(
            f"{path}: head_dim {head_dim} differs from hidden_size / num_attention_heads = {cfg.head_dim}",
            "only models with head_dim = hidden_size / heads can be loaded here",
        )
    bos = _special_id(_hf_field(body, "bos_token_id", path), "bos_token_id", path)
    eos = _special_id(_hf_field(body, "eos_token_id", path), "eos_token_id", path)
    return cfg.resolved(), bos, eos


def _open_tokenizer(path: Path, vocab_size: int, model_path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise TrainingError(f"tokenizer {path} does not exist", "pass the tokenizer.model the model was trained with")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise TrainingError(f"{path} is not a SentencePiece model ({exc})", "pass the tokenizer.model the model was trained with") from None
    if sp.get_piece_size() > vocab_size:
        raise TrainingError(
            f"tokenizer {path} has {sp.get_piece_size()} pieces but the model {model_path} has a vocabulary of {vocab_size}",
            "pass the tokenizer the model was trained with",
        )
    return sp


def load_for_generation(path: Path, *, tokenizer: Path | None = None, device: str | torch.device = "cpu") -> GenerationModel:
    """Load a checkpoint directory (needs ``tokenizer``) or a packaged model directory (eval mode).

    ``path`` is the directory itself, already resolved (and, for a stored model, verified) by the
    caller. Only files inside it are read, plus ``tokenizer`` when one is given.
    """
    path = Path(path)
    if not path.is_dir():
        raise TrainingError(f"model directory {path} does not exist", "point at a packaged model/ directory or a checkpoint directory")
    # A link leading out of the directory would load bytes that were not checked with it (a stored,
    # verified model holds no links at all).
    for name in (WEIGHTS, MODEL_CONFIG, HF_CONFIG, TOKENIZER):
        target = (path / name).resolve()
        if not target.is_relative_to(path.resolve()):
            raise TrainingError(
                f"{path / name} links to {target}, outside the model directory", "copy the file into the directory, or pass a tokenizer with --tokenizer"
            )
    if not (path / WEIGHTS).is_file():
        raise TrainingError(f"no {WEIGHTS} in {path}", "point at a packaged model/ directory or a checkpoint directory (final/, step_*)")
    if (path / MODEL_CONFIG).is_file():
        if tokenizer is None:
            raise TrainingError(
                f"{path} is a training checkpoint, which carries no tokenizer",
                "pass the tokenizer.model it was trained with (appliance generate --tokenizer PATH), or use the packaged model directory",
            )
        model, meta = load_checkpoint(path, device)
        sp = _open_tokenizer(Path(tokenizer), model.cfg.vocab_size, path)
        bos, eos = int(meta.get("bos_id", sp.bos_id())), int(meta.get("eos_id", sp.eos_id()))
        return GenerationModel(model=model, tokenizer=sp, bos_id=bos, eos_id=eos, path=path, kind="checkpoint", tokenizer_path=Path(tokenizer))
    if (path / HF_CONFIG).is_file():
        cfg, bos, eos = read_hf_config(path)
        tok_path = Path(tokenizer) if tokenizer is not None else path / TOKENIZER
        if tokenizer is None and not tok_path.is_file():
            raise TrainingError(f"no {TOKENIZER} in packaged model {path}", "pass the SentencePiece tokenizer with --tokenizer PATH")
        sp = _open_tokenizer(tok_path, cfg.vocab_size, path)
        model = LlamaModel(cfg)
        load_weights(model, path / WEIGHTS)
        return GenerationModel(model=model.to(device).eval(), tokenizer=sp, bos_id=bos, eos_id=eos, path=path, kind="package", tokenizer_path=tok_path)
    raise TrainingError(
        f"{path} has neither {MODEL_CONFIG} (a checkpoint) nor {HF_CONFIG} (a packaged model)", "point at a packaged model/ directory or a checkpoint directory"
    )


# -- sampling --------------------------------------------------------------------------------


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """True for the k largest logits (ties with the k-th are kept); k = 0 keeps all."""
    if k <= 0 or k >= logits.size(-1):
        return torch.ones_like(logits, dtype=torch.bool)
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits >= kth


def top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """True for the smallest set of most likely tokens whose total probability is at least p."""
    if p >= 1:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    # A token is kept when the mass before it is still short of p; float64 so the boundary is exact
    # for hand-checkable distributions. The most likely token is always kept.
    before = torch.cumsum(sorted_p.double(), dim=-1) - sorted_p.double()
    keep_sorted = before < p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def next_token(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of logits: greedy at temperature 0, else top-k, then top-p."""
    logits = logits.float().flatten()
    if cfg.temperature <= 0:
        return int(logits.argmax())
    logits = logits / cfg.temperature
    logits = logits.masked_fill(~top_k_mask(logits, cfg.top_k), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    probs = probs * top_p_mask(probs, cfg.top_p)
    # Sampled on the CPU with a CPU generator, so a seed gives the same text on any device.
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate_ids(
    model: LlamaModel, prompt_ids: list[int], cfg: SampleConfig, *, eos_id: int | None, generator: torch.Generator | None = None
) -> tuple[list[int], bool]:
    """(new token ids without the eos, whether eos stopped it) continuing ``prompt_ids``."""
    if not prompt_ids:
        raise TrainingError("cannot generate from an empty prompt", "start the prompt with the BOS token")
    device, context = model.lm_head.weight.device, model.cfg.max_seq_len
    ids, new = list(prompt_ids), list[int]()
    cache = KVCache(context)
    was_training = model.training
    model.eval()
    try:
        for _ in range(cfg.max_new_tokens):
            if cache.length == 0 or cache.length == context:
                # Prefill, or the context is full: start again from the last max_seq_len tokens at
                # position 0 (a sliding window: the model never saw positions beyond its context).
                cache = KVCache(context)
                feed = ids[-context:]
            else:
                feed = ids[-1:]
            logits, _ = model(torch.tensor([feed], device=device), cache=cache)
            nxt = next_token(logits[0, -1], cfg, generator)
            if eos_id is not None and nxt == eos_id:
                return new, True
            ids.append(nxt)
            new.append(nxt)
    finally:
        model.train(was_training)
    return new, False


def _continuation(sp: spm.SentencePieceProcessor, prompt_ids: list[int], new: list[int]) -> str:
    # SentencePiece drops the leading space of a decoded sequence, so "the cat" + [" sat"] would
    # decode to "sat"; decoding prompt and continuation together keeps the space.
    head = sp.decode(prompt_ids)
    whole = sp.decode(prompt_ids + new)
    return whole[len(head) :] if whole.startswith(head) else sp.decode(new)


def generate_text(bundle: GenerationModel, prompts: list[str], cfg: SampleConfig) -> list[Generation]:
    """Continue each prompt (BOS + its pieces, as training windows start at documents)."""
    out = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(cfg.seed + i)
        pieces = bundle.tokenizer.encode(prompt)
        new, stopped = generate_ids(bundle.model, [bundle.bos_id, *pieces], cfg, eos_id=bundle.eos_id, generator=gen)
        text = _continuation(bundle.tokenizer, pieces, new)
        out.append(Generation(prompt=prompt, text=text, prompt_tokens=len(pieces) + 1, new_tokens=len(new), stopped_at_eos=stopped))
    return out
