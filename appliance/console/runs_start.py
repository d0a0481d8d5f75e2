"""Start a run (Runs tab, key s): the recipe file and an optional corpus folder, checked before anything starts.

The recipe is checked here first, as `appliance recipe check` does, so every problem of the
file shows in the dialog at once instead of one at a time from the service; only a clean
recipe is sent (``run.start``, by the pane).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from keys.errors import ApplianceError

# -- the recipe check, without the UI (the dialog runs it in a worker) -------------------------


@dataclass
class RecipeCheck:
    """What checking a recipe file found: its absolute path, the corpus folder, every problem."""

    recipe: str
    source: str | None
    problems: list[str] = field(default_factory=list)
    summary: str = ""


def check_recipe(recipe: str, source: str | None = None) -> RecipeCheck:
    """Check ``recipe`` as `appliance recipe check` does (every table, across tables, against this
    machine) and that its corpus folder exists; every problem is collected, none raised."""
    from appliance.recipe import load_recipe
    from appliance.recipe_checks import Machine, recipe_summary, summary_text
    from pipeline.errors import ConfigError

    # The service reads the file by its path, from its own working folder: send it absolute.
    path = Path(recipe).expanduser().resolve()
    folder = str(Path(source).expanduser().resolve()) if source else None
    out = RecipeCheck(recipe=str(path), source=folder)
    machine = Machine.here()
    try:
        loaded = load_recipe(path, machine=machine, read_base=True)
    except ConfigError as exc:
        out.problems = [p.line() for p in exc.problems] or [f"{exc.message}; {exc.hint}" if exc.hint else exc.message]
        return out
    if loaded.recipe.finetune is None:
        try:
            out.source = str(loaded.source_dir(Path(folder) if folder else None))
        except ConfigError as exc:
            out.problems.append(f"{exc.message}; {exc.hint}".replace("--source", "the source folder"))
    try:
        out.summary = summary_text(recipe_summary(loaded.recipe, machine, loaded.path.parent))
    except ApplianceError as exc:
        out.problems.append(f"{exc.message}; {exc.hint}")
    return out


# -- the dialog ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartRequest:
    """What the dialog returns: a clean recipe's absolute path and its corpus folder (None: the recipe's own)."""

    recipe: str
    source: str | None
    context: dict[str, Any] | None = None  # the demo corpus's provenance (Python version, digest), as `appliance demo` gives it


def demo_folder() -> Path:
    """Where the console builds the demo corpus: as `appliance demo` does over the socket, in the
    working folder (the service reads it as the caller could), else the home folder."""
    here = Path.cwd()
    return (here if os.access(here, os.W_OK) else Path.home()) / ".appliance-demo"


class StartRunScreen(ModalScreen["StartRequest | None"]):
    """Start a run: the recipe file and an optional corpus folder, checked before anything starts."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape", "dismiss_none", "Close", id="runs.start.close"),
    ]

    class Checked(Message):
        def __init__(self, check: RecipeCheck, start: bool) -> None:
            super().__init__()
            self.check, self.start = check, start

    class DemoReady(Message):
        def __init__(self, request: dict[str, Any]) -> None:
            super().__init__()
            self.request = request

    def __init__(self, recipe: str = "", source: str = "") -> None:
        super().__init__()
        self._recipe, self._source = recipe, source
        self.last: RecipeCheck | None = None  # the last check shown (tests read it)
        self.demo: dict[str, Any] | None = None  # the demo's run.start parameters, once built

    def compose(self) -> ComposeResult:
        with Vertical(id="start-box"):
            yield Label("Start a run", classes="title")
            yield Label("Recipe file (a path on the appliance: the service reads it)")
            yield Input(self._recipe, placeholder="/path/to/recipe.toml", id="start-recipe")
            yield Label("Corpus folder (optional: else the recipe's \\[recipe] source, relative to the recipe)")
            yield Input(self._source, placeholder="/path/to/corpus", id="start-source")
            yield Static("Check shows every problem of the recipe at once; Start checks first and starts only a clean recipe.", id="start-problems")
            with Horizontal(id="start-buttons"):
                yield Button("Demo recipe", id="start-demo")
                yield Button("Check", id="start-check")
                yield Button("Start", id="start-go", variant="primary")
                yield Button("Close", id="start-close")

    def on_mount(self) -> None:
        self.query_one("#start-recipe", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._check(start=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "start-close":
            self.dismiss(None)
        elif event.button.id == "start-demo":
            self._show([f"building the demo corpus from this Python's standard-library docs in {demo_folder()}…"], bad=False)
            self._build_demo()
        else:
            self._check(start=event.button.id == "start-go")

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    def _check(self, *, start: bool) -> None:
        recipe = self.query_one("#start-recipe", Input).value.strip()
        if not recipe:
            self._show(["no recipe file given; type the path of a recipe TOML file"], bad=True)
            return
        self._show(["checking the recipe…"], bad=False)
        self._run_check(recipe, self.query_one("#start-source", Input).value.strip() or None, start)

    @work(thread=True, exclusive=True, exit_on_error=False, group="recipe-check")
    def _run_check(self, recipe: str, source: str | None, start: bool) -> None:
        # Reading the file and asking nvidia-smi about this machine's GPUs may take a moment.
        try:
            check = check_recipe(recipe, source)
        except Exception as exc:  # every error is shown by the one handler, with its fix
            self.app.call_from_thread(self.app.report, exc)  # type: ignore[attr-defined]
            return
        self.post_message(self.Checked(check, start))

    @work(thread=True, exclusive=True, exit_on_error=False, group="demo-corpus")
    def _build_demo(self) -> None:
        # Reading every stdlib module's docstrings takes a few seconds the first time.
        from appliance.demo import demo_request

        try:
            request = demo_request(demo_folder())
        except Exception as exc:  # shown by the one handler, with its fix
            self.app.call_from_thread(self.app.report, exc)  # type: ignore[attr-defined]
            return
        self.post_message(self.DemoReady(request))

    def on_start_run_screen_demo_ready(self, message: StartRunScreen.DemoReady) -> None:
        self.demo = message.request
        self.query_one("#start-recipe", Input).value = self.demo["recipe"]
        self.query_one("#start-source", Input).value = self.demo["source"]
        corpus = self.demo["context"]["corpus"]
        self._show(
            [f"the demo: {corpus['documents']} documents ({corpus['bytes']:,} bytes) of Python {corpus['python']}'s docs; press Start"],
            bad=False,
        )
        self.query_one("#start-go", Button).focus()

    def on_start_run_screen_checked(self, message: StartRunScreen.Checked) -> None:
        check = self.last = message.check
        if check.problems:
            count = f"{len(check.problems)} problem{'s' if len(check.problems) > 1 else ''}"
            self._show([f"{check.recipe}: {count}, nothing started:", *[f"  • {p}" for p in check.problems]], bad=True)
            return
        if message.start:
            # The demo's provenance goes with it while the fields still name the demo.
            named = self.demo and (check.recipe, check.source) == (str(Path(self.demo["recipe"]).resolve()), str(Path(self.demo["source"]).resolve()))
            demo = self.demo if named else None
            self.dismiss(StartRequest(recipe=check.recipe, source=check.source, context=demo["context"] if demo else None))
            return
        self._show([f"{check.recipe}: ok", check.summary, f"corpus {check.source}" if check.source else ""], bad=False)

    def _show(self, lines: list[str], *, bad: bool) -> None:
        box = self.query_one("#start-problems", Static)
        box.set_class(bad, "bad")
        box.update(Text("\n".join(line for line in lines if line)))
