"""The help screen: every key binding (with its id, for the key map) and what each tab is for."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

TABS = """
| key | tab | what it is for |
|---|---|---|
| 1 | Dashboard | service health, node key, policy, air gap, free disk; active runs with progress, loss and ETA; the ledger's last events |
| 2 | Runs | every run, its stages and timings, log tail and metrics; start one from a recipe (every problem shown at once), cancel, resume |
| 3 | Data | a run's dataset card: sources, drops per filter with the dropped samples, PII counts, duplicates |
| 4 | Registry | models and artifacts, lineage as a tree, verify, tag, export (with the approval flow) |
| 5 | Ledger | sandboxed SQL on the ledger, the auditor's canned queries, chain verification and the signed head |
| 6 | Keys & approvals | keys with roles and status, the policy in force, requests you may decide |
| 7 | Purge | pick an artifact, see what its purge would erase and keep, confirm, read the certificate |
| 8 | Chat | sample from a packaged model; base and tuned side by side |
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape,q,question_mark", "dismiss", "Close", id="help.close"),
    ]

    def compose(self) -> ComposeResult:
        rows = ["| key | binding id | does |", "|---|---|---|"]
        for binding in self.app.BINDINGS:
            if isinstance(binding, Binding):
                rows.append(f"| `{binding.key_display or binding.key}` | `{binding.id}` | {binding.description or binding.action} |")
        for pane_bindings in _pane_bindings(self.app):
            rows.append(pane_bindings)
        text = (
            "# appliance console\n\n"
            "Everything here goes through the service, under your role: what your role does not allow is shown disabled, "
            "with the role to ask for.\n\n## Tabs\n"
            + TABS
            + "\n## Keys\n\n"
            + "\n".join(rows)
            + '\n\nRemap any key in `~/.config/appliance/console-keys.toml`: one line per binding, `binding-id = "key"`. '
            "`ctrl+p` opens the command palette."
        )
        with VerticalScroll(id="help"):
            yield Markdown(text)


def _pane_bindings(app: object) -> list[str]:
    from appliance.console.base import ServicePane

    rows = []
    seen = set()
    for pane in app.query(ServicePane):  # type: ignore[attr-defined]
        for binding in getattr(pane, "BINDINGS", []):
            if isinstance(binding, Binding) and binding.id and binding.id not in seen:
                seen.add(binding.id)
                rows.append(f"| `{binding.key_display or binding.key}` | `{binding.id}` | {binding.description or binding.action} |")
    return rows
