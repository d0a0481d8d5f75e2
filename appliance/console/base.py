"""What every console pane shares: service calls in worker threads, typed results, gated controls.

A pane never blocks the UI thread on the service. `ServicePane.load` runs ``Session.call`` in
a thread worker (thread=True, exclusive=True, exit_on_error=False, one group per key, so a
newer request for the same thing replaces an older one) and posts a `Loaded`
message back, which the pane handles in ``on_loaded`` by its key; an error goes to the app's
one error handler (`ConsoleApp.report`), which shows every error the same way, with its fix.

A pane loads nothing until its tab is shown, and loads again each time it is shown
(`ServicePane.on_show` calls ``refresh_data``): the console starts with the dashboard's calls
only, a tab never opened costs nothing, and a tab comes back showing what is true now. Panes
that poll do so only while `shown` (every call is a decision the service records in the
ledger: a hidden tab must not fill it).

`Gated` controls (buttons) stay visible when the caller's role does not allow their action:
disabled, with the reason and whom to ask in their tooltip and the status line.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from textual import work
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Button, TabPane
from textual.worker import get_current_worker

from appliance.console.session import Session

if TYPE_CHECKING:
    from appliance.console.app import ConsoleApp


class Loaded(Message):
    """A service call finished: ``key`` names what was asked, ``result`` is the service's answer."""

    def __init__(self, key: str, result: Any) -> None:
        super().__init__()
        self.key = key
        self.result = result


class Streamed(Message):
    """One event of a streamed operation (``run.events``), in order."""

    def __init__(self, key: str, event: Any) -> None:
        super().__init__()
        self.key = key
        self.event = event


class ServicePane(Widget):
    """A pane of the console: loads from the service in workers, refreshes on demand."""

    # Permission a caller needs to see anything here; the pane shows the reason otherwise.
    NEEDS: str | None = None
    # What takes the focus when the pane's tab is shown (a selector); else its first focusable widget.
    FOCUS: str | None = None

    def on_show(self) -> None:
        # Load on sight, every time: Textual calls this after a subclass's own on_show (handlers
        # run along the MRO), so a pane that takes the focus when shown does so before it loads.
        self.refresh_data()

    def shown(self) -> bool:
        """Whether the pane is on the screen the operator sees now (its tab shown, no dialog over it)."""
        return self.is_mounted and self.screen is self.app.screen and self.is_on_screen

    @property
    def console(self) -> ConsoleApp:
        return self.app  # type: ignore[return-value]

    @property
    def session(self) -> Session:
        return self.console.session

    def load(self, key: str, op: str, **params: Any) -> None:
        """Call ``op`` in a worker; the result arrives as ``Loaded(key, result)``.

        One exclusive group per key: a newer request for the same key replaces an older one,
        and requests for different keys run side by side.
        """
        self.run_worker(partial(self._call, key, op, params), thread=True, exclusive=True, group=f"load:{key}", exit_on_error=False)

    def _call(self, key: str, op: str, params: dict[str, Any]) -> None:
        try:
            result = self.session.call(op, **params)
        except Exception as exc:  # every error is shown by the one handler, with its fix
            self.console.call_from_thread(self.console.report, exc)
            return
        self.post_message(Loaded(key, result))

    def load_many(self, calls: dict[str, tuple[str, dict[str, Any]]]) -> None:
        """Several calls in one worker (``{key: (op, params)}``), each posted as it finishes."""
        group = "load-many:" + ",".join(sorted(calls))
        self.run_worker(partial(self._call_many, calls), thread=True, exclusive=True, group=group, exit_on_error=False)

    def _call_many(self, calls: dict[str, tuple[str, dict[str, Any]]]) -> None:
        for key, (op, params) in calls.items():
            try:
                result = self.session.call(op, **params)
            except Exception as exc:
                self.console.call_from_thread(self.console.report, exc)
                continue
            self.post_message(Loaded(key, result))

    def follow(self, key: str, op: str, **params: Any) -> None:
        """Read a streamed operation in a worker; each event arrives as ``Streamed(key, event)``."""
        self._follow(key, op, params)

    @work(thread=True, exit_on_error=False, exclusive=True, group="follow")
    def _follow(self, key: str, op: str, params: dict[str, Any]) -> None:
        worker = get_current_worker()
        try:
            for event in self.session.stream(op, **params):
                if worker.is_cancelled:
                    return
                self.post_message(Streamed(key, event))
        except Exception as exc:
            if not worker.is_cancelled:
                self.console.call_from_thread(self.console.report, exc)

    def default_focus(self) -> Widget | None:
        """What takes the focus when the pane's tab is shown: ``FOCUS`` (a selector), else the first focusable widget."""
        if self.FOCUS is not None:
            found = self.query(self.FOCUS)
            return found.first() if found else None
        return None

    def refresh_data(self) -> None:
        """Reload what the pane shows (bound to r in every pane)."""

    def allowed(self, permission: str) -> bool:
        return self.session.grants.allows(permission)


def reveal(pane: ServicePane) -> None:
    """Show the tab holding ``pane`` (a palette command may come from another tab)."""
    for ancestor in pane.ancestors:
        if isinstance(ancestor, TabPane) and ancestor.id:
            pane.console.action_show_tab(ancestor.id)
            return


class Gated(Button):
    """A button for an action under ``permission``: disabled with the reason when the caller lacks it."""

    def __init__(self, label: str, permission: str, *, id: str | None = None, variant: str = "default") -> None:
        super().__init__(label, id=id, variant=variant)  # type: ignore[arg-type]
        self.permission = permission
        self.reason = ""

    def on_mount(self) -> None:
        grants = self.app.session.grants  # type: ignore[attr-defined]
        self.reason = grants.reason(self.permission)
        if self.reason:
            self.disabled = True
            self.tooltip = self.reason
        elif grants.needs_approval(self.permission):
            self.tooltip = f"{self.permission} needs a second person's approval under the policy"
