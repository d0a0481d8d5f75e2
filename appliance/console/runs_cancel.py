"""Are you sure: cancel a queued or running run (Runs tab, key c)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


class ConfirmCancelScreen(ModalScreen[bool]):
    """Are you sure: a cancelled run stops (training checkpoints first) and can be resumed."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("y", "answer(True)", "Cancel the run", id="runs.cancel.yes"),
        Binding("n,escape", "answer(False)", "Keep it", id="runs.cancel.no"),
    ]

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
