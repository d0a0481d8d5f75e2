"""Tiny base models in Hugging Face layout, built locally for fine-tuning tests (nothing downloaded).

``build_tiny_base(path)`` writes a random-initialised Llama (or Qwen2) of a few hundred thousand
parameters with a byte-level BPE tokenizer trained on a little real text, bos/eos/pad tokens,
and (by default) a ChatML chat template — the layout of the open models users bring.
"""

from __future__ import annotations

from pathlib import Path

# ChatML, as Qwen's models ship it (tool calls left to the formats that need them).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TEXT = """The module provides functions for working with paths. A path names a file or a folder.
Call open() to read a file; the result is a file object. Lists hold items in order, and
dictionaries map keys to values. A function returns a value; a generator yields many.
Errors are raised as exceptions and handled with try and except. Strings are immutable.
The quick brown fox jumps over the lazy dog. Numbers can be integers or floating point.
"""


def train_tokenizer(vocab_size: int = 320) -> object:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with <s>, </s>, <pad> and the ChatML markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TEXT] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def build_tiny_base(path: Path, *, arch: str = "llama", chat_template: bool = True, seed: int = 0) -> Path:
    """Write a tiny random base model and its tokenizer to ``path``; returns ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer()
    if chat_template:
        tokenizer.chat_template = CHATML  # type: ignore[attr-defined]
    shape = {
        "vocab_size": len(tokenizer),  # type: ignore[arg-type]
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": tokenizer.bos_token_id,  # type: ignore[attr-defined]
        "eos_token_id": tokenizer.eos_token_id,  # type: ignore[attr-defined]
        "pad_token_id": tokenizer.pad_token_id,  # type: ignore[attr-defined]
        "tie_word_embeddings": True,
    }
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    else:
        raise ValueError(f"unknown arch {arch!r}")
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)  # type: ignore[attr-defined]
    return path
