"""Registry: models and artifacts, a model's lineage as a tree, verify, tag, and export with the approval flow.

Every action goes through the service under the caller's role: verify (``registry.verify``,
``artifact.verify``: artifact.read), tag (``registry.tag``: model.promote, the dialog in
`registry_tag`), export (``bundle.export``: model.export, two-person in the default policy; the
dialog and the approval flow in `registry_export`). The lineage tree is filled by
`registry_lineage.fill_lineage`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Input, Label, Static, TabbedContent, TabPane, Tree

from appliance.console.base import Gated, Loaded, ServicePane, reveal
from appliance.console.registry_export import ExportScreen, summary
from appliance.console.registry_lineage import fill_lineage
from appliance.console.registry_tag import TagScreen
from appliance.console.session import describe, human_bytes, short

NEEDS = "artifact.read"


# -- the core, Textual-free -------------------------------------------------------------------


def matches(row: dict[str, Any], query: str) -> bool:
    """Whether a model or artifact row matches the search: every word in one of its fields."""
    fields = [str(v) for k, v in row.items() if k != "tags"] + list(row.get("tags") or [])
    if "version" in row:
        fields.append(f"{row['name']}:{row['version']}")
    hay = " ".join(fields).lower()
    return all(word in hay for word in query.lower().split())


# -- messages ---------------------------------------------------------------------------------


class Verified(Message):
    """A verify finished: ``result`` from the service, or ``error`` (what failed, and the fix)."""

    def __init__(self, label: str, result: dict[str, Any] | None, error: BaseException | None) -> None:
        super().__init__()
        self.label, self.result, self.error = label, result, error


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
            with Vertical(id="reg-detail-box", classes="card"):
                yield Label("Detail", classes="title")
                yield Static("select a model or an artifact", id="reg-detail")
                yield Static("", id="reg-result")
            with Vertical(id="reg-lineage-box", classes="card"):
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
        reveal(self)
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
