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

from dataclasses import dataclass, field
from typing import Any, ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import var
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, ProgressBar, Static

from appliance.console.base import Gated, ServicePane
from appliance.console.session import human_bytes, short

PERMISSION = "data.purge"
# Kinds that hold the data itself: the service always erases them with their target (its
# ``appliance.service.datakeys.SEALED_KINDS``; a test keeps the two equal). They head the list.
DATA_KINDS = ("raw-documents", "ingest-rejects", "dataset", "dropped-samples", "token-shards", "finetune-examples")
# Recorded but never stored: not a target on their own (a source file is named ``source:PATH``).
NOT_TARGETS = ("source", "base-model-file")
# What a purge keeps but cannot take back: what they learned stays in them.
MODEL_KINDS = ("model", "finetuned-model", "adapter", "checkpoint")
CONFIRM_WORD = "purge"
SHOWN_IN_DIALOG = 8  # artifacts listed by name in the confirm dialog; the rest are counted


# -- what the screens say, Textual-free so it reads (and is tested) on its own -----------------


def target_of(row: dict[str, Any]) -> str:
    """The purge target a row of ``artifact.list`` names: a source as ``source:PATH``, else its digest."""
    return f"source:{row['name']}" if row["kind"] == "source" else str(row["digest"])


def root_digest(impact: dict[str, Any]) -> str | None:
    """The digest an artifact target (a digest or a prefix) names; None for run: and source: targets."""
    target = str(impact["target"]).lower().removeprefix("sha256:")
    if target.startswith(("run:", "source:")):
        return None
    return next((a["digest"] for a in impact["purge"] if a["digest"].startswith(target)), None)


def confirm_text(impact: dict[str, Any]) -> str:
    """What the operator types to confirm: the target's short digest for an artifact, else "purge"."""
    root = root_digest(impact)
    return short(root) if root else CONFIRM_WORD


def _how(a: dict[str, Any]) -> str:
    if a.get("sealed"):
        return "crypto-erase"
    return "overwrite only (stored before encryption at rest)" if a.get("stored") else "recorded, not stored"


def _name(a: dict[str, Any]) -> str:
    # "RUN/dataset" reads as "dataset": the runs touched are listed once, above the table.
    run = a.get("run_id")
    return str(a["name"]).removeprefix(f"{run}/") if run else str(a["name"])


def impact_summary(impact: dict[str, Any], also: list[str]) -> str:
    """The impact's headline, sources, exports, runs and warnings, as console markup."""
    erased = impact["purge"]
    size = sum(int(a.get("size_bytes") or 0) for a in erased)
    subject = str(impact["subject"])
    said = subject == impact["target"]  # the label names the target already; the subject says more only with also
    lines = [
        f"[b]{escape(impact['label'])}[/b]" + ("" if said else f"  subject [i]{escape(subject)}[/i]"),
        f"[red]erase {len(erased)} artifact(s), {human_bytes(size)}[/red]"
        + (" (crypto-erasable)" if impact.get("crypto_erasable") else " [yellow](not all crypto-erasable)[/yellow]")
        + f"   [yellow]keep {len(impact['keep'])} marked 'derived from purged data'[/yellow]"
        + (f"   also: {'everything derived' if 'all' in also else ', '.join(short(a, 8) for a in also)}" if also else ""),
    ]
    if impact["runs"]:
        lines.append(f"runs touched: {escape(', '.join(impact['runs']))}")
    for s in impact["sources"]:
        where = "in the home: overwritten and unlinked" if s["in_home"] else "outside the home: remove it there yourself"
        lines.append(f"source file {escape(s['path'])} ({short(s['digest'])}): {where}")
    for e in impact["exports"]:
        lines.append(f"[red]exported beyond reach:[/red] {short(e['digest'])} to {escape(str(e['destination']))} at {str(e['ts'])[:19]}")
    lines += [f"[yellow]⚠ {escape(w)}[/yellow]" for w in impact["warnings"]]
    if impact["keep"]:
        lines.append("[dim]here: a on a kept row erases it too; the palette's 'also erase everything derived' is --also all[/dim]")
    if impact.get("two_person"):
        lines.append("[b]two-person rule:[/b] data.purge needs a second person's approval (p: the dialog requests it)")
    return "\n".join(lines)


def certificate_text(r: dict[str, Any]) -> str:
    """A purge's certificate (``purge.run`` or ``purge.show``), field by field, as console markup."""
    c = r["certificate"]
    people, media, san, ver = c["person_performing"], c["media"], c["sanitization"], c["verification"]
    approver = (people.get("approved_by") or {}).get("user") or "nobody (no two-person rule)"
    colour = "green" if ver["result"] == "passed" else "red"
    scan = ver.get("marker_scan")
    scanned = (
        escape(scan)
        if isinstance(scan, str)
        else f"{ver.get('markers', 0)} markers searched in {scan['files']} files ({human_bytes(scan['bytes'])}): found in {len(scan['files_with_markers'])}"
        if isinstance(scan, dict)
        else "no marker scan"
    )
    lines = [
        f"[b]Certificate of sanitization {escape(r['purge_id'])}[/b]  ({escape(c['standard'])})",
        "",
        f"[b]requested by[/b]   {escape(people['requested_by']['user'])}",
        f"[b]approved by[/b]    {escape(str(approver))}" + (f" (request {escape(people['approval_request'])})" if people.get("approval_request") else ""),
        f"[b]what[/b]           {escape(media['description'])}: {len(media['artifacts'])} artifact(s), {human_bytes(media['total_bytes'])}",
        *[f"                 {short(a['digest'])}  {escape(str(a['kind'])):<16} {escape(_name(a))}" for a in media["artifacts"]],
        f"[b]method[/b]         {escape(san['method_type'])}: {escape(san['technique'])}",
        f"[b]cipher[/b]         {escape(str(san['cipher']))}, keys wrapped with {escape(str(san['key_wrap']))}",
        f"[b]keys destroyed[/b] {len(san['data_keys_destroyed'])}; {san['bytes_overwritten']} bytes overwritten",
        f"[b]tool[/b]           {escape(san['tool'])} {escape(str(san['tool_version']))}; {san['started']} to {san['completed']}",
        f"[b]verification[/b]   [{colour}]{ver['result']}[/{colour}]: {len(ver.get('key_table_entries_left', []))} key table entries left, "
        f"{len(ver.get('keys_in_memory_left', []))} keys in memory, {ver.get('of_which_decryptable', 0)} files still decryptable",
        f"                 {scanned}",
        f"[b]kept, derived[/b]  {len(c['kept_derived_from_purged_data'])} artifact(s) marked 'derived from purged data'",
        f"[b]beyond reach[/b]   {len(c['exports_beyond_reach'])} export(s)",
        f"[b]media[/b]          {escape(c['post_sanitization'])}",
        f"[b]signed by[/b]      node key {escape(r['key_id'])}",
        f"[b]signature[/b]      {escape(short(r['signature'], 48))}…",
    ]
    if r.get("file"):
        lines.append(f"[b]file[/b]           {escape(str(r['file']))}")
    return "\n".join(lines)


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


# -- the dialogs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PurgeChoice:
    """What the operator decided in the confirm dialog: ``purge`` (with an approval where needed) or ``request``."""

    action: str
    approval: str | None = None
    markers: list[str] = field(default_factory=list)
    reason: str = ""


class ConfirmPurgeScreen(ModalScreen[PurgeChoice | None]):
    """States what is erased irreversibly; purges only once the target's short digest is typed back."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape", "cancel", "Cancel", id="purge.dialog.cancel"),
    ]
    DEFAULT_CSS = """
    ConfirmPurgeScreen { align: center middle; }
    ConfirmPurgeScreen #purge-dialog { width: 100; height: auto; max-height: 95%; border: thick $error; background: $panel; padding: 0 1; }
    ConfirmPurgeScreen #purge-dialog-body { height: auto; max-height: 18; }
    ConfirmPurgeScreen Input { margin: 0; }
    ConfirmPurgeScreen .field { color: $text-muted; }
    ConfirmPurgeScreen #purge-dialog-problem { color: $error; text-style: bold; height: auto; }
    ConfirmPurgeScreen #purge-dialog-buttons { height: 3; align-horizontal: right; }
    ConfirmPurgeScreen #purge-dialog-buttons Button { margin-left: 1; }
    """

    def __init__(self, impact: dict[str, Any], also: list[str], approved: list[str]) -> None:
        super().__init__()
        self.impact, self.also, self.approved = impact, also, approved
        self.expected = confirm_text(impact)
        self.two_person = bool(impact.get("two_person"))

    def compose(self) -> ComposeResult:
        erased = self.impact["purge"]
        size = sum(int(a.get("size_bytes") or 0) for a in erased)
        lines = [
            f"[b red]Purge {escape(self.impact['label'])}: this cannot be undone.[/b red]",
            f"[b]Erased irreversibly[/b] (data keys destroyed, files overwritten and unlinked): {len(erased)} artifact(s), {human_bytes(size)}",
            *[f"  {short(a['digest'])}  {escape(str(a['kind'])):<18} {escape(_name(a))}  {escape(f'[{_how(a)}]')}" for a in erased[:SHOWN_IN_DIALOG]],
        ]
        if len(erased) > SHOWN_IN_DIALOG:
            lines.append(f"  … and {len(erased) - SHOWN_IN_DIALOG} more (see the impact table)")
        if self.impact["keep"]:
            lines.append(f"[b]Kept[/b], marked 'derived from purged data': {len(self.impact['keep'])} artifact(s)")
        lines += [f"[yellow]⚠ {escape(w)}[/yellow]" for w in self.impact["warnings"]]
        with Vertical(id="purge-dialog"):
            with VerticalScroll(id="purge-dialog-body"):
                yield Static("\n".join(lines), id="purge-dialog-impact")
            if self.two_person:
                yield Static(
                    "[b]Two-person rule:[/b] data.purge needs a second person's approval. Request it (an approver decides it in "
                    "Keys & approvals), then come back with the approved request's id.",
                    id="purge-dialog-two-person",
                )
                yield Label("approved request id (req-…)", classes="field")
                yield Input(value=self.approved[0] if self.approved else "", placeholder="req-…", id="purge-approval")
                yield Label("reason for the request (shown to the approver)", classes="field")
                yield Input(placeholder="why this data must go", id="purge-reason")
            yield Label("markers, comma separated: strings you know are in the data (the verification scan looks for them)", classes="field")
            yield Input(placeholder="optional", id="purge-markers")
            yield Label(f"type [b]{self.expected}[/b] to confirm", classes="field", id="purge-confirm-label")
            yield Input(placeholder=self.expected, id="purge-confirm")
            yield Label("", id="purge-dialog-problem")
            with Horizontal(id="purge-dialog-buttons"):
                if self.two_person:
                    yield Button("Request approval", id="purge-request", variant="primary")
                yield Button("Purge", id="purge-confirm-go", variant="error")
                yield Button("Cancel", id="purge-cancel")

    def on_mount(self) -> None:
        self.query_one("#purge-confirm", Input).focus()

    def _problem(self, text: str) -> None:
        self.query_one("#purge-dialog-problem", Label).update(text)

    @on(Button.Pressed, "#purge-confirm-go")
    @on(Input.Submitted, "#purge-confirm")
    def _purge(self) -> None:
        typed = self.query_one("#purge-confirm", Input).value.strip()
        if typed != self.expected:
            self._problem(f"'{typed}' is not '{self.expected}': type it exactly to confirm (nothing was erased)")
            return
        approval = None
        if self.two_person:
            approval = self.query_one("#purge-approval", Input).value.strip() or None
            if approval is None:
                self._problem("the policy needs an approved request id: press Request approval, have it approved, then enter its id")
                return
        markers = [m.strip() for m in self.query_one("#purge-markers", Input).value.split(",") if m.strip()]
        self.dismiss(PurgeChoice("purge", approval=approval, markers=markers))

    @on(Button.Pressed, "#purge-request")
    def _request(self) -> None:
        self.dismiss(PurgeChoice("request", reason=self.query_one("#purge-reason", Input).value.strip()))

    @on(Button.Pressed, "#purge-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class CertificateScreen(ModalScreen[None]):
    """A purge's signed certificate, field by field."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape,q,c", "dismiss", "Close", id="purge.certificate.close"),
    ]
    DEFAULT_CSS = """
    CertificateScreen { align: center middle; }
    CertificateScreen #purge-certificate { width: 110; height: auto; max-height: 90%; border: round $success; background: $panel; padding: 0 1; }
    """

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__()
        self.result = result

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="purge-certificate"):
            yield Static(certificate_text(self.result), id="purge-certificate-text")


# -- the pane ------------------------------------------------------------------------------


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
    DEFAULT_CSS = """
    /* .card's look; the shared .card is height: auto, and a pane's DEFAULT_CSS cannot override the app's sheet. */
    PurgePane .purge-card { border: round $primary 50%; padding: 0 1; }
    PurgePane #purge-top { height: 1fr; }
    PurgePane #purge-targets-box { width: 50; height: 100%; }
    PurgePane #purge-target { margin: 0; }
    PurgePane #purge-targets { height: 1fr; }
    PurgePane #purge-impact-box { width: 1fr; height: 100%; }
    PurgePane #purge-summary-scroll { height: auto; max-height: 9; }
    PurgePane #purge-impact-table { height: 1fr; }
    PurgePane #purge-actions { height: 3; }
    PurgePane #purge-actions Button { margin-right: 1; }
    PurgePane #purge-gate { width: 1fr; height: auto; color: $text-muted; }
    PurgePane #purge-running { height: 1; display: none; }
    PurgePane #purge-running.busy { display: block; }
    PurgePane #purge-progress { width: 30; }
    PurgePane #purge-history-box { height: 8; }
    PurgePane #purge-history { height: 1fr; }
    """

    running: var[bool] = var(False, init=False)  # a purge is under way: the bar shows, the button waits

    def __init__(self) -> None:
        super().__init__()
        self.impact: dict[str, Any] | None = None  # the impact shown: what the dialog confirms
        self.also: list[str] = []  # --also digests (or "all") of the impact shown
        self.approved: list[str] = []  # the caller's approved requests for its subject
        self.certificates: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        with Horizontal(id="purge-top"):
            with Vertical(id="purge-targets-box", classes="purge-card"):
                yield Label("Targets (enter: impact)", classes="title")
                yield Input(placeholder="digest, run:RUN or source:PATH", id="purge-target")
                yield DataTable(id="purge-targets", cursor_type="row", zebra_stripes=True)
            with Vertical(id="purge-impact-box", classes="purge-card"):
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
        with Vertical(id="purge-history-box", classes="purge-card"):
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
        self.refresh_data()

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
            name, kind = escape(_name(a)), escape(a["kind"])
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
            table.add_row(f"[red]{fate}[/red]", a["kind"], _name(a), human_bytes(a.get("size_bytes") or 0), short(a["digest"]), _how(a), key=a["digest"])
        for a in message.impact["keep"]:
            how = "derived: a model cannot be un-trained (a: erase too)" if a["kind"] in MODEL_KINDS else "derived (a: erase too)"
            table.add_row("[yellow]keep, marked[/yellow]", a["kind"], _name(a), human_bytes(a.get("size_bytes") or 0), short(a["digest"]), how, key=a["digest"])
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
