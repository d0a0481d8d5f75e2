"""A stage job: ``python -m appliance.jobs.stage_job SPEC.json`` runs one stage in a child process.

The service writes the spec (the stage, the recipe text, the paths of the earlier outputs it
reads, the source folder, the work folder, the events file) and follows the events this
job appends (`pipeline.events`): ``progress`` while it works, then one ``result`` with the
files it produced and its figures — or ``error``, or ``stopped`` after a SIGTERM. The
service, not the job, hashes, stores, signs and records what the job produced, so a job
cannot misreport its own output; a crash or an OOM here takes down this process only.

Also ``op = "generate"``: sample from a model directory the service has verified.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keys.errors import ApplianceError, appliance_cause
from pipeline.events import EventWriter
from pipeline.lifeline import die_with_parent
from pipeline.result import ProgressFn, StageResult

EXIT_ERROR = 2
EXIT_STOPPED = 130
# Progress events at most this often: the service only needs enough to move a bar.
PROGRESS_EVERY_S = 0.25

StageFn = Callable[[Any, dict[str, Path], Path, Path, ProgressFn, dict[str, Any]], StageResult]


def _ingest(r: Any, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, prov: dict[str, Any]) -> StageResult:
    from pipeline.card import write_ingest_report
    from pipeline.ingest import run_ingest

    result = run_ingest(src, work, r.ingest, progress)
    # The figures and every skipped file as an artifact too: the dataset card is built from it.
    result.outputs["ingest_report"] = write_ingest_report(result, work)
    return result


def _curate(r: Any, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, prov: dict[str, Any]) -> StageResult:
    from pipeline.curate import CurateSettings, run_curate

    return run_curate(a["raw"], work, CurateSettings(clean=r.clean, filters=r.filters, pii=r.pii, dedup=r.dedup), progress)


def _tokenizer(r: Any, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, prov: dict[str, Any]) -> StageResult:
    from pipeline.tokenizer import run_tokenizer

    return run_tokenizer(a["dataset"], work, r.tokenizer, progress)


def _shard(r: Any, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, prov: dict[str, Any]) -> StageResult:
    from pipeline.shard import run_shard

    return run_shard(a["dataset"], a["tokenizer"], work, r.shard, progress)


def _card(r: Any, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, prov: dict[str, Any]) -> StageResult:
    from pipeline.card import run_card

    return run_card(a["ingest_report"], a["curation"], a["shards"], work)


def _evaluate(r: Any, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, prov: dict[str, Any]) -> StageResult:
    from pipeline.evaluate import run_evaluate

    return run_evaluate(a["checkpoint"], a["shards"], a["tokenizer"], work, r.evaluate, progress)


def _package(r: Any, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, prov: dict[str, Any]) -> StageResult:
    from pipeline.package import run_package

    return run_package(a["checkpoint"], a["tokenizer"], work, r.package, prov)


def _ft_base(r: Any, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, prov: dict[str, Any]) -> StageResult:
    from pipeline.finetune.stages import run_base

    # A fine-tuning run's source is the recipe's folder (its data sets are named relative to it);
    # the service passes the keys it trusts, so its own packaged models are valid bases.
    base_path = Path(prov["base_path"]) if prov.get("base_path") else None
    return run_base(r.finetune, src, work, [Path(p) for p in prov.get("trusted_keys", [])], base_path, r.train.seq_len)


def _ft_examples(r: Any, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, prov: dict[str, Any]) -> StageResult:
    from pipeline.finetune.stages import run_examples

    return run_examples(r.finetune, src, a["base"], work, progress)


def _ft_evaluate(r: Any, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, prov: dict[str, Any]) -> StageResult:
    from pipeline.finetune.stages import run_ft_evaluate

    return run_ft_evaluate(r.finetune, r.train, src, a["base"], a["examples"], a.get("adapter") or a["tuned"], work)


def _ft_package(r: Any, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, prov: dict[str, Any]) -> StageResult:
    from pipeline.finetune.stages import run_ft_package

    return run_ft_package(r.finetune, a["base"], a.get("adapter") or a["tuned"], a["report"], work)


FUNCTIONS: dict[str, StageFn] = {
    "base": _ft_base,
    "ft_evaluate": _ft_evaluate,
    "ft_package": _ft_package,
    "examples": _ft_examples,
    "ingest": _ingest,
    "curate": _curate,
    "tokenizer": _tokenizer,
    "shard": _shard,
    "card": _card,
    "evaluate": _evaluate,
    "package": _package,
}


def _progress(emit: EventWriter) -> ProgressFn:
    last = [0.0]

    def progress(done: int, total: int, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or (total and done >= total):
            last[0] = now
            emit({"event": "progress", "done": int(done), "total": int(total or 0), "fields": fields})

    return progress


# The files each text- or token-holding output is written as (in the stage's out folder),
# temporaries included: each is sealed under its own artifact's data key.
SEALED_FILES = {
    "raw": ("raw.parquet",),
    "rejects": ("rejects.parquet",),
    "dataset": ("dataset.parquet",),
    "dropped": ("dropped.parquet",),
    "shards": ("shards", "shards.partial"),
    "examples": ("examples.parquet",),
}


def _seal_outputs(work: Path, seal: dict[str, str]) -> None:
    """Tell `keys.sealed.open_write` what to seal: each output under its key, the rest of the
    out folder (a stage's scratch files) under the stage's scratch key."""
    from keys import sealed

    if "*" in seal:
        sealed.seal_path(work, seal["*"])
    for name, key_id in seal.items():
        for rel in SEALED_FILES.get(name, ()):
            sealed.seal_path(work / rel, key_id)


# The stage's task journal (`pipeline.task_journal`), in its work dir: kept when the job is
# killed, stopped or fails, so a relaunch recomputes only unfinished batches; removed on success.
JOURNAL = "task-journal"


def _run_stage(spec: dict[str, Any], emit: EventWriter) -> None:
    from appliance.recipe import parse_recipe
    from pipeline.parallel import stage_tasks

    recipe = parse_recipe(spec["recipe_text"], source=spec["recipe_source"])
    fn = FUNCTIONS[spec["stage"]]
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    _seal_outputs(work, spec.get("seal") or {})
    artifacts = {k: Path(v) for k, v in spec["artifacts"].items()}
    with stage_tasks(cluster=recipe.cluster, journal=work / JOURNAL, inputs=list(artifacts.values())) as tasks:
        result = fn(recipe, artifacts, Path(spec["source"]), work, _progress(emit), spec.get("provenance") or {})
    if tasks.batches:
        emit({"event": "tasks", **tasks.as_dict()})
    emit(
        {
            "event": "result",
            "outputs": {k: str(v) for k, v in result.outputs.items()},
            "stats": result.stats,
            "metrics": result.metrics,
            "inputs": result.inputs,
            "skipped": result.skipped,
        }
    )


def _generate(spec: dict[str, Any], emit: EventWriter) -> None:
    from pipeline.generate import SampleConfig, generate_text, load_for_generation, resolve_device

    cfg = SampleConfig(**spec["sample"])
    tokenizer = Path(spec["tokenizer"]) if spec.get("tokenizer") else None
    model_dir = Path(spec["model_dir"])
    scratch = Path(spec["scratch"]) if spec.get("base_dir") else None
    try:
        if scratch is not None:
            # A LoRA adapter: folded into its base (both verified by the service) as packaging with
            # finetune.merge = true would, into scratch that is removed once the weights are loaded.
            from pipeline.finetune.lora import merge_and_export

            merge_and_export(Path(spec["base_dir"]), model_dir, scratch)
            model_dir = scratch
        bundle = load_for_generation(model_dir, tokenizer=tokenizer, device=resolve_device(spec.get("device", "auto")))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    start = time.perf_counter()
    results = generate_text(bundle, list(spec["prompts"]), cfg)
    emit(
        {
            "event": "generated",
            "kind": bundle.kind,
            "device": str(bundle.model.lm_head.weight.device),
            "seconds": time.perf_counter() - start,
            "results": [
                {"prompt": r.prompt, "text": r.text, "new_tokens": r.new_tokens, "prompt_tokens": r.prompt_tokens, "stopped_at_eos": r.stopped_at_eos}
                for r in results
            ],
        }
    )


def _stop(signum: int, frame: object) -> None:
    # A data stage has no checkpoint to write: stopping is unwinding, and the stage re-runs on resume.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m appliance.jobs.stage_job SPEC.json", file=sys.stderr)
        return EXIT_ERROR
    signal.signal(signal.SIGTERM, _stop)
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    emit = EventWriter(Path(spec["events"]))
    try:
        if spec.get("op") == "generate":
            _generate(spec, emit)
        else:
            _run_stage(spec, emit)
    except KeyboardInterrupt:
        emit({"event": "stopped"})
        return EXIT_STOPPED
    except ApplianceError as exc:
        emit({"event": "error", "message": exc.diagnostics(), "type": type(exc).__name__})
        return EXIT_ERROR
    except MemoryError:
        emit({"event": "error", "message": "the stage ran out of memory", "type": "MemoryError"})
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the job's last line of defence: report it, the traceback goes to the log
        import traceback

        traceback.print_exc()
        inner = appliance_cause(exc)  # ours, wrapped by a library (a refused download, say): it says the fix
        if inner is not None:
            emit({"event": "error", "message": inner.diagnostics(), "type": type(inner).__name__})
        else:
            emit({"event": "error", "message": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__})
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
