"""The stage table: the stages of a run, in order, and how their outputs are wired.

Torch-free on purpose: the service reads it to drive and record runs; the functions each
stage calls live on the job side (`appliance.jobs.stage_job`), in the child process.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    # Earlier outputs (by name) this stage reads: they become its outputs' lineage parents.
    # "a|b": whichever of a and b the run has (the fine-tune's adapter or full model).
    parents: tuple[str, ...]
    # Artifact kind of each output; names that start with a key take its kind
    # (the trainer's "checkpoint_step_000100" is a "checkpoint").
    kinds: dict[str, str]

    def parent_names(self, present: object) -> list[str]:
        """The parents as outputs of this run (``present`` holds the run's output names); KeyError if one is missing."""
        names = []
        for parent in self.parents:
            found = [n for n in parent.split("|") if n in present]  # type: ignore[operator]
            if not found:
                raise KeyError(f"stage {self.name} reads '{parent}', which the run has not produced")
            names.extend(found)
        return names

    def kind_of(self, output: str) -> str:
        for prefix, kind in self.kinds.items():
            if output == prefix or output.startswith(prefix + "_"):
                return kind
        raise KeyError(f"stage {self.name} produced an undeclared output '{output}'")


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "ingest sources", (), {"raw": "raw-documents", "rejects": "ingest-rejects", "ingest_report": "ingest-report"}),
    Stage("curate", "clean, filter, redact, dedup", ("raw",), {"dataset": "dataset", "curation": "curation-report", "dropped": "dropped-samples"}),
    Stage("tokenizer", "train tokenizer", ("dataset",), {"tokenizer": "tokenizer", "vocab": "tokenizer-vocab"}),
    Stage("shard", "tokenize + shard", ("dataset", "tokenizer"), {"shards": "token-shards"}),
    Stage("card", "dataset card", ("ingest_report", "curation", "shards"), {"card": "dataset-card"}),
    Stage("train", "train", ("shards", "recipe"), {"checkpoint": "checkpoint", "logs": "training-logs"}),
    Stage("evaluate", "evaluate", ("checkpoint", "shards", "tokenizer"), {"report": "eval-report"}),
    Stage("package", "package + sign", ("checkpoint", "tokenizer", "report", "recipe"), {"model": "model"}),
)

# A recipe with [finetune] adapts a local base model instead: verify the base before any of its
# files is loaded, render the examples with its tokenizer, train the adapter.
FINETUNE_STAGES: tuple[Stage, ...] = (
    Stage("base", "verify base model", (), {"base": "base-model"}),
    Stage("examples", "render examples", ("base",), {"examples": "finetune-examples"}),
    # LoRA / QLoRA produce an adapter; method = "full" a whole fine-tuned model ("tuned").
    Stage("finetune", "fine-tune", ("base", "examples", "recipe"), {"adapter": "adapter", "tuned": "finetuned-model"}),
    Stage("ft_evaluate", "evaluate + promotion gate", ("adapter|tuned", "examples", "base"), {"report": "eval-report"}),
    Stage("ft_package", "package + sign", ("adapter|tuned", "report", "base", "recipe"), {"model": "model"}),
)

# Stages `appliance train --data RUN` takes from an earlier run: everything before training.
DATA_STAGES = ("ingest", "curate", "tokenizer", "shard", "card")
BY_NAME = {s.name: s for s in STAGES + FINETUNE_STAGES}


def stages_for(recipe: object) -> tuple[Stage, ...]:
    """The stages a recipe runs: pre-training's, or fine-tuning's when it has [finetune]."""
    return FINETUNE_STAGES if getattr(recipe, "finetune", None) is not None else STAGES
