"""A run's dataset card as Markdown, as the run wrote it for people (Data tab, key m)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown


class CardMarkdownScreen(ModalScreen[None]):
    """The card as the run wrote it for people (the same figures as the panes' tables)."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape,q", "dismiss", "Close", id="data.markdown.close"),
    ]

    def __init__(self, markdown: str) -> None:
        super().__init__()
        self.markdown = markdown

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="card-md-box"):
            yield Markdown(self.markdown)
