"""Packaging: a checkpoint becomes a Hugging Face model directory anyone can load offline.

``out_dir/model/`` holds config.json (LlamaForCausalLM), generation_config.json,
model.safetensors (HF tensor names; a tied lm_head is not stored twice), the SentencePiece
tokenizer with its configs (``tokenizer_config.json`` carries ``pipeline.chat_template``'s
template), and README.md, a model card listing the provenance the caller
passes in. The output is deterministic (no timestamps of its own), so packaging the same
checkpoint twice gives the same directory digest. The caller signs it afterwards, adding
``model.sig``; nothing else is written into the directory after this stage.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file

from keys.files import publish_dir
from pipeline.chat_template import CHAT_TEMPLATE
from pipeline.errors import ConfigError, TrainingError
from pipeline.model import WEIGHTS, ModelConfig, hf_config, read_model_config
from pipeline.result import StageResult, write_json

# The [package] table lives in a torch-free module, so a recipe loads without torch; its names stay importable from here.
from pipeline.settings.package import PackageConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cell(value: Any) -> str:
    """A value as one Markdown table cell (pipes and newlines would break the table)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text.replace("|", "\\|").replace("\n", " ")


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key in sorted(d):
        value = d[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def model_card(cfg: PackageConfig, mcfg: ModelConfig, n_params: int, provenance: dict[str, Any], tokenizer_pieces: int) -> str:
    """README.md: front matter, description, architecture, provenance table, offline usage."""
    arch = [
        ("architecture", "LlamaForCausalLM (RMSNorm, RoPE, SwiGLU" + (", grouped-query attention)" if mcfg.n_kv_heads != mcfg.n_heads else ")")),
        ("parameters", f"{n_params:,}"),
        ("hidden size", mcfg.dim),
        ("layers", mcfg.n_layers),
        ("attention heads", mcfg.n_heads),
        ("key/value heads", mcfg.n_kv_heads),
        ("feed-forward size", mcfg.ffn_dim),
        ("context length", mcfg.max_seq_len),
        ("vocabulary", f"{mcfg.vocab_size} (SentencePiece, {tokenizer_pieces} pieces)"),
        ("tied embeddings", mcfg.tie_embeddings),
        ("RoPE theta", mcfg.rope_theta),
        ("weights dtype", cfg.dtype),
    ]
    licence = cfg.license.strip()
    # The hub's metadata wants an identifier; anything else is "other" plus the text (a JSON
    # string is a valid YAML scalar, so quoting cannot break the front matter).
    simple = re.fullmatch(r"[A-Za-z0-9.+-]+", licence) is not None
    lines = [
        "---",
        f"license: {licence if simple else 'other'}",
        *([] if simple else [f"license_name: {json.dumps(licence)}"]),
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- llama",
        "- sovereign-appliance",
        "---",
        "",
        f"# {cfg.model_name}",
        "",
    ]
    if cfg.description.strip():
        lines += [cfg.description.strip(), ""]
    lines += [f"License: {licence}", ""]
    lines += ["## Architecture", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in arch]
    lines += ["", "## Provenance", ""]
    if provenance:
        lines += ["| key | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in _flatten(provenance)]
    else:
        lines += ["No provenance was recorded for this package."]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoTokenizer, LlamaForCausalLM",
        'model = LlamaForCausalLM.from_pretrained("path/to/this/directory")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        "```",
        "",
        "## Verifying",
        "",
        "`model.sig` in this directory is an OpenSSF model-signing bundle over every file here:",
        "`model_signing verify key DIR --public_key KEY.pub --signature DIR/model.sig`.",
        "",
    ]
    return "\n".join(lines)


def _tokenizer_files(sp: spm.SentencePieceProcessor, max_len: int) -> tuple[dict[str, Any], dict[str, Any]]:
    specials = {
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
    }
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        **specials,
        # Our tokenizers have no pad piece; callers that batch set pad_token = eos_token.
        "pad_token": None,
        # Training windows start with BOS at document starts, so prompts should too.
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # The non-legacy behaviour treats text after a special token like any other text.
        "legacy": False,
        "model_max_length": max_len,
        "sp_model_kwargs": {},
        # Plain-text role headers and eos per turn: ChatML's markers are no pieces of ours (see the module).
        "chat_template": CHAT_TEMPLATE,
    }
    return tokenizer_config, specials


def _write_json(path: Path, body: dict[str, Any]) -> None:
    # ASCII escapes, as transformers itself writes these files.
    write_json(path, body, ensure_ascii=True)


def run_package(checkpoint_dir: Path, tokenizer_model: Path, out_dir: Path, cfg: PackageConfig, provenance: dict[str, Any]) -> StageResult:
    """Write ``out_dir/model/`` (HF layout) from a checkpoint and its tokenizer."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    mcfg, meta = read_model_config(checkpoint_dir)
    target = out_dir / "model"
    if target.exists():
        raise ConfigError(
            f"{target} already exists; a package directory is never overwritten (it may already be signed)", "package into an empty output directory"
        )
    weights_path = checkpoint_dir / WEIGHTS
    if not weights_path.is_file():
        raise TrainingError(f"no {WEIGHTS} in {checkpoint_dir}", "point at the train stage's final/ directory")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    if sp.get_piece_size() > mcfg.vocab_size:
        raise TrainingError(
            f"tokenizer {tokenizer_model} has {sp.get_piece_size()} pieces but the model's vocabulary is {mcfg.vocab_size}",
            "package with the tokenizer the model was trained with",
        )
    bos_id, eos_id = int(meta.get("bos_id", sp.bos_id())), int(meta.get("eos_id", sp.eos_id()))

    tensors = load_file(str(weights_path))
    if mcfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # HF re-ties it from embed_tokens on load
    dtype = DTYPES[cfg.dtype]
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    n_params = sum(v.numel() for v in tensors.values())

    tmp = out_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    _write_json(tmp / "config.json", hf_config(mcfg, bos_id, eos_id, dtype=cfg.dtype))
    _write_json(
        tmp / "generation_config.json",
        {
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            # The evaluate stage's sampling defaults, so hub-style generate() behaves like our samples.
            "do_sample": True,
            "temperature": 0.8,
            "top_k": 50,
            "max_length": mcfg.max_seq_len,
        },
    )
    shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
    tokenizer_config, specials = _tokenizer_files(sp, mcfg.max_seq_len)
    _write_json(tmp / "tokenizer_config.json", tokenizer_config)
    _write_json(tmp / "special_tokens_map.json", specials)
    (tmp / "README.md").write_text(model_card(cfg, mcfg, n_params, provenance, sp.get_piece_size()), encoding="utf-8")
    publish_dir(tmp, target)

    files = sorted(p.name for p in target.iterdir())
    stats = {
        "parameters": n_params,
        "dtype": cfg.dtype,
        "files": files,
        "bytes": sum((target / f).stat().st_size for f in files),
    }
    return StageResult(outputs={"model": target}, stats=stats)
