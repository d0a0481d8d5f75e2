"""Chat: sample from a packaged model, and a fine-tune beside its base on the same prompt.

Generation is ``model.generate`` (the service verifies the model, then samples in a child
job), so the pane only picks the model, checks the sampling settings with the job's own
checks (`SampleConfig`, every bad field said at once, inline) and shows the answers. A
fine-tune of a packaged model is found the way the ledger records it: its run's base stage
records the base's files as ``base-model-file`` artifacts named ``base:<dir>/<file>``, and a
stored base's directory is its digest in the store. Where the registry holds such a pair the
"compare" mode sends the same prompt to both and shows the answers in two columns; where it
does not, compare stays visible, disabled, saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Input, Label, LoadingIndicator, RichLog, Select

from appliance.console.base import Gated, ServicePane
from appliance.console.session import short

PERMISSION = "model.use"
# The service's bound on one request (``appliance.service.models.MAX_NEW_TOKENS``; a test keeps
# them equal): the sampler's own bound is larger, and the service refuses past this one.
SERVICE_MAX_NEW_TOKENS = 4096
# (field, label, default as typed, parser): the CLI's defaults, so the console samples as `appliance generate` does.
FIELDS: tuple[tuple[str, str, str, type], ...] = (
    ("temperature", "temperature", "0.8", float),
    ("top_p", "top-p", "1.0", float),
    ("top_k", "top-k", "50", int),
    ("max_new_tokens", "max new tokens", "64", int),
    ("seed", "seed", "1337", int),
)
_BASE_FILE = re.compile(r"base:([0-9a-f]{64})/")


# -- Textual-free helpers: settings and fine-tune pairs --------------------------------------


def parse_sample(typed: dict[str, str]) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """(the ``sample`` dict for model.generate, or None; {field: problem}) for the settings as typed.

    Each field is checked on its own with the generation job's own checks, so every bad field
    is named at once, not the first one only.
    """
    from pipeline.settings.generate import SampleConfig

    sample: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name, label, _, parse in FIELDS:
        text = typed.get(name, "").strip()
        try:
            value = parse(text)
        except ValueError:
            problems[name] = f"{label}: {text!r} is not {'a whole number' if parse is int else 'a number'}"
            continue
        try:
            SampleConfig(**{name: value})
        except ValueError as exc:
            problems[name] = f"{label}: {str(exc).removeprefix(name).strip()}"
            continue
        if name == "max_new_tokens" and not 1 <= value <= SERVICE_MAX_NEW_TOKENS:
            problems[name] = f"{label}: must be 1 to {SERVICE_MAX_NEW_TOKENS} (the service's bound on one request), got {value}"
            continue
        sample[name] = value
    return (None if problems else sample), problems


def fine_tune_bases(models: list[dict[str, Any]], base_files: list[dict[str, Any]]) -> dict[str, str]:
    """{tuned model digest: base model digest} for every packaged model fine-tuned from another packaged model.

    ``models``: ``registry.list`` rows; ``base_files``: ``artifact.list`` rows of kind ``base-model-file``.
    """
    packaged = {m["digest"] for m in models if m["kind"] == "model"}
    base_of_run: dict[str, str] = {}
    for f in base_files:
        found = _BASE_FILE.match(str(f["name"]))
        if found and found.group(1) in packaged and f.get("run_id"):
            base_of_run[f["run_id"]] = found.group(1)
    out: dict[str, str] = {}
    for m in models:
        base = base_of_run.get(m.get("run_id") or "")
        if m["kind"] == "model" and base is not None and base != m["digest"]:
            out[m["digest"]] = base
    return out


def label_of(model: dict[str, Any]) -> str:
    tags = f" @{','.join(model['tags'])}" if model.get("tags") else ""
    return f"{model['name']}:{model['version']}{tags}"


@dataclass(frozen=True)
class Pair:
    """A fine-tune and its base: what compare sends the prompt to."""

    base: str
    tuned: str


def pair_for(digest: str, bases: dict[str, str], order: list[str]) -> Pair | None:
    """The base/tuned pair the model ``digest`` belongs to (its newest fine-tune, if it is a base)."""
    if digest in bases:
        return Pair(bases[digest], digest)
    tuned = [t for t in order if bases.get(t) == digest]
    return Pair(digest, tuned[-1]) if tuned else None


# -- messages from the workers -------------------------------------------------------------


class ModelsLoaded(Message):
    def __init__(self, models: list[dict[str, Any]], bases: dict[str, str]) -> None:
        super().__init__()
        self.models, self.bases = models, bases


class Answered(Message):
    """One model's answer (``result``: model.generate's), for the log ``column``; None when it failed."""

    def __init__(self, column: str, label: str, result: dict[str, Any] | None, last: bool) -> None:
        super().__init__()
        self.column, self.label, self.result, self.last = column, label, result, last


# -- the pane ------------------------------------------------------------------------------


class ChatPane(ServicePane):
    """Pick a model, set the sampling, send a prompt; base and tuned side by side where there is a fine-tune."""

    NEEDS = "artifact.read"  # to list the models; sending needs model.use, shown disabled without it
    FOCUS = "#chat-prompt"  # press 8 and type: the prompt takes it (ctrl+o and ctrl+g reach the rest)
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("ctrl+s", "send", "Send", id="chat.send"),
        Binding("ctrl+t", "toggle_compare", "Compare", id="chat.compare"),
        Binding("ctrl+o", "pick_model", "Model", id="chat.model"),
        Binding("ctrl+g", "settings", "Sampling", id="chat.settings"),
        Binding("ctrl+l", "clear", "Clear", id="chat.clear"),
    ]
    PALETTE: ClassVar[list[tuple[str, str, str]]] = [
        ("Chat: send the prompt", "sample from the model picked (ctrl+s, Chat tab)", "action_send"),
        ("Chat: compare base and tuned", "send the same prompt to a fine-tune and its base (ctrl+t, Chat tab)", "action_toggle_compare"),
        ("Chat: pick a model", "the packaged models of the registry (ctrl+o, Chat tab)", "action_pick_model"),
        ("Chat: clear the conversation", "empty the logs; nothing of a chat is kept anyway (ctrl+l, Chat tab)", "action_clear"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, dict[str, Any]] = {}  # digest -> registry row, oldest first
        self.bases: dict[str, str] = {}  # tuned digest -> base digest
        self.compare = False
        self.busy = False

    def compose(self) -> ComposeResult:
        with Vertical(id="chat-settings", classes="card"):
            with Horizontal(id="chat-fields"):
                with Vertical(id="chat-model-box"):
                    yield Label("model (ctrl+o)")
                    yield Select[str]([], prompt="no packaged model yet", id="chat-model", allow_blank=True)
                for name, label, default, _ in FIELDS:
                    with Vertical():
                        yield Label(label)
                        yield Input(value=default, id=f"chat-{name.replace('_', '-')}")
            yield Label("", id="chat-problems", classes="-empty")
        with Horizontal(id="chat-logs"):
            yield RichLog(id="chat-log", wrap=True, markup=True, min_width=20)
            yield RichLog(id="chat-log-tuned", wrap=True, markup=True, min_width=20)
        with Horizontal(id="chat-compose"):
            yield Input(placeholder="prompt: the model continues it (enter or ctrl+s sends)", id="chat-prompt")
            yield Gated("Send", PERMISSION, id="chat-send", variant="primary")
            yield Button("Compare: off", id="chat-compare")
        with Horizontal(id="chat-status-row"):
            yield LoadingIndicator(id="chat-busy")
            yield Label("", id="chat-status")

    def on_mount(self) -> None:
        self.query_one("#chat-log", RichLog).border_title = "conversation"
        self.query_one("#chat-log-tuned", RichLog).border_title = "tuned"
        self._update_controls()

    # -- models ------------------------------------------------------------------------------

    def refresh_data(self) -> None:
        if not self.allowed("artifact.read"):
            self._status(f"no model list: {self.session.grants.reason('artifact.read')}")
            return
        self._load_models()

    @work(thread=True, exclusive=True, exit_on_error=False, group="chat-models")
    def _load_models(self) -> None:
        try:
            models = [m for m in self.session.call("registry.list") if m["kind"] == "model"]
            base_files = self.session.call("artifact.list", kind="base-model-file")
        except Exception as exc:  # every error is shown by the one handler, with its fix
            self.console.call_from_thread(self.console.report, exc)
            return
        self.post_message(ModelsLoaded(models, fine_tune_bases(models, base_files)))

    def on_models_loaded(self, message: ModelsLoaded) -> None:
        self.models = {m["digest"]: m for m in sorted(message.models, key=lambda m: m["seq"])}
        self.bases = message.bases
        select: Select[str] = self.query_one("#chat-model", Select)
        before = select.value
        options = []
        for digest, m in self.models.items():
            role = " (fine-tune)" if digest in self.bases else (" (base of a fine-tune)" if digest in self.bases.values() else "")
            options.append((f"{label_of(m)}{role}  {short(digest, 8)}", digest))
        select.set_options(options)
        if before in self.models:
            select.value = before
        elif self.models:
            select.value = next(reversed(self.models))  # the newest model
        self._update_controls()

    def _selected(self) -> str | None:
        value = self.query_one("#chat-model", Select).value
        return value if isinstance(value, str) and value in self.models else None

    def _pair(self) -> Pair | None:
        digest = self._selected()
        return pair_for(digest, self.bases, list(self.models)) if digest else None

    # -- what may be done, said where it is ----------------------------------------------------

    def compare_reason(self) -> str:
        """Why compare is disabled for the model picked ("" when it is not)."""
        if self.session.grants.reason(PERMISSION):
            return self.session.grants.reason(PERMISSION)
        digest = self._selected()
        if digest is None:
            return "no packaged model is picked"
        if self._pair() is None:
            return (
                f"no fine-tune of {label_of(self.models[digest])} is in the registry: compare needs one "
                f'(`appliance finetune RECIPE` with base = "model:{short(digest, 16)}")'
            )
        return ""

    def _update_controls(self) -> None:
        reason = self.session.grants.reason(PERMISSION)
        send = self.query_one("#chat-send", Button)
        send.disabled = bool(reason) or self.busy
        why_not = self.compare_reason()
        if why_not and self.compare:
            self._set_compare(False)
        button = self.query_one("#chat-compare", Button)
        button.disabled = bool(why_not)
        button.tooltip = why_not or "send the same prompt to the fine-tune and its base"
        if reason:
            self._status(f"[b]send disabled:[/b] {escape(reason)}")
        elif why_not:
            self._status(f"[b]compare disabled:[/b] {escape(why_not)}")
        elif self.compare:
            pair = self._pair()
            if pair is not None:
                self._status(f"compare: base {label_of(self.models[pair.base])} | tuned {label_of(self.models[pair.tuned])}")
        else:
            self._status("ctrl+t: compare this model with its fine-tune")

    def _status(self, text: str) -> None:
        self.query_one("#chat-status", Label).update(text)

    @on(Select.Changed, "#chat-model")
    def _model_changed(self) -> None:
        self._update_controls()
        self._titles()

    # -- settings, checked as typed ------------------------------------------------------------

    def _typed(self) -> dict[str, str]:
        return {name: self.query_one(f"#chat-{name.replace('_', '-')}", Input).value for name, *_ in FIELDS}

    def check_settings(self) -> dict[str, Any] | None:
        """The sample dict, or None with every problem shown under the settings (and the bad fields marked)."""
        sample, problems = parse_sample(self._typed())
        for name, *_ in FIELDS:
            self.query_one(f"#chat-{name.replace('_', '-')}", Input).set_class(name in problems, "-invalid")
        shown = self.query_one("#chat-problems", Label)
        shown.update("\n".join(escape(p) for p in problems.values()))
        shown.set_class(not problems, "-empty")
        return sample

    @on(Input.Changed)
    def _setting_changed(self, event: Input.Changed) -> None:
        if event.input.id != "chat-prompt":
            self.check_settings()

    # -- send --------------------------------------------------------------------------------

    @on(Input.Submitted, "#chat-prompt")
    @on(Button.Pressed, "#chat-send")
    def action_send(self) -> None:
        reason = self.session.grants.reason(PERMISSION)
        if reason:
            self.console.report_message(f"send is disabled: {reason}", "")
            return
        if self.busy:
            self._status("an answer is on its way: wait for it before sending again")
            return
        sample = self.check_settings()
        prompt = self.query_one("#chat-prompt", Input).value
        digest = self._selected()
        if sample is None:
            self._status("[b]not sent:[/b] fix the sampling settings marked above")
            return
        if digest is None:
            self._status("[b]not sent:[/b] pick a packaged model first (ctrl+o)")
            return
        if not prompt.strip():
            self._status("[b]not sent:[/b] write a prompt first")
            return
        targets: list[tuple[str, str, str]]  # (column, label, digest)
        pair = self._pair() if self.compare else None
        if pair is not None:
            targets = [("base", label_of(self.models[pair.base]), pair.base), ("tuned", label_of(self.models[pair.tuned]), pair.tuned)]
        else:
            targets = [("main", label_of(self.models[digest]), digest)]
        for column, _, _ in targets:
            self._log(column).write(f"[bold cyan]you ›[/] {escape(prompt)}")
        self.query_one("#chat-prompt", Input).value = ""
        self.busy = True
        self.query_one("#chat-busy").add_class("busy")
        self._update_controls()
        self._status(f"sampling from {', '.join(label for _, label, _ in targets)} (the service verifies the model, then samples)…")
        self._generate(targets, prompt, sample)

    @work(thread=True, exclusive=True, exit_on_error=False, group="chat-generate")
    def _generate(self, targets: list[tuple[str, str, str]], prompt: str, sample: dict[str, Any]) -> None:
        for i, (column, label, digest) in enumerate(targets):
            last = i == len(targets) - 1
            try:
                result = self.session.call("model.generate", model=digest, prompts=[prompt], sample=sample)
            except Exception as exc:  # every error is shown by the one handler, with its fix
                self.console.call_from_thread(self.console.report, exc)
                self.post_message(Answered(column, label, None, last))
                continue
            self.post_message(Answered(column, label, result, last))

    def on_answered(self, message: Answered) -> None:
        log = self._log(message.column)
        r = message.result
        if r is None:
            log.write(f"[bold red]{escape(message.label)} ›[/] [red]no answer: see the error[/]\n")
        else:
            answer = r["results"][0]
            text = answer["text"]
            shown = escape(text) if text.strip() else "[dim](only whitespace)[/dim]"
            log.write(f"[bold green]{escape(message.label)} ›[/] {escape(answer['prompt'])}[bold]{shown}[/bold]")
            log.write(
                f"[dim]{answer['new_tokens']} new tokens in {r['seconds']:.2f} s on {escape(str(r['device']))}"
                f"{', stopped at end of text' if answer.get('stopped_at_eos') else ''}; {escape(str(r['verified']))}[/dim]\n"
            )
        if message.last:
            self.busy = False
            self.query_one("#chat-busy").remove_class("busy")
            self._update_controls()

    def _log(self, column: str) -> RichLog:
        return self.query_one("#chat-log-tuned" if column == "tuned" else "#chat-log", RichLog)

    # -- compare, model, clear ---------------------------------------------------------------

    @on(Button.Pressed, "#chat-compare")
    def action_toggle_compare(self) -> None:
        why_not = self.compare_reason()
        if why_not and not self.compare:
            self._status(f"[b]compare disabled:[/b] {escape(why_not)}")
            return
        self._set_compare(not self.compare)
        self._update_controls()

    def _set_compare(self, compare: bool) -> None:
        self.compare = compare
        self.query_one("#chat-logs").set_class(compare, "compare")
        self.query_one("#chat-compare", Button).label = f"Compare: {'on' if compare else 'off'}"
        self._titles()

    def _titles(self) -> None:
        pair = self._pair() if self.compare else None
        left, right = self.query_one("#chat-log", RichLog), self.query_one("#chat-log-tuned", RichLog)
        if pair is not None:
            left.border_title = f"base {label_of(self.models[pair.base])}"
            right.border_title = f"tuned {label_of(self.models[pair.tuned])}"
        else:
            digest = self._selected()
            left.border_title = label_of(self.models[digest]) if digest else "conversation"

    def action_pick_model(self) -> None:
        self.query_one("#chat-model", Select).focus()

    def action_settings(self) -> None:
        self.query_one("#chat-temperature", Input).focus()

    def action_clear(self) -> None:
        self.query_one("#chat-log", RichLog).clear()
        self.query_one("#chat-log-tuned", RichLog).clear()
