"""How the service tells a person what a run is doing: a small protocol, two sinks."""

from __future__ import annotations

from typing import Any, Protocol


class Reporter(Protocol):
    def stage_started(self, stage: str, title: str) -> None: ...
    def progress(self, done: int, total: int, fields: dict[str, Any]) -> None: ...
    def stage_finished(self, stage: str, stats: dict[str, Any]) -> None: ...
    def stage_failed(self, stage: str, message: str) -> None: ...


class NullReporter:
    """Reports nothing (tests, library use)."""

    def stage_started(self, stage: str, title: str) -> None:
        pass

    def progress(self, done: int, total: int, fields: dict[str, Any]) -> None:
        pass

    def stage_finished(self, stage: str, stats: dict[str, Any]) -> None:
        pass

    def stage_failed(self, stage: str, message: str) -> None:
        pass


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class RichReporter:
    """A progress bar per stage on stderr (stdout stays free for --json output)."""

    # Figures worth a line when a stage finishes; the rest is in the ledger.
    SHOWN = (
        "files",
        "documents",
        "documents_out",
        "dropped_short",
        "dropped_duplicate",
        "vocab_size",
        "train_tokens",
        "val_tokens",
        "steps",
        "final_loss",
        "tokens_per_s",
        "val_loss",
        "perplexity",
        "parameters",
    )

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            # ETA from rich's moving average of the step rate: what an operator waiting on a
            # days-long training run wants to see.
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self._task: Any = None

    def stage_started(self, stage: str, title: str) -> None:
        if not self._progress.live.is_started:
            self._progress.start()
        self._task = self._progress.add_task(title, total=None, info="")

    def progress(self, done: int, total: int, fields: dict[str, Any]) -> None:
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        self._progress.update(self._task, completed=done, total=total or None, info=info)

    def stage_finished(self, stage: str, stats: dict[str, Any]) -> None:
        # Fill the bar: stages that report no total still finish at 100 %.
        done = self._progress.tasks[-1].total or self._progress.tasks[-1].completed or 1
        self._progress.update(self._task, completed=done, total=done)
        shown = "  ".join(f"{k}={_fmt(stats[k])}" for k in self.SHOWN if isinstance(stats.get(k), (int, float)))
        self._progress.update(self._task, info=shown)

    def stage_failed(self, stage: str, message: str) -> None:
        self._progress.update(self._task, info="[red]failed")

    def close(self) -> None:
        if self._progress.live.is_started:
            self._progress.stop()
