"""The stages of a fine-tuning run, each called in a job of the service: base, examples, finetune.

``base`` inspects and verifies the base model before any of its files is loaded, and reports
every file's digest as an input, so the ledger holds exactly what was adapted. ``examples``
renders the recipe's data sets with the base's own tokenizer into a Parquet file of token
ids and loss labels. ``finetune`` re-checks the base against what ``base`` recorded (it may
have changed on disk since), then trains the adapter with checkpoints a stop or a crash
resumes from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

from keys.digest import sha256_file
from keys.files import atomic_write_text
from keys.sealed import open_read, open_write
from pipeline.errors import ConfigError, DataError
from pipeline.result import ProgressFn, StageResult
from pipeline.settings.finetune import FinetuneConfig

BASE_RECORD = "base.json"
# Task answers shown in a run's summary (all of them are in the report).
SAMPLES = 5
EXAMPLES_FILE = "examples.parquet"


MODEL_REF = "model:"
# What fine-tuning imports (the `finetune` extra); bitsandbytes only for QLoRA, checked by its own probe.
LIBRARIES = ("transformers", "peft", "safetensors", "sacrebleu")


def require_libraries() -> None:
    """Refuse a fine-tuning run at its start, not in its third stage, when the extra is missing."""
    import importlib.util

    missing = [name for name in LIBRARIES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"fine-tuning needs {', '.join(missing)}, which this installation lacks",
            "install the fine-tuning extra: pip install -c constraints/cpu.txt -e '.[finetune]' (GPU sites: without the constraints file)",
        )


def run_base(fcfg: FinetuneConfig, recipe_dir: Path, work: Path, trusted_keys: list[Path], base_path: Path | None = None, seq_len: int = 0) -> StageResult:
    """Inspect and verify the base model; its manifest and the verdict become ``base.json``.

    ``base_path``: where the service found a ``model:DIGEST`` base in its store.
    """
    from pipeline.finetune.base_sig import import_base

    if fcfg.base.startswith(MODEL_REF):
        if base_path is None:
            raise DataError(f"finetune.base {fcfg.base} names a stored model, but no path was given for it", "report this: it is a bug in the appliance")
        fcfg = dataclasses.replace(fcfg, base=str(base_path))
    base, verdict = import_base(fcfg, recipe_dir, trusted_keys)
    context = base.shape.max_positions
    if seq_len > context:
        # Known only now that the base's config.json is read; refused before any weight is loaded.
        raise ConfigError(
            f"train.seq_len = {seq_len} is longer than the base model's context ({context} positions, {base.path}/config.json)",
            f"set train.seq_len = {context} or less in the recipe and start a new run",
        )
    work.mkdir(parents=True, exist_ok=True)
    record = {
        "path": str(base.path),
        "model_type": base.model_type,
        "architecture": base.architecture,
        "shape": dataclasses.asdict(base.shape),
        "parameters": base.parameters,
        "digest": base.digest,
        "manifest": base.manifest_dict(),
        "verification": verdict.record(),
    }
    out = work / BASE_RECORD
    atomic_write_text(out, json.dumps(record, indent=2, sort_keys=True) + "\n", mode=0o644)
    inputs = [
        {"path": f"base:{base.path.name}/{rel}", "sha256": entry["sha256"], "bytes": entry["size"], "kind": "base-model-file", "base_digest": base.digest}
        for rel, entry in sorted(base.manifest_dict().items())
    ]
    stats = {
        "base": str(base.path),
        "model_type": base.model_type,
        "parameters": base.parameters,
        "digest": base.digest,
        "files": len(inputs),
        "verification": verdict.method,
        "signer": verdict.signer,
        "unsigned_allowed": verdict.method == "unsigned-allowed",
    }
    return StageResult(outputs={"base": out}, stats=stats, inputs=inputs)


def _base_dir(base_json: Path) -> tuple[Path, dict[str, Any]]:
    record = json.loads(base_json.read_text(encoding="utf-8"))
    return Path(record["path"]), record


def _recheck_base(base_json: Path) -> Path:
    """The base directory, after proving it still holds the files the base stage recorded."""
    from pipeline.finetune.base import inspect_base

    path, record = _base_dir(base_json)
    now = inspect_base(path)
    if now.digest != record["digest"]:
        changed = sorted(set(now.manifest_dict().items()) ^ set((k, tuple(v.items())) for k, v in record["manifest"].items()))
        raise DataError(
            f"base model {path} changed since it was verified (digest {record['digest'][:16]}… then, {now.digest[:16]}… now)",
            "restore the base model's files, or start a new run so the new files are verified and recorded"
            + (f" ({len(changed)} differences)" if changed else ""),
        )
    return path


def _tokenizer(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir, local_files_only=True)


def run_examples(fcfg: FinetuneConfig, recipe_dir: Path, base_json: Path, work: Path, progress: ProgressFn) -> StageResult:
    """Render the data sets with the base's tokenizer into ``examples.parquet`` (train and val rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.finetune.examples import load_examples

    base_dir = _recheck_base(base_json)
    examples = load_examples(fcfg, _tokenizer(base_dir), recipe_dir)
    progress(1, 1, {"train": len(examples.train), "val": len(examples.val)})
    rows = [("train", e) for e in examples.train] + [("val", e) for e in examples.val]
    table = pa.table(
        {
            "split": pa.array([s for s, _ in rows], pa.string()),
            "input_ids": pa.array([e.input_ids for _, e in rows], pa.list_(pa.int32())),
            "labels": pa.array([e.labels for _, e in rows], pa.list_(pa.int32())),
            "file": pa.array([e.file for _, e in rows], pa.string()),
            "line": pa.array([e.line for _, e in rows], pa.int64()),
        }
    )
    work.mkdir(parents=True, exist_ok=True)
    out = work / EXAMPLES_FILE
    with open_write(out) as f:  # sealed when the job was told to seal its examples
        pq.write_table(table, f)
    inputs = []
    for ds in fcfg.datasets:
        path = (recipe_dir / ds.path).resolve()
        inputs.append({"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size, "format": ds.format, "split": ds.split})
    stats = {
        "read": examples.read,
        "train_examples": len(examples.train),
        "val_examples": len(examples.val),
        "train_tokens": sum(len(e.input_ids) for e in examples.train),
        "trained_tokens": sum(sum(1 for x in e.labels if x != -100) for e in examples.train),
        "skipped": len(examples.skips),
    }
    return StageResult(outputs={"examples": out}, stats=stats, inputs=inputs, skipped=[s.as_dict() for s in examples.skips])


def read_examples(path: Path, split: str) -> list[Any]:
    import pyarrow.parquet as pq

    from pipeline.finetune.render import Example

    with open_read(path) as f:  # plain or sealed
        table = pq.read_table(f).to_pylist()
    return [Example(input_ids=r["input_ids"], labels=r["labels"], file=r["file"], line=r["line"]) for r in table if r["split"] == split]


def _batches(windows: list[Any], cfg: Any, pad_id: int, dtype: Any, rank: int = 0, world: int = 1) -> Any:
    """``batches(step, micro)`` of rank ``rank`` of ``world``: a pure function of its arguments, so resume is exact.

    Epochs are seeded permutations of the windows; micro-batch (step, micro) of a rank takes the
    next ``batch_size`` windows of the stream they form, the ranks of a step taking consecutive
    slices (so one process with ``grad_accum`` × world sees what world ranks see together).
    """
    from pipeline.finetune.packing import collate

    n = len(windows)
    orders: dict[int, list[int]] = {}

    def order(epoch: int) -> list[int]:
        if epoch not in orders:
            idx = list(range(n))
            random.Random(f"{cfg.seed}:{epoch}").shuffle(idx)
            orders[epoch] = idx
        return orders[epoch]

    def batches(step: int, micro: int) -> dict[str, Any]:
        start = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
        picked = [windows[order(i // n)[i % n]] for i in range(start, start + cfg.batch_size)]
        return collate(picked, pad_id, dtype=dtype)

    return batches


def train_finetune(
    fcfg: FinetuneConfig,
    tcfg: Any,
    base_json: Path,
    examples: Path,
    work: Path,
    *,
    dist_cfg: Any = None,
    deepspeed_config: dict[str, Any] | None = None,
    resume_from: Path | None = None,
    records_dir: Path | None = None,
    on_event: Any = None,
    should_stop: Any = None,
) -> dict[str, Any]:
    """Train (or resume) the fine-tune in ``work`` on this process; under torchrun, as one rank of many.

    What ``pipeline.finetune.job`` runs: the base is re-verified, the training examples packed
    into windows, and ``train.train_adapter`` steps the method's train state (adapters on one
    process; every weight on the engine ``dist_cfg`` names). Returns the trainer's stats plus
    the packing counts; ``stats["adapter"]`` is the exported result of a completed run.
    """
    import torch

    from pipeline.finetune.packing import build_windows, pad_id_of
    from pipeline.finetune.spec import build_spec
    from pipeline.finetune.train import base_dtype, resolve_device, train_adapter
    from pipeline.training import dist
    from pipeline.training.config import DistConfig
    from pipeline.training.loop import backend_for

    dist_cfg = dist_cfg or DistConfig()
    # Under torchrun each rank takes its own GPU; alone, the current one.
    device = resolve_device(tcfg, dist.from_env().local_rank if "RANK" in os.environ else None)
    ctx = dist.init(backend_for(dist_cfg, device), dist_cfg.timeout_s)
    try:
        base_dir = _recheck_base(base_json) if ctx.local_rank == 0 else _base_dir(base_json)[0]
        dist.barrier(ctx)
        train = read_examples(examples, "train")
        packed = build_windows(train, tcfg.seq_len, fcfg.packing)
        if not packed.windows:
            raise DataError(f"no training example of {examples} fits train.seq_len = {tcfg.seq_len}", "raise train.seq_len or check [finetune] datasets")
        # Full fine-tuning keeps float32 master weights (bf16 compute comes from the engine).
        dtype = "float32" if fcfg.method == "full" else base_dtype(tcfg, device)
        spec = build_spec(fcfg, base_dir, dtype=dtype)
        batches = _batches(packed.windows, tcfg, pad_id_of(_tokenizer(base_dir)), getattr(torch, dtype), ctx.rank, ctx.world)
        stats = train_adapter(
            spec,
            batches,
            tcfg,
            work,
            resume_from=resume_from,
            on_event=on_event,
            should_stop=should_stop,
            records_dir=records_dir,
            device=device,
            method=fcfg.method,
            dist_cfg=dist_cfg,
            ctx=ctx,
            deepspeed_config=deepspeed_config,
            extra_stats={"windows": len(packed.windows), "truncated": packed.truncated, "dropped": packed.dropped, "method": fcfg.method},
        )
    finally:
        dist.shutdown(ctx)
    return stats


def _is_adapter(tuned: Path) -> bool:
    """A peft adapter directory (LoRA, QLoRA), else a whole fine-tuned model (full)."""
    return (tuned / "adapter_config.json").is_file()


def _tuned_model(base_dir: Path, tuned: Path, tcfg: Any) -> Any:
    """Base + adapter for evaluation: the base in full precision (a QLoRA adapter is scored on
    the dequantised base, as it is merged and as it ships); or the fully fine-tuned model."""
    from transformers import AutoModelForCausalLM

    from pipeline.finetune.train import resolve_device

    device = resolve_device(tcfg)
    if not _is_adapter(tuned):
        return AutoModelForCausalLM.from_pretrained(tuned, local_files_only=True).to(device)
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True).to(device)
    return PeftModel.from_pretrained(model, tuned).to(device)


def run_ft_evaluate(fcfg: FinetuneConfig, tcfg: Any, recipe_dir: Path, base_json: Path, examples: Path, adapter: Path, work: Path) -> StageResult:
    """Validation loss and perplexity, task scores base vs tuned, and the promotion gate's verdict."""
    from pipeline.finetune.evaluate import Prompter, compare_on_tasks, gate_verdict, load_tasks, validation_loss
    from pipeline.finetune.packing import build_windows, pad_id_of
    from pipeline.finetune.report import write_report

    base_dir = _recheck_base(base_json)
    tokenizer = _tokenizer(base_dir)
    model = _tuned_model(base_dir, adapter, tcfg)
    windows = build_windows(read_examples(examples, "val"), tcfg.seq_len, fcfg.packing).windows
    val = validation_loss(model, windows, pad_id_of(tokenizer), batch_size=tcfg.batch_size)
    comparison = None
    if fcfg.gate.task_file:
        tasks = load_tasks((recipe_dir / fcfg.gate.task_file).resolve(), label=f"finetune.gate.task_file {fcfg.gate.task_file}")
        base = None
        if not _is_adapter(adapter):  # a full fine-tune: the base is a model of its own
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True).to(next(model.parameters()).device)
        comparison = compare_on_tasks(model, Prompter(tokenizer, fcfg), tasks, max_new_tokens=fcfg.gate.max_new_tokens, base=base)
    verdict = gate_verdict(comparison.tuned if comparison else None, val, fcfg.gate)
    out = work / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, val=val, verdict=verdict, comparison=comparison, extra={"method": fcfg.method, "base": str(base_dir)})
    stats: dict[str, Any] = {"val_loss": val["loss"], "perplexity": val["perplexity"], "val_tokens": val["tokens"], **verdict.as_dict()}
    if comparison is not None:
        stats["base_scores"] = dataclasses.asdict(comparison.base)
        stats["tuned_scores"] = dataclasses.asdict(comparison.tuned)
        # A few answers side by side for the run's summary; report.json holds them all.
        stats["samples"] = [{"prompt": r.prompt, "reference": r.reference, "base": r.base, "tuned": r.tuned} for r in comparison.rows[:SAMPLES]]
    return StageResult(outputs={"report": out}, stats=stats)


def run_ft_package(fcfg: FinetuneConfig, base_json: Path, adapter: Path, report: Path, work: Path) -> StageResult:
    """The promoted model, ready to sign: the adapter with a model card, or (``merge``) the merged model.

    A model below the gate's thresholds is not packaged: the stage records why and outputs nothing.
    """
    import shutil

    from pipeline.finetune.lora import merge_and_export

    verdict = json.loads((report / "report.json").read_text(encoding="utf-8")).get("verdict", {})
    if not verdict.get("promoted"):
        return StageResult(outputs={}, stats={"promoted": False, "reasons": verdict.get("reasons", []), "packaged": False})
    base_dir, record = _base_dir(base_json)
    out = work / "model"
    if out.exists():
        shutil.rmtree(out)
    full = not _is_adapter(adapter)
    if fcfg.merge and not full:
        merge_and_export(_recheck_base(base_json), adapter, out)
    else:
        shutil.copytree(adapter, out, ignore=shutil.ignore_patterns("model.sig"))
    what = "full fine-tune" if full else "merged model" if fcfg.merge else "LoRA adapter"
    method = "full (every weight)" if full else f"{fcfg.method}, r {fcfg.lora_r}, alpha {fcfg.lora_alpha}, targets {', '.join(fcfg.target_modules)}"
    load = (
        "Load it with `transformers.AutoModelForCausalLM.from_pretrained(this_directory)`"
        if full or fcfg.merge
        else "Load the adapter with `peft.PeftModel.from_pretrained(base, this_directory)`"
    )
    card = [
        f"# {out.name}: {what} of {base_dir.name}",
        "",
        f"- base: `{base_dir}` (manifest digest `{record['digest']}`, {record['verification']['method']})",
        f"- method: {method}",
        f"- gate: {verdict.get('status', 'promoted')}",
        "",
        f"{load}; verify it with `model_signing verify key DIR --public_key node.pub.pem --signature DIR/model.sig`.",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(card) + "\n", encoding="utf-8")
    return StageResult(outputs={"model": out}, stats={"promoted": True, "packaged": True, "merged": fcfg.merge and not full, "full": full})
