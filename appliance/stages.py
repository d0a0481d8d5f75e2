"""The stage table: which pipeline function each stage calls, on which earlier outputs.

One skeleton (the service's ``_run_stage``) runs every stage; this table is the only
place that knows how a stage's inputs are wired, so stages are not copy-pasted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.recipe import Recipe
from appliance.training import StageContext, train_stage
from pipeline.card import run_card, write_ingest_report
from pipeline.curate import CurateSettings, run_curate
from pipeline.evaluate import run_evaluate
from pipeline.ingest import run_ingest
from pipeline.package import run_package
from pipeline.result import ProgressFn, StageResult
from pipeline.shard import run_shard
from pipeline.tokenizer import run_tokenizer

# run(recipe, artifact paths by output name, source dir, work dir, progress, what the service offers)
StageFn = Callable[[Recipe, dict[str, Path], Path, Path, ProgressFn, StageContext], StageResult]


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    # Earlier outputs (by name) this stage reads: they become its outputs' lineage parents.
    parents: tuple[str, ...]
    # Artifact kind of each output; names that start with a key take its kind
    # (the trainer's "checkpoint_step_000100" is a "checkpoint").
    kinds: dict[str, str]
    run: StageFn

    def kind_of(self, output: str) -> str:
        for prefix, kind in self.kinds.items():
            if output == prefix or output.startswith(prefix + "_"):
                return kind
        raise KeyError(f"stage {self.name} produced an undeclared output '{output}'")


def _ingest(r: Recipe, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, ctx: StageContext) -> StageResult:
    result = run_ingest(src, work, r.ingest, progress)
    # The figures and every skipped file as an artifact too: the dataset card is built from it.
    result.outputs["ingest_report"] = write_ingest_report(result, work)
    return result


def _curate(r: Recipe, a: dict[str, Path], src: Path, work: Path, progress: ProgressFn, ctx: StageContext) -> StageResult:
    return run_curate(a["raw"], work, CurateSettings(clean=r.clean, filters=r.filters, pii=r.pii, dedup=r.dedup), progress)


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "ingest sources", (), {"raw": "raw-documents", "rejects": "ingest-rejects", "ingest_report": "ingest-report"}, _ingest),
    Stage("curate", "clean, filter, redact, dedup", ("raw",), {"dataset": "dataset", "curation": "curation-report", "dropped": "dropped-samples"}, _curate),
    Stage(
        "tokenizer",
        "train tokenizer",
        ("dataset",),
        {"tokenizer": "tokenizer", "vocab": "tokenizer-vocab"},
        lambda r, a, src, work, p, ctx: run_tokenizer(a["dataset"], work, r.tokenizer, p),
    ),
    Stage(
        "shard",
        "tokenize + shard",
        ("dataset", "tokenizer"),
        {"shards": "token-shards"},
        lambda r, a, src, work, p, ctx: run_shard(a["dataset"], a["tokenizer"], work, r.shard, p),
    ),
    Stage(
        "card",
        "dataset card",
        ("ingest_report", "curation", "shards"),
        {"card": "dataset-card"},
        lambda r, a, src, work, p, ctx: run_card(a["ingest_report"], a["curation"], a["shards"], work),
    ),
    Stage(
        "train",
        "train",
        ("shards", "recipe"),
        {"checkpoint": "checkpoint", "logs": "training-logs"},
        lambda r, a, src, work, p, ctx: train_stage(r, a, work, p, ctx),
    ),
    Stage(
        "evaluate",
        "evaluate",
        ("checkpoint", "shards", "tokenizer"),
        {"report": "eval-report"},
        lambda r, a, src, work, p, ctx: run_evaluate(a["checkpoint"], a["shards"], a["tokenizer"], work, r.evaluate, p),
    ),
    Stage(
        "package",
        "package + sign",
        ("checkpoint", "tokenizer", "report", "recipe"),
        {"model": "model"},
        lambda r, a, src, work, p, ctx: run_package(a["checkpoint"], a["tokenizer"], work, r.package, ctx.provenance),
    ),
)
