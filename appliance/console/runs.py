"""Runs: every run, one run's stages, timings, log tail and metrics; start, cancel and resume runs.

Everything goes through the service (``run.list``, ``run.show``, ``run.metrics``, ``run.log``,
``run.events``, ``run.start``, ``run.cancel``, ``run.resume``) except one thing: a recipe the
operator wants to start is checked here first, as `appliance recipe check` does, so every
problem of the file shows in the start dialog (`runs_start`) at once instead of one at a time
from the service. How a run reads (times, colours, summary, charts) is in `runs_view`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, DataTable, Input, Label, Log, Static, Tab, Tabs
from textual_plotext import PlotextPlot

from appliance.console.base import Gated, Loaded, ServicePane, Streamed, reveal
from appliance.console.runs_cancel import ConfirmCancelScreen
from appliance.console.runs_start import StartRequest, StartRunScreen
from appliance.console.runs_view import ACTIVE, CHARTS, draw_chart, run_summary, stage_times, styled, took, when

POLL_S = 5.0  # how often the list is re-read while a run is queued or running and the tab is shown (and only then)
LOG_LINES = 200
CANCELLABLE = ACTIVE
RESUMABLE = ("failed", "stopped", "interrupted")


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
        with Vertical(id="runs-list-box", classes="card"):
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
                with Vertical(id="runs-stages-box", classes="card"):
                    yield Label("Stages", classes="title")
                    yield DataTable(id="runs-stages", cursor_type="row", zebra_stripes=True)
            with Vertical(id="runs-right"):
                with Vertical(id="runs-chart-box", classes="card"):
                    yield Tabs(*[Tab(title, id=f"chart-{key}") for key, title, _ in CHARTS], id="runs-chart-tabs")
                    yield PlotextPlot(id="runs-chart")
                with Vertical(id="runs-log-box", classes="card"):
                    yield Label("Log", classes="title", id="runs-log-title")
                    yield Log(id="runs-log", max_lines=LOG_LINES * 2)

    def on_mount(self) -> None:
        self.query_one("#runs-table", DataTable).add_columns("run", "recipe", "status", "started by", "started", "finished")
        self._update_actions()
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
        # Polled only while something may change (a run queued or running) and someone looks:
        # every call is a decision recorded in the ledger. The run's own events stream meanwhile.
        if self.shown() and any(r["status"] in ACTIVE for r in self.rows):
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
        run_id = result.get("run_id")
        if run_id is not None and run_id != self.selected:
            return
        if message.key == "show":
            self._show(result)
        elif message.key == "metrics":
            self.metrics = result
            self._draw_chart()
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
        self.times = stage_times(detail.get("started_ts"), [[stage, None, None, ts] for stage, ts in ended], detail.get("stage_began"))
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
        self.query_one("#runs-summary", Static).update(run_summary(self.detail, self.live))

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
        run_id = self.metrics.get("run_id") or self.selected or ""
        self.plotted = draw_chart(self.query_one("#runs-chart", PlotextPlot), self._chart, self.metrics, run_id)

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
            self.load("started", "run.start", recipe=request.recipe, source=request.source, **({"context": request.context} if request.context else {}))

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
        reveal(self)
        self.call_after_refresh(field.focus)

    def action_focus_list(self) -> None:
        self.query_one("#runs-table", DataTable).focus()

    def action_focus_log(self) -> None:
        self.query_one("#runs-log", Log).focus()

    def action_next_chart(self) -> None:
        keys = [c[0] for c in CHARTS]
        self.query_one("#runs-chart-tabs", Tabs).active = f"chart-{keys[(keys.index(self._chart) + 1) % len(keys)]}"
