"""Confirm a purge (Purge tab, key p): what is erased irreversibly, and the target's short digest typed back.

Under a two-person rule on data.purge the dialog also takes an approved request's id, or asks
for a request (the pane sends it: ``approvals.request``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from appliance.console.purge_text import confirm_text, how_erased, short_name
from appliance.console.session import human_bytes, short

SHOWN_IN_DIALOG = 8  # artifacts listed by name in the confirm dialog; the rest are counted


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
            *[
                f"  {short(a['digest'])}  {escape(str(a['kind'])):<18} {escape(short_name(a))}  {escape(f'[{how_erased(a)}]')}"
                for a in erased[:SHOWN_IN_DIALOG]
            ],
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
