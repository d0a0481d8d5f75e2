"""How a run reads in the Runs tab: times, durations, status colours, its summary and its metric charts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.text import Text
from textual_plotext import PlotextPlot

ACTIVE = ("running", "queued")  # may still change: the list is polled, the run's events followed
STATUS_STYLE = {
    "succeeded": "green",
    "finished": "green",
    "reused": "cyan",
    "failed": "red",
    "running": "yellow",
    "queued": "yellow",
    "stopped": "magenta",
    "interrupted": "magenta",
}
# (tab id, title, series drawn): loss and val_loss share a chart, they are read together.
CHARTS = (
    ("loss", "loss", ("loss", "val_loss")),
    ("lr", "lr", ("lr",)),
    ("grad_norm", "grad norm", ("grad_norm",)),
    ("tokens_per_s", "tokens/s", ("tokens_per_s",)),
)


def when(ts: str | None) -> str:
    """A ledger time as the table shows it: date and time to the second, UTC."""
    return (ts or "")[:19].replace("T", " ")


def seconds_between(a: str | None, b: str | None) -> float | None:
    if not a or not b:
        return None
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def took(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def stage_times(started_ts: str | None, rows: list[list[Any]], began: dict[str, str] | None = None) -> dict[str, tuple[str, float | None]]:
    """(end time, seconds) per stage from rows (stage, status, seq, ts) in ledger order. The
    ledger records when a stage ended, not when it began: ``began`` (run.show's ``stage_began``:
    the end of the stage before, or the run's start or resume, whichever came last) says when;
    without it a stage is taken to begin when the one before it ended."""
    out: dict[str, tuple[str, float | None]] = {}
    previous = started_ts
    for stage, _status, _seq, ts in rows:
        start = (began or {}).get(str(stage), previous)
        out[str(stage)] = (str(ts), seconds_between(start, str(ts)))
        previous = str(ts)
    return out


def styled(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status.split(" ", 1)[0], ""))


def run_summary(detail: dict[str, Any], live: tuple[str, str] | None) -> Text:
    """The selected run in a few lines: id, recipe, status, who started it, when, how long; what runs now; its error."""
    status = detail.get("status", "")
    start, end = when(detail.get("started_ts")), when(detail.get("finished_ts"))
    total = seconds_between(detail.get("started_ts"), detail.get("finished_ts"))
    # The end's date only when it differs from the start's.
    end_shown = end[11:] if end[:10] == start[:10] else end
    text = Text.assemble((str(detail.get("run_id")), "bold"), "  recipe ", (str(detail.get("recipe_name")), "bold"), "\nstatus ", styled(status))
    text.append(f"   started by {detail.get('actor')}\n{start} → {end_shown or 'still going'}")
    if total is not None:
        text.append(f"   took {took(total)}")
    if live and status in ACTIVE:
        text.append(f"\nnow: {live[0]} {live[1]}", style="yellow")
    if detail.get("error"):
        text.append(f"\n{detail['error']}", style="red")
    return text


def draw_chart(widget: PlotextPlot, chart: str, metrics: dict[str, Any], run_id: str) -> dict[str, int]:
    """Draw the chart ``chart`` (a key of CHARTS) of ``metrics`` (``run.metrics``); returns the points drawn per series."""
    plot = widget.plt
    plot.clear_data()
    plot.clear_figure()
    _, title, names = next(c for c in CHARTS if c[0] == chart)
    series = metrics.get("series", {})
    plotted: dict[str, int] = {}
    for name in names:
        points = series.get(name) or []
        if points:
            plot.plot([p[0] for p in points], [p[1] for p in points], label=name, marker="hd")
            plotted[name] = len(points)
    # Short: plotext drops a title wider than the plot.
    plot.title(f"{title} · {run_id}" if plotted else f"{title}: no points recorded (yet)")
    plot.xlabel("step")
    widget.refresh()
    return plotted
