"""Runs: every run, one run's stages, timings, log tail and metrics; start, cancel and resume runs.

Everything goes through the service (``run.list``, ``run.show``, ``run.metrics``, ``run.log``,
``run.events``, ``run.start``, ``run.cancel``, ``run.resume``) except one thing: a recipe the
operator wants to start is checked here first, as `appliance recipe check` does, so every
problem of the file shows in the start dialog at once instead of one at a time from the service.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, Log, Static, Tab, Tabs
from textual_plotext import PlotextPlot

from appliance.console.base import Gated, Loaded, ServicePane, Streamed
from keys.errors import ApplianceError

POLL_S = 2.0  # how often the list is re-read while a run is queued or running (and only then)
LOG_LINES = 200
ACTIVE = ("running", "queued")
CANCELLABLE = ACTIVE
RESUMABLE = ("failed", "stopped", "interrupted")
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
# A run id as the service makes them (`new_run_id`): the only text put into the timings query.


# -- the recipe check, without the UI (the start dialog runs it in a worker) --------------------


@dataclass
class RecipeCheck:
    """What checking a recipe file found: its absolute path, the corpus folder, every problem."""

    recipe: str
    source: str | None
    problems: list[str] = field(default_factory=list)
    summary: str = ""


def check_recipe(recipe: str, source: str | None = None) -> RecipeCheck:
    """Check ``recipe`` as `appliance recipe check` does (every table, across tables, against this
    machine) and that its corpus folder exists; every problem is collected, none raised."""
    from appliance.recipe import load_recipe
    from appliance.recipe_checks import Machine, recipe_summary, summary_text
    from pipeline.errors import ConfigError

    # The service reads the file by its path, from its own working folder: send it absolute.
    path = Path(recipe).expanduser().resolve()
    folder = str(Path(source).expanduser().resolve()) if source else None
    out = RecipeCheck(recipe=str(path), source=folder)
    machine = Machine.here()
    try:
        loaded = load_recipe(path, machine=machine, read_base=True)
    except ConfigError as exc:
        out.problems = [p.line() for p in exc.problems] or [f"{exc.message}; {exc.hint}" if exc.hint else exc.message]
        return out
    if loaded.recipe.finetune is None:
        try:
            out.source = str(loaded.source_dir(Path(folder) if folder else None))
        except ConfigError as exc:
            out.problems.append(f"{exc.message}; {exc.hint}".replace("--source", "the source folder"))
    try:
        out.summary = summary_text(recipe_summary(loaded.recipe, machine, loaded.path.parent))
    except ApplianceError as exc:
        out.problems.append(f"{exc.message}; {exc.hint}")
    return out


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


def stage_times(started_ts: str | None, rows: list[list[Any]]) -> dict[str, tuple[str, float | None]]:
    """(end time, seconds) per stage from the ``stages`` view's rows (stage, status, seq, ts), in
    ledger order. The ledger records when a stage ended, not when it began: a stage is taken to
    begin when the one before it ended (the run's start for the first), which counts a resumed
    run's wait in its first stage after the resume."""
    out: dict[str, tuple[str, float | None]] = {}
    previous = started_ts
    for stage, _status, _seq, ts in rows:
        out[str(stage)] = (str(ts), seconds_between(previous, str(ts)))
        previous = str(ts)
    return out


def styled(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status.split(" ", 1)[0], ""))


# -- dialogs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartRequest:
    recipe: str
    source: str | None


class StartRunScreen(ModalScreen["StartRequest | None"]):
    """Start a run: the recipe file and an optional corpus folder, checked before anything starts."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape", "dismiss_none", "Close", id="runs.start.close"),
    ]
    DEFAULT_CSS = """
    StartRunScreen { align: center middle; }
    StartRunScreen #start-box { width: 96; height: auto; max-height: 90%; border: round $accent; background: $panel; padding: 0 1; }
    StartRunScreen Input { margin: 0 0 1 0; }
    StartRunScreen #start-problems { height: auto; max-height: 16; overflow-y: auto; }
    StartRunScreen #start-problems.bad { color: $error; }
    StartRunScreen #start-buttons { height: 3; align-horizontal: right; }
    StartRunScreen #start-buttons Button { margin-left: 1; }
    """

    class Checked(Message):
        def __init__(self, check: RecipeCheck, start: bool) -> None:
            super().__init__()
            self.check, self.start = check, start

    def __init__(self, recipe: str = "", source: str = "") -> None:
        super().__init__()
        self._recipe, self._source = recipe, source
        self.last: RecipeCheck | None = None  # the last check shown (tests read it)

    def compose(self) -> ComposeResult:
        with Vertical(id="start-box"):
            yield Label("Start a run", classes="title")
            yield Label("Recipe file (a path on the appliance: the service reads it)")
            yield Input(self._recipe, placeholder="/path/to/recipe.toml", id="start-recipe")
            yield Label("Corpus folder (optional: else the recipe's \\[recipe] source, relative to the recipe)")
            yield Input(self._source, placeholder="/path/to/corpus", id="start-source")
            yield Static("Check shows every problem of the recipe at once; Start checks first and starts only a clean recipe.", id="start-problems")
            with Horizontal(id="start-buttons"):
                yield Button("Check", id="start-check")
                yield Button("Start", id="start-go", variant="primary")
                yield Button("Close", id="start-close")

    def on_mount(self) -> None:
        self.query_one("#start-recipe", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._check(start=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "start-close":
            self.dismiss(None)
        else:
            self._check(start=event.button.id == "start-go")

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    def _check(self, *, start: bool) -> None:
        recipe = self.query_one("#start-recipe", Input).value.strip()
        if not recipe:
            self._show(["no recipe file given; type the path of a recipe TOML file"], bad=True)
            return
        self._show(["checking the recipe…"], bad=False)
        self._run_check(recipe, self.query_one("#start-source", Input).value.strip() or None, start)

    @work(thread=True, exclusive=True, exit_on_error=False, group="recipe-check")
    def _run_check(self, recipe: str, source: str | None, start: bool) -> None:
        # Reading the file and asking nvidia-smi about this machine's GPUs may take a moment.
        try:
            check = check_recipe(recipe, source)
        except Exception as exc:  # every error is shown by the one handler, with its fix
            self.app.call_from_thread(self.app.report, exc)  # type: ignore[attr-defined]
            return
        self.post_message(self.Checked(check, start))

    def on_start_run_screen_checked(self, message: StartRunScreen.Checked) -> None:
        check = self.last = message.check
        if check.problems:
            count = f"{len(check.problems)} problem{'s' if len(check.problems) > 1 else ''}"
            self._show([f"{check.recipe}: {count}, nothing started:", *[f"  • {p}" for p in check.problems]], bad=True)
            return
        if message.start:
            self.dismiss(StartRequest(recipe=check.recipe, source=check.source))
            return
        self._show([f"{check.recipe}: ok", check.summary, f"corpus {check.source}" if check.source else ""], bad=False)

    def _show(self, lines: list[str], *, bad: bool) -> None:
        box = self.query_one("#start-problems", Static)
        box.set_class(bad, "bad")
        box.update(Text("\n".join(line for line in lines if line)))


class ConfirmCancelScreen(ModalScreen[bool]):
    """Are you sure: a cancelled run stops (training checkpoints first) and can be resumed."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("y", "answer(True)", "Cancel the run", id="runs.cancel.yes"),
        Binding("n,escape", "answer(False)", "Keep it", id="runs.cancel.no"),
    ]
    DEFAULT_CSS = """
    ConfirmCancelScreen { align: center middle; }
    ConfirmCancelScreen #cancel-box { width: 72; height: auto; border: round $error; background: $panel; padding: 0 1; }
    ConfirmCancelScreen #cancel-buttons { height: 3; align-horizontal: right; }
    ConfirmCancelScreen #cancel-buttons Button { margin-left: 1; }
    """

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    def compose(self) -> ComposeResult:
        with Vertical(id="cancel-box"):
            yield Label(f"Cancel run {self.run_id}?", classes="title")
            yield Static("Its current stage stops (a training job saves a checkpoint first); `resume` continues it later.")
            with Horizontal(id="cancel-buttons"):
                yield Button("Cancel the run (y)", id="cancel-yes", variant="error")
                yield Button("Keep it running (n)", id="cancel-no")

    def on_mount(self) -> None:
        self.query_one("#cancel-no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "cancel-yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


# -- the pane -----------------------------------------------------------------------------------


class RunsPane(ServicePane):
    """Every run, filtered as you type; the selected run's stages, timings, metrics and log."""

    FOCUS = "#runs-table"

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("s", "start", "Start run", id="runs.start"),
        Binding("c", "cancel", "Cancel run", id="runs.cancel"),
        Binding("u", "resume", "Resume run", id="runs.resume"),
        Binding("slash", "filter", "Filter", id="runs.filter", key_display="/"),
        Binding("m", "next_chart", "Next chart", id="runs.chart"),
        Binding("l", "focus_log", "Log", id="runs.log"),
        Binding("escape", "focus_list", "Run list", id="runs.list", show=False),
    ]
    PALETTE: ClassVar[list[tuple[str, str, str]]] = [
        ("Runs: start a run", "check a recipe file (every problem at once) and start it (needs run.start)", "action_start"),
        ("Runs: cancel the selected run", "stop a queued or running run; training checkpoints first (needs run.cancel)", "action_cancel"),
        ("Runs: resume the selected run", "continue a failed, stopped or interrupted run (needs run.resume)", "action_resume"),
        ("Runs: filter", "filter the runs by id, recipe or status", "action_filter"),
    ]
    # The app's `.card { height: auto }` outranks any DEFAULT_CSS rule, so boxes sized here are
    # `runs-card`s: the same look as `.card`, with heights of their own.
    DEFAULT_CSS = """
    RunsPane .runs-card { border: round $primary 50%; padding: 0 1; }
    RunsPane #runs-top { dock: top; height: auto; }
    RunsPane #runs-bar { height: 3; }
    RunsPane #runs-filter { width: 1fr; }
    RunsPane #runs-bar Button { width: 14; min-width: 14; margin-left: 1; }
    RunsPane #runs-why { height: auto; max-height: 3; color: $text-muted; padding: 0 1; }
    RunsPane #runs-list-box { height: 10; }
    RunsPane #runs-table { height: 1fr; }
    RunsPane #runs-detail { height: 1fr; }
    RunsPane #runs-left { width: 56; height: 100%; }
    RunsPane #runs-stages-box { height: 1fr; }
    RunsPane #runs-stages { height: 1fr; }
    RunsPane #runs-right { width: 1fr; height: 100%; }
    RunsPane #runs-chart-box { height: 1fr; }
    RunsPane #runs-chart-tabs { height: 2; }
    RunsPane #runs-chart { height: 1fr; }
    RunsPane #runs-log-box { height: 8; }
    RunsPane #runs-log { height: 1fr; overflow: auto auto; background: $surface; }
    """

    selected: str | None = None
    log_stage: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.listed: list[dict[str, Any]] = []  # every run, as run.list gave them (oldest first)
        self.rows: list[dict[str, Any]] = []  # every run, newest first, as shown
        self.detail: dict[str, Any] = {}  # run.show of the selected run
        self.metrics: dict[str, Any] = {}
        self.times: dict[str, tuple[str, float | None]] = {}
        self.plotted: dict[str, int] = {}  # series name -> points drawn in the chart now (tests read it)
        self.live: tuple[str, str] | None = None  # (stage, progress) of the selected run, from run.events
        self._following: str | None = None
        # Runs resumed from here: (status now, finished_ts the ledger showed when resumed). The
        # ledger's `runs` view keeps a resumed run's old status until it ends again, so until then
        # the status shown comes from its events.
        self.resumed: dict[str, tuple[str, str | None]] = {}
        self._chart = "loss"

    def compose(self) -> ComposeResult:
        # The run list comes first in the DOM, the bar above it is docked: a tab switch focuses
        # the first focusable widget, which must be the list (its keys are the pane's), not the
        # filter (which would take the number keys as text).
        with Vertical(id="runs-list-box", classes="runs-card"):
            yield Label("Runs", classes="title", id="runs-count")
            yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        with Vertical(id="runs-top"):
            with Horizontal(id="runs-bar"):
                yield Input(placeholder="filter runs by id, recipe or status (/)", id="runs-filter")
                yield Gated("Start (s)", "run.start", id="runs-start", variant="primary")
                yield Gated("Cancel (c)", "run.cancel", id="runs-cancel", variant="error")
                yield Gated("Resume (u)", "run.resume", id="runs-resume")
            yield Static("", id="runs-why")
        with Horizontal(id="runs-detail"):
            with Vertical(id="runs-left"):
                yield Static("select a run", id="runs-summary", classes="card")
                with Vertical(id="runs-stages-box", classes="runs-card"):
                    yield Label("Stages", classes="title")
                    yield DataTable(id="runs-stages", cursor_type="row", zebra_stripes=True)
            with Vertical(id="runs-right"):
                with Vertical(id="runs-chart-box", classes="runs-card"):
                    yield Tabs(*[Tab(title, id=f"chart-{key}") for key, title, _ in CHARTS], id="runs-chart-tabs")
                    yield PlotextPlot(id="runs-chart")
                with Vertical(id="runs-log-box", classes="runs-card"):
                    yield Label("Log", classes="title", id="runs-log-title")
                    yield Log(id="runs-log", max_lines=LOG_LINES * 2)

    def on_mount(self) -> None:
        self.query_one("#runs-table", DataTable).add_columns("run", "recipe", "status", "started by", "started", "finished")
        self._update_actions()
        self.refresh_data()
        self.set_interval(POLL_S, self._poll)

    def on_show(self) -> None:
        # The tab's keys work only with the focus inside the pane; a tab switch leaves it outside.
        if self.app.focused is None or self not in self.app.focused.ancestors_with_self:
            self.query_one("#runs-table", DataTable).focus()

    def on_hide(self) -> None:
        # Leaving the tab from inside it leaves the focus nowhere (or in the next tab's first
        # field, where the number keys would be typed): give it to the tab bar, once the next tab
        # has had its say.
        self.call_after_refresh(self._focus_tab_bar)

    def _focus_tab_bar(self) -> None:
        if self.app.focused is None:
            for bar in self.app.query("#tabs > Tabs"):
                bar.focus()

    # -- loading ------------------------------------------------------------------------------

    def refresh_data(self) -> None:
        self.load("runs", "run.list")
        if self.selected:
            self._load_detail(self.selected)

    def _poll(self) -> None:
        # Polled only while something may change: a run queued or running.
        if any(r["status"] in ACTIVE for r in self.rows):
            self.refresh_data()

    def _load_detail(self, run_id: str) -> None:
        calls: dict[str, tuple[str, dict[str, Any]]] = {
            "show": ("run.show", {"run": run_id}),
            "metrics": ("run.metrics", {"run": run_id}),
        }
        if self.log_stage:
            calls["log"] = ("run.log", {"run": run_id, "stage": self.log_stage, "lines": LOG_LINES})
        self.load_many(calls)

    def on_loaded(self, message: Loaded) -> None:
        result = message.result
        if message.key == "runs":
            self.listed = result
            self._runs()
            return
        if message.key in ("started", "cancelled", "resumed"):
            self._acted(message.key, result)
            return
        # Answers for a run no longer selected (the operator moved on) are dropped.
        rows = result.get("rows") if message.key == "times" else None
        run_id = rows[0][0] if rows else result.get("run_id")
        if run_id is not None and run_id != self.selected:
            return
        if message.key == "show":
            self._show(result)
        elif message.key == "metrics":
            self.metrics = result
            self._draw_chart()
        elif message.key == "times":
            self.times = stage_times(self.detail.get("started_ts"), [r[1:] for r in result.get("rows", [])])
            self._stages()
        elif message.key == "log" and result.get("stage") == self.log_stage:
            self._log(result)

    # -- the list -------------------------------------------------------------------------------

    def _patched(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` (from run.list or run.show) with the status of a run resumed here, while it lasts."""
        live = self.resumed.get(row["run_id"])
        if live is None:
            return row
        if row.get("finished_ts") != live[1]:  # it finished again: the ledger knows better now
            del self.resumed[row["run_id"]]
            return row
        return {**row, "status": live[0], "error": None, "finished_ts": None}

    def _runs(self) -> None:
        self.rows = [self._patched(r) for r in reversed(self.listed)]
        self._fill_table()
        if self.selected is None and self.rows:
            self._select(self.rows[0]["run_id"])
        elif self.selected is not None:
            row = self._row(self.selected)
            if row is not None and self.detail and row["status"] != self.detail.get("status"):
                self._load_detail(self.selected)
        self._update_actions()

    def visible_rows(self) -> list[dict[str, Any]]:
        words = self.query_one("#runs-filter", Input).value.lower().split()
        return [r for r in self.rows if all(any(w in str(r[k] or "").lower() for k in ("run_id", "recipe_name", "status")) for w in words)]

    def _fill_table(self) -> None:
        table = self.query_one("#runs-table", DataTable)
        shown = self.visible_rows()
        table.clear()
        for r in shown:
            table.add_row(r["run_id"], r["recipe_name"], styled(r["status"]), r["actor"], when(r["started_ts"]), when(r["finished_ts"]), key=r["run_id"])
        total = len(self.rows)
        count = f"{len(shown)} of {total}" if len(shown) != total else str(total)
        active = sum(1 for r in self.rows if r["status"] in ACTIVE)
        self.query_one("#runs-count", Label).update(f"Runs ({count})" + (f" · {active} active, refreshing every {POLL_S:.0f} s" if active else ""))
        if self.selected is not None and self.selected in {r["run_id"] for r in shown}:
            table.move_cursor(row=table.get_row_index(self.selected), animate=False)

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "runs-filter":
            self._fill_table()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "runs-filter":
            self.query_one("#runs-table", DataTable).focus()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        # Refilling a table highlights its first row on the way to the one kept: that is no choice.
        if key is None or event.cursor_row != event.data_table.cursor_row:
            return
        if event.data_table.id == "runs-table":
            self._select(key)
        elif event.data_table.id == "runs-stages" and key != self.log_stage and self.selected:
            self.log_stage = key
            self.load("log", "run.log", run=self.selected, stage=key, lines=LOG_LINES)

    def _row(self, run_id: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["run_id"] == run_id), None)

    def _select(self, run_id: str) -> None:
        if run_id == self.selected:
            return
        self.selected, self.detail, self.metrics, self.times, self.live, self.log_stage = run_id, {}, {}, {}, None, None
        self.query_one("#runs-summary", Static).update(f"[b]{run_id}[/b]\nloading…")
        self.query_one("#runs-stages", DataTable).clear()
        self.query_one("#runs-log", Log).clear()
        self._draw_chart()
        self._update_actions()
        self._load_detail(run_id)

    # -- the selected run -------------------------------------------------------------------------

    def _show(self, detail: dict[str, Any]) -> None:
        detail = self.detail = self._patched(detail)
        stages = detail.get("stages", {})
        # run.show gives when each stage last changed state, in the ledger's order.
        ended = sorted(detail.get("stage_ts", {}).items(), key=lambda kv: kv[1])
        self.times = stage_times(detail.get("started_ts"), [[stage, None, None, ts] for stage, ts in ended])
        if self.log_stage is None and stages:
            # The training log is the one people read; else the last stage that ran.
            self.log_stage = "train" if "train" in stages else list(stages)[-1]
            self.load("log", "run.log", run=detail["run_id"], stage=self.log_stage, lines=LOG_LINES)
        if detail["status"] in ACTIVE and self._following != detail["run_id"]:
            self._following = detail["run_id"]
            self.follow(f"events:{detail['run_id']}", "run.events", run=detail["run_id"])
        self._summary()
        self._stages()
        self._update_actions()

    def _summary(self) -> None:
        d = self.detail
        status = d.get("status", "")
        start, end = when(d.get("started_ts")), when(d.get("finished_ts"))
        total = seconds_between(d.get("started_ts"), d.get("finished_ts"))
        # The end's date only when it differs from the start's.
        end_shown = end[11:] if end[:10] == start[:10] else end
        text = Text.assemble((str(d.get("run_id")), "bold"), "  recipe ", (str(d.get("recipe_name")), "bold"), "\nstatus ", styled(status))
        text.append(f"   started by {d.get('actor')}\n{start} → {end_shown or 'still going'}")
        if total is not None:
            text.append(f"   took {took(total)}")
        if self.live and status in ACTIVE:
            text.append(f"\nnow: {self.live[0]} {self.live[1]}", style="yellow")
        if d.get("error"):
            text.append(f"\n{d['error']}", style="red")
        self.query_one("#runs-summary", Static).update(text)

    def _stages(self) -> None:
        table = self.query_one("#runs-stages", DataTable)
        # Columns too: a width once grown (a long error, "reused from …") would stay grown.
        table.clear(columns=True)
        table.add_columns("stage", "status", "ended", "took")
        stages = dict(self.detail.get("stages", {}))
        if self.live and self.detail.get("status") in ACTIVE and self.live[0] not in stages:
            stages[self.live[0]] = f"running {self.live[1].split(' ', 1)[0]}".strip()
        for name, status in stages.items():
            ended, seconds = self.times.get(name, ("", None))
            table.add_row(name, styled(status), when(ended)[11:], took(seconds), key=name)
        if self.log_stage is not None and self.log_stage in stages:
            table.move_cursor(row=table.get_row_index(self.log_stage), animate=False)

    def _log(self, result: dict[str, Any]) -> None:
        log = self.query_one("#runs-log", Log)
        log.clear()
        lines = result.get("lines") or []
        title = f"Log · {result.get('stage')} · last {LOG_LINES} lines (pick a stage on the left)"
        self.query_one("#runs-log-title", Label).update(title)
        if lines:
            log.write_lines(lines)
        else:
            log.write_line(result.get("note") or f"the {result.get('stage')} job's log is empty: it wrote nothing")

    def _draw_chart(self) -> None:
        widget = self.query_one("#runs-chart", PlotextPlot)
        plot = widget.plt
        plot.clear_data()
        plot.clear_figure()
        key, title, names = next(c for c in CHARTS if c[0] == self._chart)
        series = self.metrics.get("series", {})
        self.plotted = {}
        for name in names:
            points = series.get(name) or []
            if points:
                plot.plot([p[0] for p in points], [p[1] for p in points], label=name, marker="braille")
                self.plotted[name] = len(points)
        run_id = self.metrics.get("run_id") or self.selected or ""
        # Short: plotext drops a title wider than the plot.
        plot.title(f"{title} · {run_id}" if self.plotted else f"{title}: no points recorded (yet)")
        plot.xlabel("step")
        widget.refresh()

    def on_tabs_tab_activated(self, event: Tabs.TabActivated) -> None:
        if event.tabs.id == "runs-chart-tabs" and event.tab.id:
            event.stop()
            self._chart = event.tab.id.removeprefix("chart-")
            self._draw_chart()

    def on_streamed(self, message: Streamed) -> None:
        if message.key != f"events:{self.selected}":
            return
        event = message.event
        kind = event.get("event")
        if kind == "stage_started":
            self.live = (event["stage"], "")
            self._now_running()
            if self.selected:  # the log of the stage running now is the one to watch
                self.log_stage = event["stage"]
                self.load("log", "run.log", run=self.selected, stage=event["stage"], lines=LOG_LINES)
        elif kind == "progress":
            fields = event.get("fields") or {}
            shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(fields.items())[:3])
            self.live = (event.get("stage") or "", f"{event.get('done')}/{event.get('total')}  {shown}".strip())
        elif kind in ("stage_finished", "stage_failed", "run_finished"):
            self.live = None
            if kind == "run_finished":
                self._following = None
            self.refresh_data()
            return
        else:
            return
        self._summary()
        self._stages()

    # -- actions ----------------------------------------------------------------------------------

    def _why_not(self, action: str) -> str:
        """Why ``action`` (start, cancel, resume) cannot be done now: the role first, then the run's state."""
        reason = self.session.grants.reason(f"run.{action}")
        if reason or action == "start":
            return reason
        row = self._row(self.selected) if self.selected else None
        if row is None:
            return "no run is selected"
        status = row["status"]
        if action == "cancel" and status not in CANCELLABLE:
            return f"run is {status}: only a running or queued run can be cancelled"
        if action == "resume" and status not in RESUMABLE:
            return f"run is {status}: only a failed, stopped or interrupted run can be resumed"
        return ""

    def _update_actions(self) -> None:
        why = []
        for action in ("start", "cancel", "resume"):
            button = self.query_one(f"#runs-{action}", Gated)
            reason = self._why_not(action)
            button.disabled = bool(reason)
            button.tooltip = reason or None
            if reason:
                why.append(f"{action}: {reason}")
        self.query_one("#runs-why", Static).update(Text("\n".join(why)))

    def _refuse(self, action: str) -> bool:
        reason = self._why_not(action)
        if reason:
            self.console.report_message(f"cannot {action}: {reason}", "see the reason above the run list")
        return bool(reason)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        actions = {"runs-start": self.action_start, "runs-cancel": self.action_cancel, "runs-resume": self.action_resume}
        if event.button.id in actions:
            event.stop()
            actions[event.button.id]()

    def action_start(self) -> None:
        if not self._refuse("start"):
            self.app.push_screen(StartRunScreen(), callback=self._start)

    def _start(self, request: StartRequest | None) -> None:
        if request is not None:
            self.load("started", "run.start", recipe=request.recipe, source=request.source)

    def action_cancel(self) -> None:
        if self._refuse("cancel") or self.selected is None:
            return
        run_id = self.selected

        def answered(yes: bool | None) -> None:
            if yes:
                self.load("cancelled", "run.cancel", run=run_id)

        self.app.push_screen(ConfirmCancelScreen(run_id), callback=answered)

    def action_resume(self) -> None:
        if not self._refuse("resume") and self.selected is not None:
            self.load("resumed", "run.resume", run=self.selected)

    def _now_running(self) -> None:
        if self.selected in self.resumed:
            self.resumed[self.selected] = ("running", self.resumed[self.selected][1])
            self.detail = {**self.detail, "status": "running"}
            self._runs()

    def _acted(self, key: str, result: dict[str, Any]) -> None:
        run_id = result.get("run_id", "")
        said = {
            "started": f"run {run_id} started ({result.get('status')})",
            "cancelled": f"run {run_id} is being cancelled",
            "resumed": f"run {run_id} resumed",
        }
        self.app.notify(said[key], title="runs")
        if key == "started":
            self.query_one("#runs-filter", Input).value = ""
            self._select(run_id)
        elif key == "resumed" and (row := self._row(run_id)) is not None:
            self.resumed[run_id] = (str(result.get("status") or "queued"), row.get("finished_ts"))
            self._following = None  # a resumed run has a new feed to follow
            self._runs()
        self.refresh_data()

    def action_filter(self) -> None:
        field = self.query_one("#runs-filter", Input)
        if self.is_on_screen:
            field.focus()
            return
        # From the palette, elsewhere: show the tab, then focus the field once the tab switch
        # has focused the list (it runs after the refresh too, and first).
        self.console.action_show_tab("runs")
        self.call_after_refresh(field.focus)

    def action_focus_list(self) -> None:
        self.query_one("#runs-table", DataTable).focus()

    def action_focus_log(self) -> None:
        self.query_one("#runs-log", Log).focus()

    def action_next_chart(self) -> None:
        keys = [c[0] for c in CHARTS]
        self.query_one("#runs-chart-tabs", Tabs).active = f"chart-{keys[(keys.index(self._chart) + 1) % len(keys)]}"
