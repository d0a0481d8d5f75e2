"""Evaluation: validation loss and perplexity on the held-out split, plus seeded samples.

The loss is measured over consecutive, non-overlapping windows from the start of the val
split, so two evaluations of the same checkpoint on the same shards give the same number,
and every val token is predicted at most once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from pipeline.errors import ConfigError, DataError, TrainingError
from pipeline.generate import GenerationModel, SampleConfig, generate_text
from pipeline.model import LlamaModel, load_checkpoint
from pipeline.result import ProgressFn, StageResult, no_progress

# The [evaluate] table lives in a torch-free module, so a recipe loads without torch; its names stay importable from here.
from pipeline.settings.evaluate import DEFAULT_PROMPTS, EvalConfig  # noqa: F401
from pipeline.shard_format import open_shards, require_val_tokens

REPORT = "eval_report.json"


@torch.no_grad()
def windows_loss(
    model: LlamaModel,
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: ProgressFn = no_progress,
) -> tuple[float, int]:
    """(mean cross-entropy per predicted token, number of predicted tokens) over non-overlapping windows."""
    n_windows = min((len(tokens) - 1) // seq_len, max_batches * batch_size)
    if n_windows < 1:
        raise DataError(
            f"the val split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}", "lower the evaluation seq_len or shard more validation text"
        )
    model.eval()
    total, count = 0.0, 0
    n_batches = math.ceil(n_windows / batch_size)
    for b in range(n_batches):
        starts = range(b * batch_size * seq_len, min(n_windows, (b + 1) * batch_size) * seq_len, seq_len)
        w = torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])).to(device)
        with autocast():
            _, loss = model(w[:, :-1], w[:, 1:])
        n = w.shape[0] * seq_len
        total += loss.item() * n  # weighted, so a short last batch counts by its tokens
        count += n
        progress(b + 1, n_batches, {"val_loss": total / count})
    return total / count, count


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("evaluate.device is 'cuda' but no CUDA device is available", 'set evaluate.device = "auto" or "cpu"')
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def _samples(bundle: GenerationModel, cfg: EvalConfig) -> list[dict[str, str]]:
    # The sampler of `appliance generate`, so a report's samples read as that command would print them.
    sample = SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed)
    return [{"prompt": g.prompt, "completion": g.text} for g in generate_text(bundle, cfg.prompts, sample)]


def run_evaluate(
    checkpoint_dir: Path,
    shards_dir: Path,
    tokenizer_model: Path,
    out_dir: Path,
    cfg: EvalConfig,
    progress: ProgressFn = no_progress,
) -> StageResult:
    """Validation loss/perplexity and samples of a checkpoint; writes ``out_dir/eval_report.json``."""
    device = _device(cfg.device)
    model, meta = load_checkpoint(Path(checkpoint_dir), device)
    shards = open_shards(shards_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    if sp.get_piece_size() != shards.vocab_size:
        raise TrainingError(
            f"tokenizer {tokenizer_model} has {sp.get_piece_size()} pieces but the shard set {shards_dir} was made with {shards.vocab_size}",
            "evaluate with the tokenizer the shards were made with",
        )
    if model.cfg.vocab_size < shards.vocab_size:
        raise TrainingError(
            f"checkpoint {checkpoint_dir} has a vocabulary of {model.cfg.vocab_size}, smaller than the shard set's {shards.vocab_size}",
            "evaluate on the shard set the model was trained on",
        )
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"evaluate.seq_len ({seq_len}) exceeds the model's max_seq_len ({model.cfg.max_seq_len})", "lower evaluate.seq_len or set it to 0")
    # Before any window is built: an empty val split is the recipe's doing, not a damaged shard set.
    source = "evaluate.seq_len" if cfg.seq_len else "model.max_seq_len"
    require_val_tokens(shards.root, shards.manifest, seq_len=seq_len, source=source, knob="evaluate.seq_len (0 uses model.max_seq_len)")
    use_bf16 = device.type == "cuda"  # as in training: bf16 autocast on CUDA only
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    val_loss, val_tokens = windows_loss(
        model,
        shards.tokens("val"),
        seq_len=seq_len,
        batch_size=cfg.batch_size,
        max_batches=cfg.max_batches,
        device=device,
        autocast=autocast,
        progress=progress,
    )
    bos_id, eos_id = int(meta.get("bos_id", shards.bos_id)), int(meta.get("eos_id", shards.eos_id))
    bundle = GenerationModel(
        model=model, tokenizer=sp, bos_id=bos_id, eos_id=eos_id, path=Path(checkpoint_dir), kind="checkpoint", tokenizer_path=Path(tokenizer_model)
    )
    samples = _samples(bundle, cfg)
    stats = {
        "val_loss": val_loss,
        # exp of a huge loss overflows; None (not inf) keeps the report strict JSON for the ledger.
        "perplexity": math.exp(val_loss) if val_loss < 700 else None,
        "val_tokens": val_tokens,
        "seq_len": seq_len,
        "samples": samples,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / REPORT
    body = {"checkpoint": str(checkpoint_dir), "shards": str(shards_dir), "config": dataclasses.asdict(cfg), **stats}
    report.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return StageResult(outputs={"report": report}, stats=stats, metrics=[{"step": 0, "name": "val_loss", "value": val_loss}])
