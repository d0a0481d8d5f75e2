"""`appliance console`: the operator's window on the appliance, a client of the service alone.

One tab per part of the day (dashboard, runs, data, registry, ledger, keys and approvals,
purge, chat), each a `ServicePane` in its own module (its dialogs in modules of their own),
its styles in ``styles/<tab>.tcss``. Keyboard first: every binding has an id (remap them in
``~/.config/appliance/console-keys.toml``, ``binding-id = "key"``), the footer shows them,
``?`` opens the help, ``ctrl+p`` the command palette with the console's own commands.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.widgets import Footer, Header, TabbedContent, TabPane

from appliance.console.base import ServicePane
from appliance.console.session import Session, describe

KEYMAP = Path("~/.config/appliance/console-keys.toml")


def _panes() -> list[tuple[str, str, str, Callable[[], ServicePane]]]:
    """(id, title, key, factory) of every tab, in order."""
    from appliance.console.admin import AdminPane
    from appliance.console.chat import ChatPane
    from appliance.console.dashboard import DashboardPane
    from appliance.console.data import DataPane
    from appliance.console.ledger import LedgerPane
    from appliance.console.purge import PurgePane
    from appliance.console.registry import RegistryPane
    from appliance.console.runs import RunsPane

    return [
        ("dashboard", "Dashboard", "1", DashboardPane),
        ("runs", "Runs", "2", RunsPane),
        ("data", "Data", "3", DataPane),
        ("registry", "Registry", "4", RegistryPane),
        ("ledger", "Ledger", "5", LedgerPane),
        ("admin", "Keys & approvals", "6", AdminPane),
        ("purge", "Purge", "7", PurgePane),
        ("chat", "Chat", "8", ChatPane),
    ]


class ConsoleCommands(Provider):
    """The console's own commands in the palette: every tab, refresh, help."""

    def _commands(self) -> list[tuple[str, str, Callable[[], Any]]]:
        app: ConsoleApp = self.app  # type: ignore[assignment]
        out: list[tuple[str, str, Callable[[], Any]]] = [
            (f"Go to {title}", f"show the {title} tab (key {key})", partial(app.action_show_tab, tab)) for tab, title, key, _ in _panes()
        ]
        out += [
            ("Refresh", "reload what the current tab shows (key r)", app.action_refresh),
            ("Help", "keys and what each tab does (key ?)", app.action_help),
        ]
        for name, help_text, callback in app.pane_commands():
            out.append((name, help_text, callback))
        return out

    async def discover(self) -> Hits:
        for name, help_text, callback in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, callback in self._commands():
            if (score := matcher.match(name)) > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)


class ConsoleApp(App[None]):
    """The operator console."""

    TITLE = "appliance console"
    # The shared sheet, one per tab named by its id (the pane's dialogs with it), the help screen's.
    CSS_PATH = ["styles/console.tcss", *[f"styles/{tab}.tcss" for tab, *_ in _panes()], "styles/help.tcss"]
    COMMANDS = App.COMMANDS | {ConsoleCommands}
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("q", "quit", "Quit", id="console.quit"),
        Binding("question_mark", "help", "Help", id="console.help", key_display="?"),
        Binding("r", "refresh", "Refresh", id="console.refresh"),
        *[Binding(key, f"show_tab('{tab}')", title, show=False, id=f"console.tab.{tab}") for tab, title, key, _ in _panes()],
    ]

    def __init__(self, session: Session, *, keymap: Path | None = KEYMAP, clock: bool = True) -> None:
        super().__init__()
        self.session = session
        self.clock = clock  # off in snapshot tests: a screen that shows the time never matches
        self.errors: list[tuple[str, str]] = []  # every error shown, for the help screen's history and tests
        self._keymap_path = keymap

    def compose(self) -> ComposeResult:
        yield Header(show_clock=self.clock)
        with TabbedContent(id="tabs"):
            for tab, title, key, factory in _panes():
                with TabPane(f"{key} {title}", id=tab):
                    yield factory()
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.session.where
        self._apply_keymap()

    def _apply_keymap(self) -> None:
        if self._keymap_path is None:
            return
        path = self._keymap_path.expanduser()
        try:
            keymap = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, tomllib.TOMLDecodeError) as exc:
            self.report_message(f"the key map {path} cannot be read: {exc}", 'fix the file: one line per binding, binding-id = "key"')
            return
        self.set_keymap({str(k): str(v) for k, v in keymap.items()})

    # -- errors: one handler, every error the same way ---------------------------------------

    def report(self, exc: BaseException) -> None:
        what, fix = describe(exc)
        self.report_message(what, fix)

    def report_message(self, what: str, fix: str = "") -> None:
        self.errors.append((what, fix))
        self.notify(f"{what}\n[b]fix:[/b] {fix}" if fix else what, title="error", severity="error", timeout=12)

    # -- actions ------------------------------------------------------------------------------

    def action_show_tab(self, tab: str) -> None:
        # Drop the focus first: else Textual hands it to a sibling inside the pane being hidden,
        # and TabbedContent switches back to that pane.
        self.screen.set_focus(None)
        self.query_one("#tabs", TabbedContent).active = tab
        # Focus moves into the pane, so its own keys work at once (not the tab bar's).
        self.call_after_refresh(self._focus_pane)

    def _focus_pane(self) -> None:
        if (pane := self.current_pane()) is None:
            return
        if self.focused is not None and pane in self.focused.ancestors_with_self:
            return  # the pane chose its own focus when shown
        if (chosen := pane.default_focus()) is not None and chosen.focusable:
            chosen.focus()
            return
        for widget in pane.query("*"):
            if widget.focusable:
                widget.focus()
                return

    def current_pane(self) -> ServicePane | None:
        tabs = self.query_one("#tabs", TabbedContent)
        active = tabs.active_pane
        if active is None:
            return None
        found = active.query(ServicePane)
        return found.first() if found else None

    def action_refresh(self) -> None:
        if (pane := self.current_pane()) is not None:
            pane.refresh_data()

    def action_help(self) -> None:
        from appliance.console.help import HelpScreen

        self.push_screen(HelpScreen())

    def pane_commands(self) -> list[tuple[str, str, Callable[[], Any]]]:
        """Commands the panes offer to the palette (``COMMANDS_FOR_PALETTE`` on a pane: (name, help, method name))."""
        out = []
        for pane in self.query(ServicePane):
            for name, help_text, method in getattr(pane, "PALETTE", ()):
                out.append((name, help_text, getattr(pane, method)))
        return out
