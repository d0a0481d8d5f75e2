"""Dashboard: service health, node key, policy, air gap, free disk; active runs live; the ledger's last events."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Label, ProgressBar, Static
from textual_plotext import PlotextPlot

from appliance.console.base import Loaded, ServicePane, Streamed
from appliance.console.session import human_bytes, short

POLL_S = 5.0  # how often the dashboard looks again while a run is active and the tab is shown
IDLE_POLL_S = 15.0  # and while no run is active
ACTIVE = ("running", "queued")


def eta(done: int, total: int, since: tuple[float, int] | None, now: float) -> str:
    """Time left at the rate seen since ``since`` (time, done), or "" when it cannot be told yet."""
    if since is None or total <= 0 or done <= since[1] or now <= since[0]:
        return ""
    seconds = (total - done) * (now - since[0]) / (done - since[1])
    return f"ETA {int(seconds // 60)}m{int(seconds % 60):02d}s"


class DashboardPane(ServicePane):
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = []

    def compose(self) -> ComposeResult:
        with Horizontal(id="dash-top"):
            yield Static(id="dash-health", classes="card")
            yield Static(id="dash-keys", classes="card")
        with Horizontal(id="dash-middle"):
            with Vertical(id="dash-runs-box", classes="card"):
                yield Label("Active runs", classes="title")
                yield DataTable(id="dash-runs", cursor_type="row", zebra_stripes=True)
                yield ProgressBar(id="dash-progress", total=100, show_eta=False)
                yield Label("", id="dash-rate")
            yield PlotextPlot(id="dash-chart", classes="card")
        with Vertical(id="dash-events-box", classes="card"):
            yield Label("Last ledger events", classes="title")
            yield DataTable(id="dash-events", zebra_stripes=True)

    following: str | None = None
    _charted: str | None = None
    _since: tuple[float, int] | None = None
    _stage: str | None = None
    _polled = 0.0
    _tokens_per_s: float | None = None

    def on_mount(self) -> None:
        runs = self.query_one("#dash-runs", DataTable)
        runs.add_columns("run", "recipe", "status", "started by", "started")
        events = self.query_one("#dash-events", DataTable)
        events.add_columns("seq", "time", "kind", "actor", "run")
        self._health()
        # The first load comes with the first sight (ServicePane.on_show): the dashboard is the tab shown at start.
        self.set_interval(POLL_S, self._poll)

    def _poll(self) -> None:
        # Only while the operator looks, and seldom while nothing runs: every call is recorded.
        if not self.shown():
            return
        now = time.monotonic()
        if self.following is not None or now - self._polled >= IDLE_POLL_S:
            self.refresh_data()

    def _health(self) -> None:
        info, grants = self.session.info, self.session.grants
        who = self.session.whoami
        guard = "[green]on[/]" if info.get("egress_guard") else "[yellow]off here[/] · local mode: jobs are guarded"
        disk = who.get("disk", {})
        routes = who.get("default_routes") or []
        route = "[yellow]default route " + ", ".join(f"via {r['via']} ({r['interface']})" for r in routes) + "[/]" if routes else "[green]no default route[/]"
        self.query_one("#dash-health", Static).update(
            f"[b]Service[/b] · {self.session.where}\n"
            f"owner {info.get('owner')} · api {info.get('api')} · max jobs {info.get('max_jobs')}\n"
            f"egress guard: {guard}\n"
            f"air gap: {route}\n"
            f"free disk in the home: {human_bytes(disk.get('free', 0))} of {human_bytes(disk.get('total', 0))}"
        )
        self.query_one("#dash-keys", Static).update(
            f"[b]You[/b] · {grants.user} ({', '.join(grants.roles) or 'no role'})\n"
            f"node key {short(info.get('node_key'), 16)}…\n"
            f"policy v{who.get('policy_version')} {short(who.get('policy_digest'), 16)}…\n"
            f"two-person: {', '.join(sorted(grants.two_person)) or 'none for you'}"
        )

    def refresh_data(self) -> None:
        self._polled = time.monotonic()
        calls: dict[str, tuple[str, dict[str, Any]]] = {"runs": ("run.list", {})}
        if self.allowed("ledger.query"):
            calls["events"] = (
                "ledger.query",
                {
                    "sql": "SELECT seq, ts, kind, actor, data ->> '$.run_id' AS run_id FROM signed_events WHERE kind <> 'authz.decision' ORDER BY seq DESC LIMIT 12"
                },
            )
        self.load_many(calls)

    def on_loaded(self, message: Loaded) -> None:
        if message.key == "runs":
            self._runs(message.result)
        elif message.key == "events":
            self._events(message.result)
        elif message.key == "metrics":
            self._metrics(message.result)

    def _runs(self, rows: list[dict[str, Any]]) -> None:
        active = [r for r in rows if r["status"] in ACTIVE]
        table = self.query_one("#dash-runs", DataTable)
        table.clear()
        for r in active:
            table.add_row(*(Text(str(v)) for v in (r["run_id"], r["recipe_name"], r["status"], r["actor"], r["started_ts"][:19])), key=r["run_id"])
        if not active:
            self.following = None
            self.query_one("#dash-rate", Label).update("no run is active; start one in Runs (2)")
            self.query_one("#dash-progress", ProgressBar).update(total=100, progress=0)
            # The chart keeps the latest run's curves, so the last training is one glance away.
            if rows and rows[-1]["run_id"] != self._charted:
                self.load("metrics", "run.metrics", run=rows[-1]["run_id"])
            return
        run_id = active[0]["run_id"]
        if self.following != run_id:
            self.following, self._since, self._stage = run_id, None, None
            self.follow("follow", "run.events", run=run_id)
        self.load("metrics", "run.metrics", run=run_id)

    def on_streamed(self, message: Streamed) -> None:
        event = message.event
        if event.get("event") != "progress":
            return
        done, total, stage = int(event.get("done") or 0), int(event.get("total") or 0), event.get("stage")
        now = time.monotonic()
        if stage != self._stage:
            self._stage, self._since = stage, (now, done)
        self.query_one("#dash-progress", ProgressBar).update(total=max(total, 1), progress=done)
        fields = dict(event.get("fields") or {})
        if stage == "train" and self._tokens_per_s is not None:
            fields["tokens/s"] = f"{self._tokens_per_s:,.0f}"
        # Two lines, the ETA on the first: a narrow card must not cut it off.
        head = f"{stage} {done}/{total}  {eta(done, total, self._since, now)}".rstrip()
        self.query_one("#dash-rate", Label).update(f"{self.following}: {head}\n" + "  ".join(f"{k} {v}" for k, v in fields.items()))

    def _metrics(self, result: dict[str, Any]) -> None:
        self._charted = result["run_id"]
        series = result.get("series", {})
        rate = series.get("tokens_per_s") or []
        self._tokens_per_s = float(rate[-1][1]) if rate and result["run_id"] == self.following else None
        loss = series.get("loss") or []
        plot = self.query_one("#dash-chart", PlotextPlot).plt
        plot.clear_data()
        plot.title(f"{result['run_id']}: loss and lr")
        if loss:
            plot.plot([p[0] for p in loss], [p[1] for p in loss], label="loss", color="cyan")
        lr = series.get("lr") or []
        if lr:
            plot.plot([p[0] for p in lr], [p[1] for p in lr], label="lr", yside="right", color="orange")
        self.query_one("#dash-chart", PlotextPlot).refresh()

    def _events(self, result: dict[str, Any]) -> None:
        table = self.query_one("#dash-events", DataTable)
        table.clear()
        for seq, ts, kind, actor, run_id in result.get("rows", []):
            # Text, not str: a DataTable reads a str as markup, and ledger text may hold "[...]".
            table.add_row(*(Text(str(v)) for v in (seq, str(ts)[:19], kind, actor, run_id or "")))
