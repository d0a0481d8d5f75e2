"""The training job: ``python -m pipeline.training.job SPEC.json``, alone or under torchrun.

The service writes a job spec (shards, output directory, model/train/distributed tables,
optional DeepSpeed config, an explicit checkpoint to resume from) and starts this module as a
child process. Rank 0 appends one JSON object per line to the spec's ``events`` file:
``started``, ``metrics``, ``checkpoint`` (with every rank's file digests), ``checkpoint_pruned``,
``checkpoint_rejected``, ``resumed``, ``finished``, ``stopped`` or ``error``. A file rather than
stdout, because under torchrun on several nodes only a shared file reaches the head node
intact. Every rank that fails also writes ``errors/rank_N.json``, so the service can say
which rank died and why.

SIGTERM and SIGINT ask the loop to stop: it finishes the current step, saves a checkpoint
and exits 0 with a ``stopped`` event. A second signal exits at once.

The job dies with its parent (``pipeline.lifeline``): a trainer whose service is gone would go
on writing and pruning checkpoints that nobody records. With ``records_dir`` in the spec,
retention deletes only checkpoints the service has marked as recorded (see ``ckpt_files``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keys.errors import ApplianceError, appliance_cause
from pipeline.config import from_mapping
from pipeline.lifeline import ENV_PARENT, die_with_parent
from pipeline.model import ModelConfig
from pipeline.training.config import DistConfig, TrainConfig

ERRORS_DIR = "errors"
EXIT_ERROR = 2


@dataclass(kw_only=True)
class JobSpec:
    shards: str
    out_dir: str
    events: str
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistConfig = field(default_factory=DistConfig)
    # The resolved DeepSpeed config (already validated by the service), or None.
    deepspeed: dict[str, Any] | None = None
    # A checkpoint the service verified against the ledger; None = let the loop pick one.
    resume_from: str | None = None
    # Stop (with a checkpoint) after this step; for tests and staged runs.
    stop_at_step: int | None = None
    # Where the service marks each checkpoint it has recorded (``ckpt_files.mark_recorded``);
    # retention then deletes only marked ones. None: no service watches, retention as configured.
    records_dir: str | None = None


def read_spec(path: Path) -> JobSpec:
    body = json.loads(Path(path).read_text(encoding="utf-8"))
    return from_mapping(JobSpec, body, source=str(path))


class Events:
    """Rank 0's event stream: append, flush, one JSON object per line."""

    def __init__(self, path: Path, rank: int) -> None:
        self.path, self.rank = Path(path), rank

    def __call__(self, event: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, default=str) + "\n")
            f.flush()


class StopFlag:
    """Set by SIGTERM/SIGINT; a second signal restores the default handler and re-raises it."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None


def _write_error(out_dir: Path, rank: int, message: str, detail: str) -> None:
    errors = out_dir / ERRORS_DIR
    errors.mkdir(parents=True, exist_ok=True)
    (errors / f"rank_{rank:05d}.json").write_text(json.dumps({"rank": rank, "pid": os.getpid(), "message": message, "detail": detail}) + "\n", encoding="utf-8")


def _lost_peer(exc: BaseException) -> bool:
    import torch.distributed as dist

    backend_error = getattr(dist, "DistBackendError", ())
    text = str(exc)
    return isinstance(exc, backend_error) or any(s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "timed out"))


def _follow_parent() -> None:
    """Die with the process that started this one: the service, or torchrun for a rank."""
    if "TORCHELASTIC_RUN_ID" in os.environ and ENV_PARENT in os.environ:
        # A rank's parent is torchrun, not the service the inherited variable names.
        die_with_parent(expected_parent=os.getppid())
    else:
        die_with_parent()


def run_job(argv: list[str] | None, *, module: str, read: Callable[[Path], Any], train: Callable[[Any, StopFlag, Events], dict[str, Any]]) -> int:
    """The job process around a trainer: spec, stop flag, events, and every failure reported.

    ``read(path)`` parses the spec (which has ``out_dir`` and ``events``); ``train(spec, stop,
    events)`` trains and returns its stats (``completed``, ``steps``). Shared by pre-training
    (this module) and fine-tuning (``pipeline.finetune.job``).
    """
    _follow_parent()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {module} SPEC.json", file=sys.stderr)
        return EXIT_ERROR
    rank = int(os.environ.get("RANK", "0"))
    stop = StopFlag()
    stop.install()
    spec_path = Path(args[0])
    try:
        spec = read(spec_path)
    except (OSError, ValueError, ApplianceError) as exc:
        print(f"cannot read job spec {spec_path}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    events = Events(Path(spec.events), rank)
    out_dir = Path(spec.out_dir)
    try:
        stats = train(spec, stop, events)
    except ApplianceError as exc:
        _write_error(out_dir, rank, exc.diagnostics(), traceback.format_exc())
        events({"event": "error", "rank": rank, "message": exc.diagnostics()})
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the job's last line of defence: report, never hang silently
        inner = appliance_cause(exc)  # ours, wrapped by a library (a refused download, say): it says the fix
        message = inner.diagnostics() if inner is not None else f"{type(exc).__name__}: {exc}"
        if _lost_peer(exc):
            detail = str(exc).splitlines()[0].split(". This is typically")[0]
            message = f"lost contact with another rank (it died or hung): {detail[-160:]}"
        _write_error(out_dir, rank, message, traceback.format_exc())
        events({"event": "error", "rank": rank, "message": message})
        print(traceback.format_exc(), file=sys.stderr)
        return EXIT_ERROR
    if stop() and not stats.get("completed"):
        events({"event": "stopped", "signal": signal.Signals(stop.signal).name if stop.signal else None, "step": stats.get("steps")})
    return 0


def _pretrain(spec: JobSpec, stop: StopFlag, events: Events) -> dict[str, Any]:
    from pipeline.training.loop import run_train  # torch loads after the spec is known to be good

    result = run_train(
        Path(spec.shards),
        Path(spec.out_dir),
        spec.model,
        spec.train,
        dist_cfg=spec.distributed,
        deepspeed_config=spec.deepspeed,
        resume_from=Path(spec.resume_from) if spec.resume_from else None,
        stop_at_step=spec.stop_at_step,
        should_stop=stop,
        on_event=events,
        records_dir=Path(spec.records_dir) if spec.records_dir else None,
    )
    return result.stats


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, module="pipeline.training.job", read=read_spec, train=_pretrain)


def finish(code: int) -> None:
    """Exit the job process: a torchrun worker without C++ exit-time destructors (see dist.exit_process)."""
    if "RANK" in os.environ:
        from pipeline.training.dist import exit_process

        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    finish(main())
