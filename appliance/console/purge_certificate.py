"""A purge's signed certificate, field by field (Purge tab: after a purge, or c on a past one)."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from appliance.console.purge_text import certificate_text


class CertificateScreen(ModalScreen[None]):
    """A purge's signed certificate, field by field."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape,q,c", "dismiss", "Close", id="purge.certificate.close"),
    ]

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__()
        self.result = result

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="purge-certificate"):
            yield Static(certificate_text(self.result), id="purge-certificate-text")
