"""The documents one filter rule dropped in a run (Data tab, enter or d on a drop row).

The dialog loads them itself (``data.dropped``, in its own worker): the samples the curation
kept of what the rule dropped, each shown from its start, enough to see why it was dropped.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, LoadingIndicator, Static

from appliance.console.base import Loaded

SAMPLES = 20  # documents shown per rule: enough to judge a rule, few enough to read
SHOWN_CHARS = 1200  # of each document; the CLI's `appliance data dropped --full` prints them whole
SHOWN_LINES = 16


class DroppedScreen(ModalScreen[None]):
    """The documents one filter rule dropped in a run, loaded by this screen's own worker."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape,q", "dismiss", "Close", id="data.dropped.close"),
    ]

    def __init__(self, run_id: str, filter_name: str, rule: str | None, total: int) -> None:
        super().__init__()
        self.run_id, self.filter_name, self.rule, self.total = run_id, filter_name, rule, total
        self.samples: list[dict[str, Any]] | None = None  # None until loaded (tests wait on it)

    @property
    def what(self) -> str:
        return f"{self.filter_name}.{self.rule}" if self.rule else self.filter_name

    def compose(self) -> ComposeResult:
        with Vertical(id="dropped-box"):
            yield Label(f"Documents dropped by {self.what} in {self.run_id} ({self.total:,} in all)", classes="title")
            yield Label("escape: close   up/down, page up/down: scroll", id="dropped-keys")
            yield LoadingIndicator(id="dropped-loading")
            yield VerticalScroll(id="dropped-samples")

    def on_mount(self) -> None:
        self._load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="dropped")
    def _load(self) -> None:
        try:
            result = self.app.session.call("data.dropped", run=self.run_id, filter=self.filter_name, rule=self.rule, limit=SAMPLES)  # type: ignore[attr-defined]
        except Exception as exc:  # shown by the app's one handler, with its fix
            self.app.call_from_thread(self.app.report, exc)  # type: ignore[attr-defined]
            result = {"samples": [], "error": True}
        self.post_message(Loaded("dropped", result))

    def on_loaded(self, message: Loaded) -> None:
        self.query_one("#dropped-loading").display = False
        rows: list[dict[str, Any]] = message.result.get("samples", [])
        box = self.query_one("#dropped-samples", VerticalScroll)
        if not rows and not message.result.get("error"):
            box.mount(Static("No samples were kept for this rule (the recipe's clean.dropped_samples is 0, or it dropped nothing)."))
        for row in rows:
            text = _excerpt(row["text"])
            detail = f" ({row['detail']})" if row.get("detail") else ""
            head = f"[b]doc {row['doc_id']}[/b]  {escape(str(row['source']))}  [i]{row['filter']}.{row['rule']}{escape(detail)}[/i]"
            box.mount(Static(f"{head}\n{escape(text)}", classes="dropped-doc"))
        if len(rows) < self.total:
            box.mount(Label(f"{len(rows)} of {self.total:,} shown; all of them: appliance data dropped {self.run_id} --filter {self.filter_name} --limit N"))
        self.samples = rows
        box.focus()


def _excerpt(text: str) -> str:
    """The start of a document, blank runs folded: enough to see why a rule dropped it."""
    lines = [line.rstrip() for line in text.splitlines()]
    folded = [line for i, line in enumerate(lines) if line or (i and lines[i - 1])]
    out = "\n".join(folded[:SHOWN_LINES])
    return out[:SHOWN_CHARS] + (" …" if len(out) > SHOWN_CHARS or len(folded) > SHOWN_LINES else "")
