"""Add (move) or remove a tag of a model (Registry tab, key t)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static


class TagScreen(ModalScreen[tuple[str, bool] | None]):
    """Add (move) or remove a tag of a model: returns (tag, remove), or None when cancelled."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape", "cancel", "Cancel", id="registry.tag.cancel"),
    ]

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
