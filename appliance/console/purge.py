"""Purge: pick a target, see its lineage impact, confirm, watch it run, read the signed certificate.

A purge cannot be undone, so the pane walks the operator through what the CLI's
``appliance purge TARGET`` shows before ``--confirm``: the impact (``purge.impact``: what is
erased, what stays marked "derived from purged data", sources, exports beyond reach, runs
touched, warnings), then a dialog that names what is erased and asks for the target's short
digest typed back. Under a two-person rule on data.purge the dialog requests the approval
(``approvals.request`` with the subject the CLI uses) or takes an approved request's id.
The purge itself (``purge.run``: erase, verification scan, signed certificate) runs in a
worker behind an indeterminate bar; past purges and their certificates stay one key away.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import var
from textual.widgets import Button, DataTable, Input, Label, ProgressBar, Static

from appliance.console.base import Gated, ServicePane
from appliance.console.purge_certificate import CertificateScreen
from appliance.console.purge_confirm import ConfirmPurgeScreen, PurgeChoice
from appliance.console.purge_text import DATA_KINDS, MODEL_KINDS, NOT_TARGETS, how_erased, impact_summary, root_digest, short_name, target_of
from appliance.console.session import human_bytes, short

PERMISSION = "data.purge"

# -- messages from the workers -------------------------------------------------------------


class PurgeTargets(Message):
    """What can be purged, and what was: artifacts, runs, past purges and their certificates."""

    def __init__(self, artifacts: list[dict[str, Any]], runs: list[dict[str, Any]], purges: list[dict[str, Any]], certificates: dict[str, Any]) -> None:
        super().__init__()
        self.artifacts, self.runs, self.purges, self.certificates = artifacts, runs, purges, certificates


class ImpactLoaded(Message):
    """``purge.impact`` answered; ``approved``: the caller's approved requests for this very subject."""

    def __init__(self, impact: dict[str, Any], also: list[str], approved: list[str]) -> None:
        super().__init__()
        self.impact, self.also, self.approved = impact, also, approved


class PurgeFinished(Message):
    """``purge.run`` returned its certificate (``result``), or failed (None: the error was shown)."""

    def __init__(self, result: dict[str, Any] | None) -> None:
        super().__init__()
        self.result = result


class Requested(Message):
    """``approvals.request`` recorded a request for a second person to decide."""

    def __init__(self, request: dict[str, Any]) -> None:
        super().__init__()
        self.request = request


class CertificateLoaded(Message):
    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__()
        self.result = result


class PurgePane(ServicePane):
    """Pick a target, read its impact, confirm, purge, read the certificate; past purges below."""

    NEEDS = "artifact.read"
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("i", "impact", "Impact", id="purge.impact"),
        Binding("a", "toggle_also", "Also erase", id="purge.also"),
        Binding("p", "confirm", "Purge…", id="purge.run"),
        Binding("c", "certificate", "Certificate", id="purge.certificate"),
        Binding("t", "focus_target", "Target", id="purge.target"),
    ]
    PALETTE: ClassVar[list[tuple[str, str, str]]] = [
        ("Purge: impact of the selected target", "what a purge would erase and keep (key i, Purge tab)", "action_impact"),
        ("Purge: also erase everything derived", "add --also all to the impact: models and checkpoints too", "action_also_all"),
        ("Purge: confirm and run…", "the confirm dialog for the target shown (key p, Purge tab)", "action_confirm"),
        ("Purge: certificate of the selected purge", "the signed certificate (key c, Purge tab)", "action_certificate"),
    ]

    running: var[bool] = var(False, init=False)  # a purge is under way: the bar shows, the button waits

    def __init__(self) -> None:
        super().__init__()
        self.impact: dict[str, Any] | None = None  # the impact shown: what the dialog confirms
        self.also: list[str] = []  # --also digests (or "all") of the impact shown
        self.approved: list[str] = []  # the caller's approved requests for its subject
        self.certificates: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        with Horizontal(id="purge-top"):
            with Vertical(id="purge-targets-box", classes="card"):
                yield Label("Targets (enter: impact)", classes="title")
                yield Input(placeholder="digest, run:RUN or source:PATH", id="purge-target")
                yield DataTable(id="purge-targets", cursor_type="row", zebra_stripes=True)
            with Vertical(id="purge-impact-box", classes="card"):
                yield Label("Impact (a: also erase the selected kept artifact)", classes="title")
                with VerticalScroll(id="purge-summary-scroll"):
                    yield Static("pick a target on the left and press enter to see what its purge would erase and keep", id="purge-summary")
                yield DataTable(id="purge-impact-table", cursor_type="row", zebra_stripes=True)
                with Horizontal(id="purge-actions"):
                    yield Gated("Impact", "artifact.read", id="purge-impact-go")
                    yield Gated("Purge…", PERMISSION, id="purge-go", variant="error")
                yield Label("", id="purge-gate")
                with Horizontal(id="purge-running"):
                    yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="purge-progress")
                    yield Label("", id="purge-running-label")
        with Vertical(id="purge-history-box", classes="card"):
            yield Label("Past purges (c or enter: certificate)", classes="title")
            yield DataTable(id="purge-history", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        # The columns that decide come first (and fit at 120 columns); the rest scroll sideways.
        targets = self.query_one("#purge-targets", DataTable)
        for label, width in (("name", 24), ("kind", 16), ("size", 9), ("digest", 12)):
            targets.add_column(label, width=width, key=label)
        impact = self.query_one("#purge-impact-table", DataTable)
        for label, width in (("fate", 12), ("kind", 15), ("name", 18), ("size", 9), ("digest", 12), ("how", 30)):
            impact.add_column(label, width=width, key=label)
        self.query_one("#purge-history", DataTable).add_columns("purge", "status", "target", "requested by", "approved by", "artifacts", "finished")
        self._gate()

    # -- gating: what the caller may do, said where the button is ----------------------------

    def _gate(self) -> None:
        grants = self.session.grants
        reason = grants.reason(PERMISSION)
        go = self.query_one("#purge-go", Button)
        go.disabled = bool(reason) or self.impact is None or self.running
        if reason:
            text = f"[b]purge disabled:[/b] {escape(reason)}"
        elif self.running:
            text = "a purge is running…"
        elif self.impact is None:
            text = "see a target's impact first"
        elif self.impact.get("two_person"):
            text = "needs a second person: the dialog requests approval or takes an approved id"
        else:
            text = "p: confirm and purge"
        self.query_one("#purge-gate", Label).update(text)

    # -- loading -----------------------------------------------------------------------------

    def refresh_data(self) -> None:
        if not self.allowed("artifact.read"):
            self.query_one("#purge-summary", Static).update(escape(self.session.grants.reason("artifact.read")))
            return
        self._load_targets()

    @work(thread=True, exclusive=True, exit_on_error=False, group="purge-targets")
    def _load_targets(self) -> None:
        call = self.session.call
        try:
            artifacts = call("artifact.list")
            runs = call("run.list") if self.allowed("run.read") else []
            purges = call("purge.list")
            # Each completed purge's certificate names what it erased: those rows read "purged".
            certificates = {p["purge_id"]: call("purge.show", id=p["purge_id"]) for p in purges if p["status"] == "completed"}
        except Exception as exc:  # every error is shown by the one handler, with its fix
            self.console.call_from_thread(self.console.report, exc)
            return
        self.post_message(PurgeTargets(artifacts, runs, purges, certificates))

    def on_purge_targets(self, message: PurgeTargets) -> None:
        self.certificates = message.certificates
        purged = {a["digest"]: pid for pid, r in message.certificates.items() for a in r["certificate"]["media"]["artifacts"]}
        table = self.query_one("#purge-targets", DataTable)
        table.clear()
        for run in message.runs:
            table.add_row(run["run_id"].removeprefix("run-"), "run: its data", "", run["status"], key=f"run:{run['run_id']}")
        order = {k: i for i, k in enumerate(DATA_KINDS)}
        shown = [a for a in message.artifacts if a["kind"] not in NOT_TARGETS]
        shown.sort(key=lambda a: (order.get(a["kind"], len(order)), a["kind"], a["name"]))
        shown += [a for a in message.artifacts if a["kind"] == "source"]
        shown.sort(key=lambda a: a["digest"] in purged)  # stable: what is left first, what is gone last
        for a in shown:
            size = human_bytes(a["size_bytes"]) if a.get("size_bytes") is not None else ""
            name, kind = escape(short_name(a)), escape(a["kind"])
            if a["digest"] in purged:
                name, kind = f"[dim]{name} (purged)[/dim]", f"[dim]{kind}[/dim]"
            elif a["kind"] in DATA_KINDS:
                kind = f"[b]{kind}[/b]"  # holds the data itself
            table.add_row(name, kind, size, short(a["digest"]), key=target_of(a))
        history = self.query_one("#purge-history", DataTable)
        history.clear()
        for p in reversed(message.purges):
            cert = message.certificates.get(p["purge_id"])
            status = p["status"] if cert is None else f"{p['status']}, {cert['certificate']['verification']['result']}"
            history.add_row(
                p["purge_id"],
                status,
                p["target"] if len(p["target"]) < 40 else short(p["target"]),
                p["requester"] or "",
                p["approver"] or "-",
                str(p["artifacts"]),
                str(p["finished"] or p["started"])[:19],
                key=p["purge_id"],
            )

    # -- impact ------------------------------------------------------------------------------

    @on(DataTable.RowSelected, "#purge-targets")
    def _picked(self, event: DataTable.RowSelected) -> None:
        target = str(event.row_key.value)
        self.query_one("#purge-target", Input).value = target
        self._show_impact(target, [])

    @on(Input.Submitted, "#purge-target")
    def _typed(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self._show_impact(event.value.strip(), [])

    @on(Button.Pressed, "#purge-impact-go")
    def action_impact(self) -> None:
        target = self.query_one("#purge-target", Input).value.strip()
        if not target:
            table = self.query_one("#purge-targets", DataTable)
            if table.row_count == 0:
                self.console.report_message("there is no target to show the impact of", "type a digest, run:RUN or source:PATH, or pick a row")
                return
            target = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
            self.query_one("#purge-target", Input).value = target
        self._show_impact(target, self.also if self.impact and self.impact["target"] == target else [])

    def action_also_all(self) -> None:
        if self.impact is None:
            self.console.report_message("no impact is shown yet", "pick a target and press i first")
            return
        self._show_impact(self.impact["target"], ["all"])

    def action_toggle_also(self) -> None:
        """Erase the selected kept artifact too (``--also DIGEST``), or keep it again."""
        if self.impact is None:
            self.console.report_message("no impact is shown yet", "pick a target and press i first")
            return
        table = self.query_one("#purge-impact-table", DataTable)
        if table.row_count == 0:
            return
        digest = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        erased = {a["digest"] for a in self.impact["purge"]}
        also = [a for a in self.also if a != "all"]
        if digest in also:
            also.remove(digest)
        elif digest in erased:
            self.console.report_message(f"{short(digest)} is erased with the target anyway", "only kept (derived) artifacts can be added with also")
            return
        else:
            also.append(digest)
        self._show_impact(self.impact["target"], also)

    def _show_impact(self, target: str, also: list[str]) -> None:
        self.query_one("#purge-summary", Static).update(f"reading the impact of {escape(target)}…")
        self._load_impact(target, also)

    @work(thread=True, exclusive=True, exit_on_error=False, group="purge-impact")
    def _load_impact(self, target: str, also: list[str]) -> None:
        try:
            impact = self.session.call("purge.impact", target=target, also=also or None)
            approved: list[str] = []
            if impact.get("two_person") and self.allowed(PERMISSION):
                # An approved request of the caller's for this very subject fills the dialog's id.
                approved = [
                    r["id"]
                    for r in self.session.call("approvals.list")
                    if r["action"] == PERMISSION
                    and r["subject"] == impact["subject"]
                    and r["status"] == "approved"
                    and r["requester"]["user"] == self.session.grants.user
                ]
        except Exception as exc:  # every error is shown by the one handler, with its fix
            self.console.call_from_thread(self.console.report, exc)
            self.console.call_from_thread(self._no_impact, target)
            return
        self.post_message(ImpactLoaded(impact, also, approved))

    def _no_impact(self, target: str) -> None:
        self.impact, self.also, self.approved = None, [], []
        self.query_one("#purge-impact-table", DataTable).clear()
        self.query_one("#purge-summary", Static).update(f"no impact for {escape(target)}: see the error")
        self._gate()

    def on_impact_loaded(self, message: ImpactLoaded) -> None:
        self.impact, self.also, self.approved = message.impact, message.also, message.approved
        self.query_one("#purge-summary", Static).update(impact_summary(message.impact, message.also))
        table = self.query_one("#purge-impact-table", DataTable)
        # Stay on the artifact the operator was on (a toggled one moves between erase and keep).
        was = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value) if table.row_count else None
        table.clear()
        root = root_digest(message.impact)
        for a in message.impact["purge"]:
            # What is not data and not the target itself is erased because the operator named it (also).
            fate = "ERASE" if a["kind"] in DATA_KINDS or a["digest"] == root else "ERASE (also)"
            table.add_row(
                f"[red]{fate}[/red]", a["kind"], short_name(a), human_bytes(a.get("size_bytes") or 0), short(a["digest"]), how_erased(a), key=a["digest"]
            )
        for a in message.impact["keep"]:
            how = "derived: a model cannot be un-trained (a: erase too)" if a["kind"] in MODEL_KINDS else "derived (a: erase too)"
            table.add_row(
                "[yellow]keep, marked[/yellow]", a["kind"], short_name(a), human_bytes(a.get("size_bytes") or 0), short(a["digest"]), how, key=a["digest"]
            )
        if was is not None and was in {a["digest"] for a in message.impact["purge"] + message.impact["keep"]}:
            table.move_cursor(row=table.get_row_index(was))
        self._gate()

    # -- confirm, request, purge -------------------------------------------------------------

    @on(Button.Pressed, "#purge-go")
    def action_confirm(self) -> None:
        reason = self.session.grants.reason(PERMISSION)
        if reason:
            self.console.report_message(f"purge is disabled: {reason}", "")
            return
        if self.running:
            self.console.report_message("a purge is running already", "wait for its certificate")
            return
        if self.impact is None:
            self.console.report_message("no impact is shown yet", "pick a target and press i: a purge is confirmed against its impact")
            return
        self.app.push_screen(ConfirmPurgeScreen(self.impact, self.also, self.approved), self._chosen)

    def _chosen(self, choice: PurgeChoice | None) -> None:
        if choice is None or self.impact is None:
            return
        if choice.action == "request":
            self._request(self.impact["subject"], choice.reason)
            return
        self.query_one("#purge-running-label", Label).update(
            f" purging {escape(self.impact['label'])}: destroying keys, overwriting, scanning the home to verify…"
        )
        self.running = True
        self._purge(self.impact["target"], list(self.also), choice.markers, choice.approval)

    @work(thread=True, exclusive=True, exit_on_error=False, group="purge-run")
    def _purge(self, target: str, also: list[str], markers: list[str], approval: str | None) -> None:
        try:
            result = self.session.call("purge.run", target=target, also=also or None, markers=markers or None, approval=approval)
        except Exception as exc:  # every error is shown by the one handler, with its fix
            self.console.call_from_thread(self.console.report, exc)
            self.post_message(PurgeFinished(None))
            return
        self.post_message(PurgeFinished(result))

    def watch_running(self, running: bool) -> None:
        self.query_one("#purge-running").set_class(running, "busy")
        self._gate()

    def on_purge_finished(self, message: PurgeFinished) -> None:
        if message.result is not None:
            r = message.result
            result = r["certificate"]["verification"]["result"]
            self.impact, self.also, self.approved = None, [], []  # its target is gone: nothing left to confirm
            self.query_one("#purge-impact-table", DataTable).clear()
            self.query_one("#purge-summary", Static).update(
                f"[b]purge {escape(r['purge_id'])}[/b] done: verification {result}; certificate signed by node key {short(r['key_id'], 16)}…"
            )
            self.app.push_screen(CertificateScreen(r))
            self.refresh_data()
        self.running = False

    @work(thread=True, exclusive=True, exit_on_error=False, group="purge-request")
    def _request(self, subject: str, reason: str) -> None:
        try:
            request = self.session.call("approvals.request", action=PERMISSION, subject=subject, reason=reason or None)
        except Exception as exc:  # every error is shown by the one handler, with its fix
            self.console.call_from_thread(self.console.report, exc)
            return
        self.post_message(Requested(request))

    def on_requested(self, message: Requested) -> None:
        r = message.request
        text = (
            f"request [b]{escape(r['id'])}[/b] for data.purge '{escape(r['subject'])}' is {r['status']}: "
            f"an approver ({escape(' or '.join(r.get('approvers', [])))}) decides it in Keys & approvals (6); then press p and give its id"
        )
        self.query_one("#purge-gate", Label).update(text)
        self.notify(text, title="approval requested", timeout=12)

    # -- certificates --------------------------------------------------------------------------

    @on(DataTable.RowSelected, "#purge-history")
    def _history_picked(self, event: DataTable.RowSelected) -> None:
        self._certificate(str(event.row_key.value))

    def action_certificate(self) -> None:
        table = self.query_one("#purge-history", DataTable)
        if table.row_count == 0:
            self.console.report_message("nothing was purged yet", "purge a target first; its certificate is listed here")
            return
        self._certificate(str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value))

    def _certificate(self, purge_id: str) -> None:
        if purge_id in self.certificates:
            self.app.push_screen(CertificateScreen(self.certificates[purge_id]))
        else:
            self._load_certificate(purge_id)

    @work(thread=True, exclusive=True, exit_on_error=False, group="purge-certificate")
    def _load_certificate(self, purge_id: str) -> None:
        try:
            result = self.session.call("purge.show", id=purge_id)
        except Exception as exc:  # every error is shown by the one handler, with its fix
            self.console.call_from_thread(self.console.report, exc)
            return
        self.post_message(CertificateLoaded(result))

    def on_certificate_loaded(self, message: CertificateLoaded) -> None:
        self.certificates[message.result["purge_id"]] = message.result
        self.app.push_screen(CertificateScreen(message.result))

    def action_focus_target(self) -> None:
        self.query_one("#purge-target", Input).focus()
