"""Registry: models and artifacts, a model's lineage as a tree, verify, tag, and export with the approval flow.

Every action goes through the service under the caller's role: verify (``registry.verify``,
``artifact.verify``: artifact.read), tag (``registry.tag``: model.promote), export
(``bundle.export``: model.export, two-person in the default policy). Export is the CLI's
``appliance export MODEL --to DIR`` in a modal: ask for approval (``approvals.request``, the
subject being the model as ``NAME:VERSION``), wait for a second person to approve it
elsewhere (Keys & approvals, or ``appliance approve``), then stream the bundle into a new
folder from a worker, with progress, and check it as the other site will (``verify_bundle``
against this site's root key).
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
from textual.widgets import Button, DataTable, Input, Label, ProgressBar, Select, Static, TabbedContent, TabPane, Tree
from textual.widgets.tree import TreeNode

from appliance.console.base import Gated, Loaded, ServicePane
from appliance.console.session import Session, describe, human_bytes, short
from keys.errors import ApplianceError

NEEDS = "artifact.read"
POLL_S = 3.0  # how often an open export dialog looks for a second person's decision


# -- the core, Textual-free -------------------------------------------------------------------


def matches(row: dict[str, Any], query: str) -> bool:
    """Whether a model or artifact row matches the search: every word in one of its fields."""
    fields = [str(v) for k, v in row.items() if k != "tags"] + list(row.get("tags") or [])
    if "version" in row:
        fields.append(f"{row['name']}:{row['version']}")
    hay = " ".join(fields).lower()
    return all(word in hay for word in query.lower().split())


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


def fill_lineage(tree: Tree[str], result: dict[str, Any]) -> None:
    """The model at the root, its ancestors and descendants below; each artifact shown whole once, at its
    shallowest place (breadth first), and only named again elsewhere (a lineage is a graph, not a tree)."""
    model, nodes = result["model"], result["nodes"]
    parents: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}
    for child, parent in result["edges"]:
        parents.setdefault(child, []).append(parent)
        children.setdefault(parent, []).append(child)

    run = f"{model.get('run_id')}/"

    def label(digest: str) -> str:
        # The model's own run is implied: "checkpoint 75ba2638", not "checkpoint run-…/checkpoint 75ba2638".
        node = nodes.get(digest, {})
        kind, name = node.get("kind", "?"), str(node.get("name", ""))
        name = name.removeprefix(run) if name.startswith(run) else name
        return f"{kind}  {short(digest, 8)}" if name in (kind, "") or name == kind.split("-")[0] else f"{kind}  {name}  {short(digest, 8)}"

    def order(digest: str) -> tuple[str, str]:
        return (nodes.get(digest, {}).get("kind", ""), nodes.get(digest, {}).get("name", ""))

    tree.reset(f"{model['name']}:{model['version']}  {model['kind']}  {short(model['digest'])}", model["digest"])
    for title, links in (("ancestors: what it was made from", parents), ("descendants: what was made from it", children)):
        branch = tree.root.add(title, expand=True)
        seen = {model["digest"]}
        queue: list[tuple[TreeNode[str], str]] = [(branch, model["digest"])]
        while queue:
            node, digest = queue.pop(0)
            for d in sorted(links.get(digest, []), key=order):
                if d in seen:
                    node.add_leaf(f"{label(d)}  [dim](again)[/]", d)
                    continue
                seen.add(d)
                if links.get(d):
                    queue.append((node.add(label(d), d, expand=True), d))
                else:
                    node.add_leaf(label(d), d)
        if not branch.children:
            branch.add_leaf("none")
    tree.root.expand()


# -- messages ---------------------------------------------------------------------------------


class Verified(Message):
    """A verify finished: ``result`` from the service, or ``error`` (what failed, and the fix)."""

    def __init__(self, label: str, result: dict[str, Any] | None, error: BaseException | None) -> None:
        super().__init__()
        self.label, self.result, self.error = label, result, error


class ExportProgress(Message):
    def __init__(self, written: int) -> None:
        super().__init__()
        self.written = written


class ExportFinished(Message):
    def __init__(self, report: dict[str, Any] | None, error: BaseException | None) -> None:
        super().__init__()
        self.report, self.error = report, error


# -- modals -----------------------------------------------------------------------------------


class TagScreen(ModalScreen[tuple[str, bool] | None]):
    """Add (move) or remove a tag of a model: returns (tag, remove), or None when cancelled."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape", "cancel", "Cancel", id="registry.tag.cancel"),
    ]
    DEFAULT_CSS = """
    TagScreen { align: center middle; }
    TagScreen #tag-box { width: 72; height: auto; border: round $accent; background: $panel; padding: 0 1; }
    TagScreen #tag-buttons { height: 3; }
    TagScreen #tag-buttons Button { margin-right: 1; }
    """

    def __init__(self, ref: str, tags: list[str]) -> None:
        super().__init__()
        self.ref, self.tags = ref, tags

    def compose(self) -> ComposeResult:
        with Vertical(id="tag-box"):
            yield Label(f"Tag {self.ref}", classes="title")
            yield Static(
                f"tags now: {', '.join(self.tags) or 'none'}\n"
                "A tag points at one version of a name: adding it here moves it from any other version. Recorded in the ledger."
            )
            yield Input(placeholder="tag, e.g. production (lower-case letters, digits, - and _)", id="tag-name")
            with Horizontal(id="tag-buttons"):
                yield Button("Add", id="tag-add", variant="primary")
                yield Button("Remove", id="tag-remove", variant="error")
                yield Button("Cancel", id="tag-cancel")

    def on_mount(self) -> None:
        self.query_one("#tag-name", Input).focus()

    def _done(self, remove: bool) -> None:
        tag = self.query_one("#tag-name", Input).value.strip()
        if not tag:
            self.app.report_message("give a tag name", "e.g. production")  # type: ignore[attr-defined]
            return
        self.dismiss((tag, remove))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._done(remove=False)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "tag-cancel":
            self.dismiss(None)
        else:
            self._done(remove=event.button.id == "tag-remove")

    def action_cancel(self) -> None:
        self.dismiss(None)


class ExportScreen(ModalScreen[dict[str, Any] | None]):
    """Export one model: the approval (where the policy asks for one), a new folder, progress, the check."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape", "close", "Close", id="registry.export.close"),
    ]
    DEFAULT_CSS = """
    ExportScreen { align: center middle; }
    ExportScreen #export-box { width: 108; height: auto; max-height: 100%; border: round $accent; background: $panel; padding: 0 1; }
    ExportScreen #export-ask, ExportScreen #export-buttons { height: 3; }
    ExportScreen #export-reason { width: 1fr; }
    ExportScreen #export-approval { width: 100%; }
    ExportScreen Button { margin-left: 1; }
    ExportScreen #export-progress { margin: 1 0 0 0; }
    ExportScreen .muted { color: $text-muted; }
    """

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
        self.query_one("#export-dest", Input).focus()

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
        lines = [f"{r['id']} waiting for {' or '.join(r['approvers'])} since {str(r['requested_at'])[:16]}" for r in self.pending]
        used = sum(r["status"] in ("executed", "denied", "expired", "failed") for r in mine)
        if used:
            lines.append(f"{used} earlier request(s) used, denied or expired")
        self.query_one("#export-requests", Static).update("\n".join(lines) or "no request of yours is waiting")

    # -- export ------------------------------------------------------------------------------

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


# -- the pane ---------------------------------------------------------------------------------

MODEL_COLUMNS = ("name", "version", "kind", "tags", "digest", "signer", "recorded")
ARTIFACT_COLUMNS = ("kind", "name", "digest", "size")


class RegistryPane(ServicePane):
    """Models and artifacts; the selected one's detail and lineage; verify, tag, export."""

    NEEDS = NEEDS
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("slash", "search", "Search", id="registry.search", key_display="/"),
        Binding("s", "switch", "Models/artifacts", id="registry.switch"),
        Binding("v", "verify", "Verify", id="registry.verify"),
        Binding("t", "tag", "Tag", id="registry.tag"),
        Binding("x", "export", "Export", id="registry.export"),
        Binding("l", "lineage", "Lineage", id="registry.lineage"),
    ]
    PALETTE: ClassVar[list[tuple[str, str, str]]] = [
        ("Registry: search", "filter models and artifacts by name, kind, tag or digest (/ on the Registry tab)", "palette_search"),
        ("Registry: verify selected", "check the selected model or artifact end to end (v)", "palette_verify"),
        ("Registry: tag selected model", "add, move or remove a tag (t; needs model.promote)", "palette_tag"),
        ("Registry: export selected model", "a signed bundle for another site, with the approval flow (x; needs model.export)", "palette_export"),
        ("Registry: lineage of selected model", "what the model was made from and what was made from it (l)", "palette_lineage"),
    ]
    DEFAULT_CSS = """
    RegistryPane #reg-top { height: 3; }
    RegistryPane #reg-search { width: 1fr; }
    RegistryPane #reg-gates { color: $text-muted; padding: 0 1; height: auto; }
    RegistryPane #reg-lists { height: 11; }
    RegistryPane #reg-bottom { height: 1fr; }
    RegistryPane .box { border: round $primary 50%; padding: 0 1; width: 1fr; height: 100%; }
    RegistryPane #reg-detail { height: auto; }
    RegistryPane #reg-result { height: auto; margin-top: 1; }
    RegistryPane #reg-lineage { height: 1fr; }
    RegistryPane #reg-denied { margin: 1 2; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.models: list[dict[str, Any]] = []
        self.artifacts: list[dict[str, Any]] = []
        self.query_text = ""
        self.selected: tuple[str, dict[str, Any]] | None = None  # ("model" | "artifact", its row)
        self.detail: dict[str, Any] | None = None  # registry.show of the selected model
        self.verified: tuple[str, bool, str] | None = None  # (what, ok, text): the last verify (tests read it)

    def compose(self) -> ComposeResult:
        reason = self.session.grants.reason(NEEDS)
        if reason:
            yield Static(f"[b]The registry is not yours to read[/b]\n{escape(reason)}", id="reg-denied", classes="card")
            return
        with Horizontal(id="reg-top"):
            yield Input(placeholder="search models and artifacts: name, kind, tag, digest   (/)", id="reg-search")
            yield Gated("Verify", NEEDS, id="reg-verify")
            yield Gated("Tag…", "model.promote", id="reg-tag")
            yield Gated("Export…", "model.export", id="reg-export")
        yield Static(self._gates(), id="reg-gates")
        with Vertical(id="reg-lists"):
            with TabbedContent(id="reg-tabs"):
                with TabPane("Models", id="reg-models-tab"):
                    yield DataTable(id="reg-models", cursor_type="row", zebra_stripes=True)
                with TabPane("Artifacts", id="reg-artifacts-tab"):
                    yield DataTable(id="reg-artifacts", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="reg-bottom"):
            with Vertical(id="reg-detail-box", classes="box"):
                yield Label("Detail", classes="title")
                yield Static("select a model or an artifact", id="reg-detail")
                yield Static("", id="reg-result")
            with Vertical(id="reg-lineage-box", classes="box"):
                yield Label("Lineage   l: focus, enter: fold", classes="title")
                yield Tree[str]("select a model", id="reg-lineage")

    def _gates(self) -> str:
        grants = self.session.grants
        lines = [f"{what}: {grants.reason(perm)}" for what, perm in (("Tag", "model.promote"), ("Export", "model.export")) if grants.reason(perm)]
        if grants.allows("model.export") and grants.needs_approval("model.export"):
            lines.append("Export: model.export needs a second person's approval under the policy (the dialog asks for it)")
        return "\n".join(lines)

    def on_mount(self) -> None:
        if not self.allowed(NEEDS):
            return
        self.query_one("#reg-models", DataTable).add_columns(*MODEL_COLUMNS)
        self.query_one("#reg-lineage", Tree).show_root = True
        self.refresh_data()

    def on_show(self) -> None:
        # Shown by its tab's key: take the focus, so this pane's keys work at once.
        if self.allowed(NEEDS) and (self.app.focused is None or self not in self.app.focused.ancestors):
            self._active_table().focus()

    def refresh_data(self) -> None:
        if not self.allowed(NEEDS):
            return
        calls: dict[str, tuple[str, dict[str, Any]]] = {"models": ("registry.list", {}), "artifacts": ("artifact.list", {})}
        if self.selected and self.selected[0] == "model":
            ref = _key(*self.selected)
            calls |= {"show": ("registry.show", {"ref": ref}), "lineage": ("registry.lineage", {"ref": ref})}
        # One worker for all of it: a second call of the same group now would cancel the first before it ran.
        self.load_many(calls)

    # -- lists -------------------------------------------------------------------------------

    def on_loaded(self, message: Loaded) -> None:
        key, result = message.key, message.result
        if key == "models":
            self.models = result
            self._fill_models()
        elif key == "artifacts":
            self.artifacts = result
            self._fill_artifacts()
        elif key == "show" and self._is_selected(result["digest"]):
            self.detail = result
            self._show_model(result)
        elif key == "lineage" and self._is_selected(result["model"]["digest"]):
            fill_lineage(self.query_one("#reg-lineage", Tree), result)
        elif key == "tagged":
            verb = "removed from" if result["version"] is None else "now points at"
            version = result["version"] if result["version"] is not None else result["previous_version"]
            self.refresh_data()
            self._result(f"[green]tag {result['tag']} {verb} {result['name']}:{version}[/]")

    def _is_selected(self, digest: str) -> bool:
        return self.selected is not None and self.selected[1]["digest"] == digest

    def _fill_models(self) -> None:
        table = self.query_one("#reg-models", DataTable)
        table.clear()
        rows = [r for r in self.models if matches(r, self.query_text)]
        for r in rows:
            table.add_row(
                r["name"],
                str(r["version"]),
                r["kind"],
                ", ".join(r.get("tags") or []),
                short(r["digest"], 16),
                short(r.get("signer"), 12),
                str(r.get("ts") or "")[:19],
                key=f"{r['name']}:{r['version']}",
            )
        self._count("reg-models-tab", "Models", len(rows), len(self.models))
        self._after_fill(table, "model", {f"{r['name']}:{r['version']}": r for r in rows})

    def _fill_artifacts(self) -> None:
        table = self.query_one("#reg-artifacts", DataTable)
        # A status column only where the service names one (purged, derived from purged data, …).
        status = any("status" in r for r in self.artifacts)
        table.clear(columns=True)
        table.add_columns(*ARTIFACT_COLUMNS, *(("status",) if status else ()))
        rows = [r for r in self.artifacts if matches(r, self.query_text)]
        for r in rows:
            cells = [r["kind"], r["name"], short(r["digest"], 16), human_bytes(r.get("size_bytes") or 0)]
            table.add_row(*cells, *((str(r.get("status") or ""),) if status else ()), key=r["digest"])
        self._count("reg-artifacts-tab", "Artifacts", len(rows), len(self.artifacts))
        self._after_fill(table, "artifact", {r["digest"]: r for r in rows})

    def _count(self, pane_id: str, title: str, shown: int, total: int) -> None:
        label = f"{title} ({shown})" if shown == total else f"{title} ({shown} of {total})"
        self.query_one("#reg-tabs", TabbedContent).get_tab(pane_id).label = label

    def _after_fill(self, table: DataTable[Any], kind: str, rows: dict[str, dict[str, Any]]) -> None:
        """Keep the cursor on the selected row when it is still shown; else select the first row of the active list."""
        if self.selected and self.selected[0] == kind:
            key = _key(*self.selected)
            if key in rows:
                table.move_cursor(row=table.get_row_index(key))
                return
        if table is self._active_table():
            if rows:
                table.move_cursor(row=0)
                first = next(iter(rows.values()))
                if not (self.selected and _key(*self.selected) == _key(kind, first)):
                    self._select(kind, first)
            else:
                self._clear_selection()

    def default_focus(self) -> DataTable[Any] | None:
        return self._active_table() if self.allowed(NEEDS) else None

    def _active_table(self) -> DataTable[Any]:
        tabs = self.query_one("#reg-tabs", TabbedContent)
        return self.query_one("#reg-artifacts" if tabs.active == "reg-artifacts-tab" else "#reg-models", DataTable)

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "reg-search":
            self.query_text = event.value
            self._fill_models()
            self._fill_artifacts()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "reg-search":
            self._active_table().focus()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        kind = {"reg-models": "model", "reg-artifacts": "artifact"}.get(event.data_table.id or "")
        # A hidden list highlights its first row as it fills: only the list shown selects.
        if kind is None or event.row_key.value is None or event.data_table is not self._active_table():
            return
        source = self.models if kind == "model" else self.artifacts
        row = next((r for r in source if _key(kind, r) == event.row_key.value), None)
        if row is not None and not (self.selected and _key(*self.selected) == _key(kind, row)):
            self._select(kind, row)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.tabbed_content.id != "reg-tabs":
            return
        event.stop()
        table = self._active_table()
        kind = "artifact" if table.id == "reg-artifacts" else "model"
        if table.row_count:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            source = self.models if kind == "model" else self.artifacts
            row = next((r for r in source if _key(kind, r) == key), None)
            if row is not None:
                self._select(kind, row)

    # -- the selected item -------------------------------------------------------------------

    def _select(self, kind: str, row: dict[str, Any]) -> None:
        self.selected, self.detail = (kind, row), None
        self._result("")
        tree = self.query_one("#reg-lineage", Tree)
        if kind == "model":
            ref = f"{row['name']}:{row['version']}"
            self.query_one("#reg-detail", Static).update(f"[b]{escape(ref)}[/b]  loading…")
            tree.reset(f"{ref}: loading its lineage…")
            self.load_many({"show": ("registry.show", {"ref": ref}), "lineage": ("registry.lineage", {"ref": ref})})
        else:
            self.query_one("#reg-detail", Static).update(
                f"[b]{escape(row['name'])}[/b]  {row['kind']}\n"
                f"digest {short(row['digest'], 48)}…\n"
                f"size   {human_bytes(row.get('size_bytes') or 0)}\n"
                f"run    {row.get('run_id') or '—'}"
            )
            tree.reset(f"{row['kind']}  {short(row['digest'])}")
            tree.root.add_leaf("lineage is kept for models (s: the Models list)")
            tree.root.expand()

    def _clear_selection(self) -> None:
        self.selected = self.detail = None
        self.query_one("#reg-detail", Static).update("nothing matches the search" if self.query_text else "select a model or an artifact")
        self.query_one("#reg-lineage", Tree).reset("select a model")

    def _show_model(self, m: dict[str, Any]) -> None:
        moves = [f"  seq {h['seq']} {h['tag']} → v{h['version'] if h['version'] is not None else ' (removed)'} by {h['actor']}" for h in m["tag_history"][-4:]]
        notice = f"\n[yellow]{escape(m['purge_notice'])}[/]" if m.get("purge_notice") else ""
        self.query_one("#reg-detail", Static).update(
            f"[b]{escape(m['name'])}:{m['version']}[/b]  {m['kind']}   tags: {', '.join(m['tags']) or 'none'}\n"
            f"digest {short(m['digest'], 48)}…\n"
            f"run    {m.get('run_id') or '—'}   size {human_bytes(m.get('size_bytes') or 0)}\n"
            f"signed by node key {short(m['signer'], 16)}…, recorded by {m['recorded_by']} at {str(m['ts'])[:19]}\n"
            f"made from {len(m['parents'])} artifacts (see the lineage)" + ("\ntag moves:\n" + "\n".join(moves) if moves else "") + notice
        )

    def _result(self, text: str) -> None:
        self.query_one("#reg-result", Static).update(text)

    def _selected_model(self) -> dict[str, Any] | None:
        if self.selected is None or self.selected[0] != "model":
            self.console.report_message("select a model first", "the Models list (s switches lists); tags and exports are for models")
            return None
        return self.selected[1]

    def _refuse(self, permission: str) -> bool:
        """True (and say why) when the caller's role does not allow ``permission``."""
        reason = self.session.grants.reason(permission)
        if reason:
            self.console.report_message(reason)
        return bool(reason)

    # -- actions -----------------------------------------------------------------------------

    def on_button_pressed(self, event: Button.Pressed) -> None:
        action = {"reg-verify": self.action_verify, "reg-tag": self.action_tag, "reg-export": self.action_export}.get(event.button.id or "")
        if action is not None:
            event.stop()
            action()

    def action_search(self) -> None:
        if self.allowed(NEEDS):
            self.query_one("#reg-search", Input).focus()

    def action_switch(self) -> None:
        if self.allowed(NEEDS):
            tabs = self.query_one("#reg-tabs", TabbedContent)
            tabs.active = "reg-artifacts-tab" if tabs.active == "reg-models-tab" else "reg-models-tab"
            self._active_table().focus()

    def action_lineage(self) -> None:
        if self.allowed(NEEDS):
            tree = self.query_one("#reg-lineage", Tree)
            tree.root.expand_all()
            tree.focus()

    def action_verify(self) -> None:
        if self._refuse(NEEDS) or self.selected is None:
            return
        kind, row = self.selected
        label = f"{row['name']}:{row['version']}" if kind == "model" else f"{row['kind']} {short(row['digest'])}"
        self._result(f"verifying {escape(label)}…")
        self._verify(kind, row, label)

    @work(thread=True, exclusive=True, exit_on_error=False, group="registry-verify")
    def _verify(self, kind: str, row: dict[str, Any], label: str) -> None:
        try:
            if kind == "model":
                result = self.session.call("registry.verify", ref=f"{row['name']}:{row['version']}")
            else:
                result = self.session.call("artifact.verify", digest=row["digest"])
        except Exception as exc:  # a failed check is the answer: shown on the pane, and by the one handler
            self.post_message(Verified(label, None, exc))
            return
        self.post_message(Verified(label, result, None))

    def on_verified(self, message: Verified) -> None:
        if message.error is not None:
            what, fix = describe(message.error)
            text = f"[red]✗ {escape(message.label)} FAILED verification:[/] {escape(what)}" + (f"\n[b]fix:[/b] {escape(fix)}" if fix else "")
            self.verified = (message.label, False, what)
            self.console.report(message.error)
        else:
            r = message.result or {}
            checked = ", ".join(r.get("checked") or []) or ("purged: " + r["message"] if r.get("purged") else f"digest and ledger record (seq {r.get('seq')})")
            text = f"[green]✓ {escape(message.label)} verified OK[/]: {escape(checked)}"
            self.verified = (message.label, True, checked)
        self._result(text)

    def action_tag(self) -> None:
        if self._refuse("model.promote") or (model := self._selected_model()) is None:
            return
        ref = f"{model['name']}:{model['version']}"

        def tagged(answer: tuple[str, bool] | None) -> None:
            if answer is not None:
                tag, remove = answer
                self._result(f"{'removing' if remove else 'adding'} tag {escape(tag)}…")
                self.load("tagged", "registry.tag", ref=ref, tag=tag, remove=remove or None)

        self.app.push_screen(TagScreen(ref, list(model.get("tags") or [])), tagged)

    def action_export(self) -> None:
        if self._refuse("model.export") or (model := self._selected_model()) is None:
            return

        def exported(report: dict[str, Any] | None) -> None:
            if report is not None:
                self._result(summary(report))

        self.app.push_screen(ExportScreen(model, two_person=self.session.grants.needs_approval("model.export")), exported)

    # The palette runs commands from any tab: show this one first.
    def _palette(self, action: Callable[[], None]) -> None:
        self.console.action_show_tab("registry")
        action()

    def palette_search(self) -> None:
        self._palette(self.action_search)

    def palette_verify(self) -> None:
        self._palette(self.action_verify)

    def palette_tag(self) -> None:
        self._palette(self.action_tag)

    def palette_export(self) -> None:
        self._palette(self.action_export)

    def palette_lineage(self) -> None:
        self._palette(self.action_lineage)


def _key(kind: str, row: dict[str, Any]) -> str:
    return f"{row['name']}:{row['version']}" if kind == "model" else str(row["digest"])
