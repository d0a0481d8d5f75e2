"""Export a model as a signed bundle for another site (Registry tab, key x), with the approval flow.

The CLI's ``appliance export MODEL --to DIR`` in a dialog: where the policy makes model.export
two-person, ask for approval (``approvals.request``, the subject being the model as
``NAME:VERSION``) and wait for a second person to approve it elsewhere (Keys & approvals, or
``appliance approve``); then stream the bundle (``bundle.export``) into a new folder from a
worker, with progress, and check it as the other site will (``verify_bundle`` against this
site's root key).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, ProgressBar, Select, Static

from appliance.console.base import Loaded
from appliance.console.session import Session, describe, human_bytes, short
from keys.errors import ApplianceError

POLL_S = 3.0  # how often an open export dialog looks for a second person's decision


def export_bundle(session: Session, model: str, approval: str | None, target: Path, progress: Callable[[int], None]) -> dict[str, Any]:
    """Write ``model``'s signed bundle into the new folder ``target`` (as `appliance export --to` does), then
    verify it against this site's root key, as the other site will; the report has ``verified`` and ``path``."""
    from keys.keystore import public_key_from_pem
    from registry.bundle import unpack_bundle, verify_bundle

    target = target.expanduser().resolve()
    if target.exists():
        raise ApplianceError(f"{target} already exists", "export into a new folder")
    if not target.parent.is_dir():
        raise ApplianceError(f"{target.parent} is not a folder", "create it first, or give another destination")
    fd, name = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tar", dir=target.parent)
    partial = Path(name)
    try:
        written = 0
        with os.fdopen(fd, "wb") as sink:
            for chunk in session.stream("bundle.export", model=model, approval=approval):
                sink.write(chunk)
                written += len(chunk)
                progress(written)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            unpack_bundle(partial, staging)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        partial.unlink(missing_ok=True)
    reason = session.grants.reason("keys.read")
    if reason:
        return {"path": str(target), "verified": False, "why": f"not checked here: {reason}; check it with `appliance verify {target} --root-key ROOT.pub.pem`"}
    trust = session.call("keys.list")
    root = next(k for k in trust["keys"] if k["role"] == "root" and k["key_id"] == trust["root_key_id"])
    report = verify_bundle(target, public_key_from_pem(root["public_key_pem"].encode("ascii")), root_source="this site's root key")
    return {**{k: v for k, v in report.items() if k != "statement"}, "path": str(target), "verified": True}


class ExportProgress(Message):
    def __init__(self, written: int) -> None:
        super().__init__()
        self.written = written


class ExportFinished(Message):
    def __init__(self, report: dict[str, Any] | None, error: BaseException | None) -> None:
        super().__init__()
        self.report, self.error = report, error


class ExportScreen(ModalScreen[dict[str, Any] | None]):
    """Export one model: the approval (where the policy asks for one), a new folder, progress, the check."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape", "close", "Close", id="registry.export.close"),
    ]

    def __init__(self, model: dict[str, Any], *, two_person: bool) -> None:
        super().__init__()
        self.model, self.two_person = model, two_person
        self.ref = f"{model['name']}:{model['version']}"
        self.approved: dict[str, dict[str, Any]] = {}
        self.pending: list[dict[str, Any]] = []
        self.report: dict[str, Any] | None = None  # the finished export (tests read it)
        self.busy = False

    def compose(self) -> ComposeResult:
        with Vertical(id="export-box"):
            yield Label(f"Export {self.ref} ({short(self.model['digest'], 16)}…) as a signed bundle for another site", classes="title")
            if self.two_person:
                yield Static(
                    "model.export needs a second person under the policy: request approval here, have a release-manager or admin approve it "
                    "(Keys & approvals, tab 6, or `appliance approve ID`), then export with it. An approval is used once.",
                    classes="muted",
                )
                yield Label("Your approved requests for this model", classes="title")
                yield Select[str]([], prompt="none approved yet", id="export-approval", allow_blank=True)
                yield Static("", id="export-requests")
                with Horizontal(id="export-ask"):
                    yield Input(placeholder="why (shown to the approver, recorded)", id="export-reason")
                    yield Button("Request approval", id="export-request")
                    yield Button("Reload", id="export-reload")
            yield Label("Destination: a new folder", classes="title")
            yield Input(str(_default_destination(self.model)), id="export-dest")
            yield ProgressBar(id="export-progress", total=None, show_eta=False)
            yield Static("", id="export-status")
            with Horizontal(id="export-buttons"):
                yield Button("Export", id="export-go", variant="primary")
                yield Button("Close", id="export-close")

    def on_mount(self) -> None:
        if self.two_person:
            self._load_approvals()
            self.set_interval(POLL_S, self._poll)
        self.query_one("#export-progress", ProgressBar).display = False  # shown while an export runs
        # Under the two-person rule the first thing to do is to ask (until an approval arrives).
        self.query_one("#export-reason" if self.two_person else "#export-dest", Input).focus()

    @property
    def session(self) -> Session:
        return self.app.session  # type: ignore[attr-defined]

    def _status(self, text: str) -> None:
        self.query_one("#export-status", Static).update(text)

    # -- approvals ---------------------------------------------------------------------------

    def _poll(self) -> None:
        if self.pending and not self.busy:
            self._load_approvals()

    @work(thread=True, exclusive=True, exit_on_error=False, group="export-approvals")
    def _load_approvals(self) -> None:
        try:
            self.post_message(Loaded("approvals", self.session.call("approvals.list")))
        except Exception as exc:  # shown by the app's one handler, with its fix
            self.app.call_from_thread(self.app.report, exc)  # type: ignore[attr-defined]

    @work(thread=True, exclusive=True, exit_on_error=False, group="export-request")
    def _request(self, reason: str) -> None:
        try:
            req = self.session.call("approvals.request", action="model.export", subject=self.ref, reason=reason or None)
        except Exception as exc:
            self.app.call_from_thread(self.app.report, exc)  # type: ignore[attr-defined]
            return
        self.post_message(Loaded("requested", req))

    def on_loaded(self, message: Loaded) -> None:
        if message.key == "requested":
            req = message.result
            self._status(f"requested {req['id']}: ask a {' or '.join(req['approvers'])} to approve it (tab 6, or `appliance approve {req['id']}`)")
            self._load_approvals()
        elif message.key == "approvals":
            self._approvals(message.result)

    def _approvals(self, rows: list[dict[str, Any]]) -> None:
        me = self.session.grants.user
        mine = [
            r for r in rows if r["action"] == "model.export" and r.get("model_digest") == self.model["digest"] and (r.get("requester") or {}).get("user") == me
        ]
        self.approved = {r["id"]: r for r in mine if r["status"] == "approved"}
        self.pending = [r for r in mine if r["status"] == "pending"]
        select = self.query_one("#export-approval", Select)
        keep = select.value
        select.set_options([(f"{rid}  approved by {r['decided_by']}, expires {str(r['expires_at'])[:16]}", rid) for rid, r in self.approved.items()])
        if keep in self.approved:
            select.value = keep
        elif self.approved:
            select.value = next(iter(self.approved))
        reason = self.query_one("#export-reason", Input)
        if self.approved and self.focused is reason and not reason.value:
            self.query_one("#export-go", Button).focus()  # approved: exporting is what is left to do
        lines = [f"{r['id']} waiting for {' or '.join(r['approvers'])} since {str(r['requested_at'])[:16]}" for r in self.pending]
        used = sum(r["status"] in ("executed", "denied", "expired", "failed") for r in mine)
        if used:
            lines.append(f"{used} earlier request(s) used, denied or expired")
        self.query_one("#export-requests", Static).update("\n".join(lines) or "no request of yours is waiting")

    # -- export ------------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        # Enter does what the field is for: the reason asks for approval, the destination exports.
        event.stop()
        if event.input.id == "export-reason":
            self._request(event.value.strip())
        elif event.input.id == "export-dest":
            self.start_export()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        button = event.button.id
        if button == "export-close":
            self.action_close()
        elif button == "export-reload":
            self._load_approvals()
        elif button == "export-request":
            self._request(self.query_one("#export-reason", Input).value.strip())
        elif button == "export-go":
            self.start_export()

    def start_export(self) -> None:
        if self.busy:
            return
        approval: str | None = None
        model = self.ref
        if self.two_person:
            chosen = self.query_one("#export-approval", Select).value
            if chosen is Select.NULL or chosen not in self.approved:
                self.app.report_message(  # type: ignore[attr-defined]
                    f"{self.ref} is exported only with an approved request (model.export is two-person)", "press Request approval, and have it approved"
                )
                return
            approval = str(chosen)
            model = self.approved[approval]["subject"]  # the subject the approval names, exactly
        dest = self.query_one("#export-dest", Input).value.strip()
        if not dest:
            self.app.report_message("give a destination folder", "a new folder, e.g. ./bundle")  # type: ignore[attr-defined]
            return
        self.busy = True
        self.query_one("#export-go", Button).disabled = True
        self.query_one("#export-progress", ProgressBar).display = True
        self._status(f"exporting {model} to {dest}…")
        self._export(model, approval, Path(dest))

    @work(thread=True, exclusive=True, exit_on_error=False, group="export")
    def _export(self, model: str, approval: str | None, target: Path) -> None:
        def progress(written: int) -> None:
            self.post_message(ExportProgress(written))

        try:
            report = export_bundle(self.session, model, approval, target, progress)
        except Exception as exc:  # what failed goes on the dialog and to the app's one handler
            self.post_message(ExportFinished(None, exc))
            return
        self.post_message(ExportFinished(report, None))

    def on_export_progress(self, message: ExportProgress) -> None:
        self._status(f"receiving the bundle: {human_bytes(message.written)}")

    def on_export_finished(self, message: ExportFinished) -> None:
        self.busy = False
        bar = self.query_one("#export-progress", ProgressBar)
        if message.error is not None:
            what, fix = describe(message.error)
            self._status(f"[red]✗ export failed:[/] {escape(what)}" + (f"\n[b]fix:[/b] {escape(fix)}" if fix else ""))
            self.query_one("#export-go", Button).disabled = False
            bar.update(total=1, progress=0)
            self.app.report(message.error)  # type: ignore[attr-defined]
            if self.two_person:
                self._load_approvals()
            return
        self.report = message.report or {}
        bar.update(total=1, progress=1)
        self._status(summary(self.report))
        self.query_one("#export-go", Button).disabled = False
        if self.two_person:
            self._load_approvals()  # the approval is used now

    def action_close(self) -> None:
        if self.busy:
            self.app.report_message("the export is still running", "wait for it to finish; closing would leave a partial file")  # type: ignore[attr-defined]
            return
        self.dismiss(self.report)


def summary(report: dict[str, Any]) -> str:
    """How a finished export reads: where it went, and what the check proved (or why it was not run)."""
    if not report.get("verified"):
        return f"[yellow]exported to {escape(report['path'])}[/]\n{escape(report.get('why', ''))}"
    m = report["model"]
    return (
        f"[green]✓ exported {m['name']}:{m['version']} to {escape(report['path'])}; the bundle verifies[/]\n"
        f"signed by release key {short(report['release_key_id'], 16)}…; {report['files']} files, {report['dependencies']} dependencies, "
        f"ledger excerpt to seq {report['head_seq']}"
    )


def _default_destination(model: dict[str, Any]) -> Path:
    base = Path.cwd() / f"{model['name']}-{model['version']}-bundle"
    n = 2
    path = base
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path
