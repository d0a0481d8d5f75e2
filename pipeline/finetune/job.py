"""The fine-tuning job: ``python -m pipeline.finetune.job SPEC.json``, alone or under torchrun.

The service launches it as it launches pre-training (``pipeline.training.job``): a child
process, or a torchrun tree for full fine-tuning on several processes or nodes, whose rank 0
appends events (``started``, ``metrics``, ``checkpoint`` …, ``finished`` / ``stopped`` /
``error``) to the spec's ``events`` file. The service records every checkpoint as it appears
and resumes only from one the ledger recorded. SIGTERM / SIGINT finish the step, save a
checkpoint and exit 0; a second signal exits at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import from_mapping
from pipeline.settings.finetune import FinetuneConfig
from pipeline.training.config import DistConfig, TrainConfig
from pipeline.training.job import Events, StopFlag, finish, run_job

MODULE = "pipeline.finetune.job"


@dataclass(kw_only=True)
class FinetuneJobSpec:
    # base.json of the run's base stage (the verified base's path and manifest) and its examples.
    base_json: str
    examples: str
    out_dir: str
    events: str
    finetune: FinetuneConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistConfig = field(default_factory=DistConfig)
    # The resolved DeepSpeed config (already validated by the service), or None.
    deepspeed: dict[str, Any] | None = None
    # A checkpoint the service verified against the ledger; None = let the trainer pick one.
    resume_from: str | None = None
    # Where the service marks each checkpoint it has recorded; retention deletes only those.
    records_dir: str | None = None


def read_spec(path: Path) -> FinetuneJobSpec:
    body = json.loads(Path(path).read_text(encoding="utf-8"))
    return from_mapping(FinetuneJobSpec, body, source=str(path))


def _train(spec: FinetuneJobSpec, stop: StopFlag, events: Events) -> dict[str, Any]:
    from pipeline.finetune.stages import train_finetune  # torch loads after the spec is known to be good

    return train_finetune(
        spec.finetune,
        spec.train,
        Path(spec.base_json),
        Path(spec.examples),
        Path(spec.out_dir),
        dist_cfg=spec.distributed,
        deepspeed_config=spec.deepspeed,
        resume_from=Path(spec.resume_from) if spec.resume_from else None,
        records_dir=Path(spec.records_dir) if spec.records_dir else None,
        on_event=events,
        should_stop=stop,
    )


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, module=MODULE, read=read_spec, train=_train)


if __name__ == "__main__":
    finish(main())
