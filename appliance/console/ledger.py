"""Ledger: the auditor's SQL on the signed ledger, the canned audit questions, the chain and its signed head.

Every query goes through the service's ``ledger.query``: one read-only SELECT run in the
audit sandbox (its own DuckDB instance, no file access, time, memory and row limits), the
very path ``appliance audit …`` takes. The canned questions are the CLI's own builders
(`registry.audit_queries`), so the console and the CLI ask the same SQL; choosing one puts
its SQL in the editor, to read or adapt, and runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.message import Message
from textual.widgets import DataTable, Input, Label, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from appliance.console.base import Gated, Loaded, ServicePane, reveal
from appliance.console.session import describe, short
from registry import audit_queries as q

# `appliance serve`'s defaults for the sandbox (--query-timeout, --query-max-rows,
# --query-memory-limit), shown until the service reports its own (service.info "query_limits").
SANDBOX_DEFAULTS: dict[str, Any] = {"timeout_s": 30.0, "max_rows": 100_000, "memory": "1GB"}
# A screen needs far fewer rows than the sandbox may return; the count says how many there were.
SHOWN_ROWS = 2000
CELL_CHARS = 72


@dataclass(frozen=True)
class Canned:
    """One of the auditor's questions (the same as `appliance audit`'s, with its argument where it takes one)."""

    name: str
    key: str  # its key in the pane (binding ``ledger.canned.NAME``)
    arg: str | None  # what it takes, e.g. MODEL; None: nothing
    required: bool
    build: Callable[[str | None], str]
    doc: Callable[..., str]  # the builder, whose docstring is the help

    @property
    def help(self) -> str:
        return (self.doc.__doc__ or "").strip().splitlines()[0]

    @property
    def label(self) -> str:
        arg = f" {self.arg}" if self.arg and self.required else f" [{self.arg}]" if self.arg else ""
        return f"[b]{self.key}[/b]  {self.name}{arg}"


CANNED: tuple[Canned, ...] = (
    Canned("who", "w", "USER", False, lambda a: q.who(a or None), q.who),
    Canned("denied", "d", "USER", False, lambda a: q.denied(a or None), q.denied),
    Canned("lineage", "l", "MODEL", True, lambda a: q.lineage(a or ""), q.lineage),
    Canned("derived", "s", "SOURCE", True, lambda a: q.derived(a or ""), q.derived),
    Canned("key", "k", "KEY", True, lambda a: q.key_use(a or ""), q.key_use),
    Canned("exports", "x", None, False, lambda _: q.exports(), q.exports),
    Canned("approvals", "a", None, False, lambda _: q.approvals(), q.approvals),
    Canned("purges", "p", None, False, lambda _: q.purges(), q.purges),
    Canned("purged", "u", None, False, lambda _: q.purge_derived(), q.purge_derived),
)
BY_NAME = {c.name: c for c in CANNED}


def limits_caption(info: dict[str, Any]) -> str:
    """The sandbox's fences as a caption: the service's own if it reports them, else `appliance serve`'s defaults."""
    limits = info.get("query_limits")
    source = "" if isinstance(limits, dict) else " (serve defaults)"
    limits = limits if isinstance(limits, dict) else SANDBOX_DEFAULTS
    memory = limits.get("memory") or limits.get("memory_limit") or "?"
    return (
        f"sandbox{source}: one read-only SELECT · ≤ {float(limits.get('timeout_s', 0)):g} s · ≤ {int(limits.get('max_rows', 0)):,} rows · {memory} · no files"
    )


def cell(value: Any) -> Text:
    """A value as a table cell: plain text (a DataTable reads a str as markup, and ledger data is
    anyone's text: a reason "[b]" or a JSON list must show as written), one line, bounded."""
    if value is None:
        return Text("NULL", style="dim")
    text = str(value).replace("\n", " ")
    return Text(text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…")


class QueryDone(Message):
    """A query came back: its columns and rows, and how long the service took (seconds, measured here)."""

    def __init__(self, sql: str, result: dict[str, Any], seconds: float) -> None:
        super().__init__()
        self.sql, self.result, self.seconds = sql, result, seconds


class QueryFailed(Message):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what


class Verified(Message):
    """``ledger.verify``'s answer, or the problem it found (what, fix)."""

    def __init__(self, result: dict[str, Any] | None, problem: tuple[str, str] | None) -> None:
        super().__init__()
        self.result, self.problem = result, problem


class LedgerPane(ServicePane):
    """SQL on the ledger in the audit sandbox, the canned audit questions, the chain and its signed head."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("ctrl+r,ctrl+enter", "run_query", "Run SQL", id="ledger.run", key_display="^r"),
        Binding("e", "edit", "Edit SQL", id="ledger.edit"),
        Binding("slash", "argument", "Argument", id="ledger.argument", key_display="/"),
        Binding("v", "verify", "Verify chain", id="ledger.verify"),
        Binding("escape", "leave_editor", "Results", id="ledger.results", show=False),
        *[Binding(c.key, f"canned('{c.name}')", f"audit {c.name}", show=False, id=f"ledger.canned.{c.name}") for c in CANNED],
    ]
    PALETTE: ClassVar[list[tuple[str, str, str]]] = [
        ("Ledger: run the SQL", "run the editor's SELECT in the sandbox (ctrl+r)", "palette_run"),
        ("Ledger: verify the chain", "recompute the chain, every signature and the signed head (v)", "palette_verify"),
        *[(f"Audit: {c.name}" + (f" {c.arg}" if c.arg else ""), c.help, f"canned_{c.name}") for c in CANNED],
    ]

    _model_digest: str | None = None  # the newest model, lineage's default
    head: dict[str, Any] | None = None  # the signed head last read

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="ledger-side"):
                with Vertical(id="ledger-canned-box", classes="card"):
                    yield Label("Audit questions (key, or enter)", classes="title")
                    # The list first: the app focuses a pane's first focusable widget, and the
                    # argument box would swallow the letter keys.
                    yield OptionList(*[Option(c.label, id=c.name) for c in CANNED], id="ledger-canned")
                    yield Input(placeholder="argument: USER, MODEL, SOURCE or KEY", id="ledger-arg")
                with Vertical(id="ledger-chain-box", classes="card"):
                    yield Label("Chain and signed head", classes="title")
                    yield Static("not verified yet", id="ledger-chain")
                    yield Static("", id="ledger-head")
                    yield Gated("Verify again (v)", "ledger.verify", id="ledger-verify")
            with Vertical(id="ledger-main"):
                with Vertical(id="ledger-editor-box", classes="card"):
                    yield Label("SQL (ctrl+r runs · e edits · esc leaves)", classes="title")
                    yield TextArea("SELECT seq, ts, kind, actor FROM events ORDER BY seq DESC LIMIT 50", language="sql", id="ledger-sql", theme="vscode_dark")
                    yield Label(limits_caption(self.session.info), id="ledger-limits")
                    yield Label("", id="ledger-status")
                with Vertical(id="ledger-results-box", classes="card"):
                    yield Label("Results", classes="title", id="ledger-results-title")
                    yield DataTable(id="ledger-results", zebra_stripes=True, cursor_type="row")

    def on_mount(self) -> None:
        reason = self.session.grants.reason("ledger.query")
        if reason:
            # Shown, disabled, with why: never hidden, never left to fail when run.
            self.query_one("#ledger-sql", TextArea).disabled = True
            self.query_one("#ledger-canned", OptionList).disabled = True
            self.query_one("#ledger-arg", Input).disabled = True
            status = self.query_one("#ledger-status", Label)
            status.update(Content(f"SQL disabled: {reason}"))
            status.add_class("denied")

    def refresh_data(self) -> None:
        if self.allowed("ledger.verify"):
            self.action_verify()
        if self.allowed("artifact.read") and self.allowed("ledger.query"):
            self.load("models", "artifact.list")

    def on_loaded(self, message: Loaded) -> None:
        if message.key == "models":
            models = [a for a in message.result if a.get("kind") in q.MODEL_KINDS]
            self._model_digest = models[-1]["digest"] if models else None
        elif message.key == "head":
            self._head(message.result)

    # -- SQL ------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("run_query", "canned", "argument", "edit") and not self.allowed("ledger.query"):
            return None  # shown dimmed in the footer; the status line says why
        return True

    def action_run_query(self) -> None:
        if not self._may_query():
            return
        sql = self.query_one("#ledger-sql", TextArea).text.strip()
        if not sql:
            self.console.report_message("the SQL editor is empty", "write one SELECT (e.g. SELECT * FROM events LIMIT 10), or pick an audit question")
            return
        self.query_one("#ledger-status", Label).update("running…")
        self._query(sql)

    def _may_query(self) -> bool:
        reason = self.session.grants.reason("ledger.query")
        if reason:
            self.console.report_message(f"SQL on the ledger is disabled: {reason}", "ask an admin for the role it names")
        return not reason

    @work(thread=True, exclusive=True, exit_on_error=False, group="ledger-query")
    def _query(self, sql: str) -> None:
        start = time.monotonic()
        try:
            result = self.session.call("ledger.query", sql=sql)
        except Exception as exc:  # every error goes to the one handler, with its fix
            self.post_message(QueryFailed(describe(exc)[0]))
            self.console.call_from_thread(self.console.report, exc)
            return
        self.post_message(QueryDone(sql, result, time.monotonic() - start))

    def on_query_done(self, message: QueryDone) -> None:
        columns, rows = message.result.get("columns", []), message.result.get("rows", [])
        table = self.query_one("#ledger-results", DataTable)
        table.clear(columns=True)
        table.add_columns(*(Text(str(c)) for c in columns))
        table.add_rows([cell(v) for v in row] for row in rows[:SHOWN_ROWS])
        more = f" (first {SHOWN_ROWS:,} shown)" if len(rows) > SHOWN_ROWS else ""
        noun = "row" if len(rows) == 1 else "rows"
        self.query_one("#ledger-status", Label).update(f"[green]{len(rows):,} {noun}[/] in {message.seconds:.2f} s{more}")
        self.query_one("#ledger-results-title", Label).update(f"Results: {len(rows):,} {noun} × {len(columns)} columns")

    def on_query_failed(self, message: QueryFailed) -> None:
        self.query_one("#ledger-status", Label).update(Content.from_markup("[red]failed:[/] $what", what=message.what[:160]))

    def action_edit(self) -> None:
        if self._may_query():
            self.query_one("#ledger-sql", TextArea).focus()

    def action_argument(self) -> None:
        if self._may_query():
            self.query_one("#ledger-arg", Input).focus()

    def action_leave_editor(self) -> None:
        self.query_one("#ledger-results", DataTable).focus()

    # -- canned questions -------------------------------------------------------------------

    def action_canned(self, name: str) -> None:
        """Put the canned question's SQL in the editor and run it (its argument from the box, or a default)."""
        if not self._may_query():
            return
        reveal(self)
        canned = BY_NAME[name]
        self.query_one("#ledger-canned", OptionList).highlighted = CANNED.index(canned)
        box = self.query_one("#ledger-arg", Input)
        arg = box.value.strip() or None
        if arg is None and canned.required:
            arg = self._default_arg(canned)
            if arg is None:
                self.console.report_message(
                    f"`audit {canned.name}` needs a {canned.arg}", f"type the {canned.arg} in the argument box (/), then press {canned.key} again"
                )
                box.focus()
                return
            box.value = arg
        try:
            sql = canned.build(arg)
        except Exception as exc:  # a bad argument (AuditQueryError) says what to type
            self.console.report(exc)
            return
        self.query_one("#ledger-sql", TextArea).text = sql
        self.query_one("#ledger-results-title", Label).update(f"Results: audit {canned.name}{' ' + arg if arg else ''}")
        self.query_one("#ledger-status", Label).update(f"running audit {canned.name}…")
        self._query(sql)

    def _default_arg(self, canned: Canned) -> str | None:
        if canned.arg == "MODEL":
            return self._model_digest
        if canned.arg == "KEY":
            return str(self.session.info.get("node_key") or "") or None
        return None

    @on(OptionList.OptionSelected, "#ledger-canned")
    def _picked(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is not None:
            self.action_canned(event.option.id)

    @on(OptionList.OptionHighlighted, "#ledger-canned")
    def _highlighted(self, event: OptionList.OptionHighlighted) -> None:
        canned = BY_NAME.get(event.option.id or "")
        if canned is not None:
            self.query_one("#ledger-arg", Input).placeholder = f"{canned.name}: {canned.arg or 'no argument'}" + (
                "" if canned.required or not canned.arg else " (optional)"
            )

    @on(Input.Submitted, "#ledger-arg")
    def _arg_submitted(self, event: Input.Submitted) -> None:
        option_list = self.query_one("#ledger-canned", OptionList)
        if option_list.highlighted is not None:
            option = option_list.get_option_at_index(option_list.highlighted)
            if option.id is not None:
                self.action_canned(option.id)

    # The palette calls these (from any tab: they show this one).
    def palette_run(self) -> None:
        reveal(self)
        self.action_run_query()

    def palette_verify(self) -> None:
        reveal(self)
        self.action_verify()

    def canned_who(self) -> None:
        self.action_canned("who")

    def canned_denied(self) -> None:
        self.action_canned("denied")

    def canned_lineage(self) -> None:
        self.action_canned("lineage")

    def canned_derived(self) -> None:
        self.action_canned("derived")

    def canned_key(self) -> None:
        self.action_canned("key")

    def canned_exports(self) -> None:
        self.action_canned("exports")

    def canned_approvals(self) -> None:
        self.action_canned("approvals")

    def canned_purges(self) -> None:
        self.action_canned("purges")

    def canned_purged(self) -> None:
        self.action_canned("purged")

    # -- the chain and its signed head ----------------------------------------------------

    def action_verify(self) -> None:
        reason = self.session.grants.reason("ledger.verify")
        if reason:
            self.console.report_message(f"verifying the ledger is disabled: {reason}", "ask an admin for the role it names")
            return
        self.query_one("#ledger-chain", Static).update("verifying the chain…")
        self._verify()

    @on(Gated.Pressed, "#ledger-verify")
    def _verify_pressed(self) -> None:
        self.action_verify()

    @work(thread=True, exclusive=True, exit_on_error=False, group="ledger-verify")
    def _verify(self) -> None:
        try:
            result = self.session.call("ledger.verify")
        except Exception as exc:  # a broken chain is an answer to show, and an error to report
            self.post_message(Verified(None, describe(exc)))
            self.console.call_from_thread(self.console.report, exc)
            return
        self.post_message(Verified(result, None))
        # The head after the check: the verification's own decision is in the chain it signs.
        try:
            head = self.session.call("ledger.head")
        except Exception as exc:
            self.console.call_from_thread(self.console.report, exc)
            return
        self.post_message(Loaded("head", head))

    def on_verified(self, message: Verified) -> None:
        chain = self.query_one("#ledger-chain", Static)
        if message.problem is not None:
            what, fix = message.problem
            chain.update(Content.from_markup("[b red]✗ the chain does not verify[/]\n$what\n[b]fix:[/b] $fix", what=what, fix=fix))
            return
        r = message.result or {}
        head = "signed head matches" if r.get("head_checked") else "[yellow]no signed head to check[/]"
        chain.update(
            f"[b green]✓ chain OK[/]  {r.get('events', 0)} events checked\n"
            f"last   seq {r.get('last_seq')}  {short(r.get('last_hash'), 12)}…\n"
            f"head   {head}\n"
            f"{r.get('approvals_checked', 0)} signed approval(s) re-checked\n"
            f"keys   trust store v{r.get('trust_store_version')}\n"
            f"root   {short(r.get('root_key'), 16)}…"
        )

    def _head(self, head: dict[str, Any]) -> None:
        self.head = head
        node = " (this node)" if head.get("key_id") == self.session.info.get("node_key") else ""
        self.query_one("#ledger-head", Static).update(
            f"\n[b]Signed head[/b]  seq {head.get('seq')}\n"
            f"hash   {short(head.get('hash'), 24)}…\n"
            f"signer {short(head.get('key_id'), 16)}…{node}\n"
            f"at     {str(head.get('ts', ''))[:19]}\n"
            # The signature's bytes tell a reader nothing (verify says whether it holds); a copy
            # kept off the appliance is what catches rows cut off the end later.
            "[dim]keep a copy: `appliance ledger head --out FILE`[/dim]"
        )
