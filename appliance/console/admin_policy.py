"""The signed policy file itself, read-only, in a dialog (Keys & approvals, key p)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import TextArea


class PolicyTextScreen(ModalScreen[None]):
    """The signed policy file itself, to read every rule (two-person rules, descriptions)."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape,q", "dismiss", "Close", id="policy-text.close"),
    ]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        yield TextArea(self.text, language="toml", read_only=True, id="policy-text")
