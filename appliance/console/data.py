"""Data: a run's dataset card (sources, drops per filter, PII, duplicates, tokens), and what each filter dropped.

The card is the signed ``dataset-card`` artifact the run recorded (``data.card``), read through
the service, which verifies it first. Every drop row is one key away from its documents:
enter or ``d`` on a filter rule opens the samples the curation kept of what it dropped
(``data.dropped``), in a modal that loads them itself.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Label, Select, Static

from appliance.console.base import Loaded, ServicePane, reveal
from appliance.console.data_dropped import DroppedScreen
from appliance.console.data_markdown import CardMarkdownScreen
from appliance.console.session import describe, human_bytes, short

NEEDS = "data.read"


class CardFailed(Message):
    """A run's card could not be read (no card yet: the run failed or runs before its card stage)."""

    def __init__(self, run_id: str, error: BaseException) -> None:
        super().__init__()
        self.run_id, self.error = run_id, error


class DataPane(ServicePane):
    """A run's dataset card; each filter rule's dropped documents one key away."""

    NEEDS = NEEDS
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("d", "dropped", "Dropped docs", id="data.dropped"),
        Binding("p", "pick_run", "Pick run", id="data.pick-run"),
        Binding("f", "focus_drops", "Filters", id="data.filters"),
        Binding("m", "markdown", "Card as text", id="data.markdown"),
    ]
    PALETTE: ClassVar[list[tuple[str, str, str]]] = [
        ("Data: pick a run", "choose the run whose dataset card the Data tab shows (key p)", "palette_pick_run"),
        ("Data: dropped documents", "the documents the selected filter rule dropped (enter or d on the Data tab)", "palette_dropped"),
        ("Data: dataset card as Markdown", "the whole card as the run wrote it (key m on the Data tab)", "palette_markdown"),
    ]

    FOCUS = "#data-drops"

    def __init__(self) -> None:
        super().__init__()
        self.run_id: str | None = None
        self.card: dict[str, Any] | None = None
        self.markdown = ""

    def compose(self) -> ComposeResult:
        reason = self.session.grants.reason(NEEDS)
        if reason:
            yield Static(f"[b]Dataset cards are not yours to read[/b]\n{escape(reason)}", id="data-denied", classes="card")
            return
        with Horizontal(id="data-top"):
            yield Select[str]([], prompt="run", id="data-run", allow_blank=True)
            yield Static("", id="data-summary")
        with Horizontal(id="data-body"):
            with Vertical(id="data-left"):
                with Vertical(id="data-sources-box", classes="card"):
                    yield Label("Sources", classes="title")
                    yield DataTable(id="data-sources", zebra_stripes=True, cursor_type="none")
                    yield Static("", id="data-formats")
                yield Static("", id="data-tokens", classes="card")
                yield Static("", id="data-pii", classes="card")
                yield Static("", id="data-dedup", classes="card")
            with Vertical(id="data-drops-box", classes="card"):
                yield Label("Dropped during curation   enter or d: the documents", classes="title")
                yield DataTable(id="data-drops", zebra_stripes=True, cursor_type="row")

    def on_mount(self) -> None:
        if not self.allowed(NEEDS):
            return
        self.query_one("#data-sources", DataTable).add_columns("source", "docs", "kept", "bytes", "kept bytes")
        self.query_one("#data-drops", DataTable).add_columns("filter", "rule", "dropped docs")

    def on_show(self) -> None:
        # Shown by its tab's key: take the focus, so this pane's keys work at once.
        if self.allowed(NEEDS) and (self.app.focused is None or self not in self.app.focused.ancestors):
            self.query_one("#data-drops", DataTable).focus()

    def refresh_data(self) -> None:
        if not self.allowed(NEEDS):
            return
        if self.allowed("run.read"):
            self.load("runs", "run.list")
        else:
            # data.read without run.read: the card of the latest run is still the caller's to read.
            self._runs([{"run_id": "latest", "recipe_name": "", "status": "", "started_ts": ""}])

    def on_loaded(self, message: Loaded) -> None:
        if message.key == "runs":
            self._runs(message.result)
        elif message.key == "card":
            if message.result["run_id"] == self.run_id or self.run_id == "latest":
                self._card(message.result)

    def _runs(self, rows: list[dict[str, Any]]) -> None:
        select = self.query_one("#data-run", Select)
        ordered = sorted(rows, key=lambda r: str(r.get("started_ts") or ""), reverse=True)
        options = [(f"{r['run_id']}  {r['recipe_name']}  {r['status']}".strip(), str(r["run_id"])) for r in ordered]
        keep = self.run_id if any(r["run_id"] == self.run_id for r in rows) else None
        select.set_options(options)
        if not options:
            self.query_one("#data-summary", Static).update("no run yet: start one in Runs (2)")
            return
        # The latest by default; set_options cleared the value, so this posts Changed, which (re)loads the card.
        select.value = keep or options[0][1]

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id != "data-run" or event.value is Select.NULL:
            return
        self._load_card(str(event.value))

    def _load_card(self, run_id: str) -> None:
        self.run_id = run_id
        self.query_one("#data-summary", Static).update(f"loading the card of {run_id}…")
        self._fetch_card(run_id)

    @work(thread=True, exclusive=True, exit_on_error=False, group="data-card")
    def _fetch_card(self, run_id: str) -> None:
        try:
            result = self.session.call("data.card", run=run_id)
        except Exception as exc:  # shown on the pane (why this run has no card) and by the one handler
            self.post_message(CardFailed(run_id, exc))
            return
        self.post_message(Loaded("card", result))

    def on_card_failed(self, message: CardFailed) -> None:
        if message.run_id != self.run_id:
            return
        self.card, self.markdown = None, ""
        for table in ("#data-sources", "#data-drops"):
            self.query_one(table, DataTable).clear()
        for static in ("#data-formats", "#data-tokens", "#data-pii", "#data-dedup"):
            self.query_one(static, Static).update("")
        what, _ = describe(message.error)
        self.query_one("#data-summary", Static).update(f"[red]no card to show:[/] {escape(what)}")
        self.console.report(message.error)

    # -- the card ----------------------------------------------------------------------------

    def _card(self, result: dict[str, Any]) -> None:
        self.run_id = result["run_id"]
        card, self.card, self.markdown = result["card"], result["card"], result["markdown"]
        src, cur, tok = card["sources"], card["curation"], card["tokens"]
        notice = f"\n[yellow]{escape(card['purge_notice'])}[/]" if card.get("purge_notice") else ""
        self.query_one("#data-summary", Static).update(
            f"[b]{cur['documents_out']:,}[/b] of {cur['documents_in']:,} documents kept ({human_bytes(cur['bytes_out'])} of {human_bytes(cur['bytes_in'])}); "
            f"[b]{tok['total']:,}[/b] tokens{notice}"
        )
        sources = self.query_one("#data-sources", DataTable)
        sources.clear()
        for name, row in cur["by_source"].items():
            sources.add_row(
                name, f"{row['documents_in']:,}", f"{row['documents_out']:,}", human_bytes(row["bytes_in"]), human_bytes(row["bytes_out"]), key=name
            )
        formats = ", ".join(f"{fmt} {r.get('files', 0)} files / {r.get('documents', 0):,} docs" for fmt, r in sorted(src["by_format"].items()))
        skipped = (
            f"[yellow]{src['files_skipped']:,} files and {src['records_skipped']:,} records skipped at ingest[/] "
            + ", ".join(f"{k} {v}" for k, v in sorted(src["skipped_by_reason"].items()))
            if src["files_skipped"] or src["records_skipped"]
            else "nothing skipped at ingest"
        )
        self.query_one("#data-formats", Static).update(
            f"{src['files_read']:,} of {src['files']:,} files read, {src['documents']:,} documents, {human_bytes(src['bytes'])}\n{formats}\n{skipped}"
        )
        self._drops(cur)
        self._pii(cur["pii"])
        self._dedup(cur["dedup"])
        docs = tok.get("documents") or {}
        self.query_one("#data-tokens", Static).update(
            f"[b]Tokens[/b]  {tok['total']:,} ({tok['train']:,} train, {tok['val']:,} validation)\n"
            f"documents {docs.get('train', 0):,} train, {docs.get('val', 0):,} validation; vocabulary {tok.get('vocab_size') or 0:,}\n"
            f"tokenizer {short(tok.get('tokenizer_sha256'), 16)}…  dataset {short(tok.get('dataset_sha256'), 16)}…"
        )

    def _drops(self, cur: dict[str, Any]) -> None:
        table = self.query_one("#data-drops", DataTable)
        table.clear()
        for name, count in cur["dropped_by_rule"].items():
            flt, _, rule = name.partition(".")
            table.add_row(flt, rule, f"{count:,}", key=name)
        if cur.get("c4_lines_removed"):
            self.query_one("#data-drops-box Label", Label).update(
                f"Dropped during curation ({cur['c4_lines_removed']:,} lines removed inside kept documents)   enter or d: the documents"
            )

    def _pii(self, pii: dict[str, Any]) -> None:
        if not pii.get("enabled", True):
            text = "redaction was switched off in the recipe"
        elif pii.get("matches"):
            text = f"{pii['documents_with_matches']:,} documents had matches: " + ", ".join(f"{k} {v:,}" for k, v in pii["matches"].items())
        else:
            text = "no matches"
        self.query_one("#data-pii", Static).update(f"[b]Personal data and secrets[/b]  {text}")

    def _dedup(self, dd: dict[str, Any]) -> None:
        lines = [
            f"[b]Duplicates[/b]  exact {dd['exact_dropped']:,} dropped; near {dd['near_dropped']:,} dropped in {dd['near_clusters']:,} clusters",
            f"MinHash on word {dd['ngram']}-grams, {dd['bands']} bands x {dd['rows']} rows; the lowest doc_id of a cluster is kept",
        ]
        lines += [f"  kept doc {c['kept_doc_id']}: cluster of {c['size']} ({', '.join(map(str, c['members']))})" for c in dd.get("largest_clusters", [])[:3]]
        self.query_one("#data-dedup", Static).update("\n".join(lines))

    # -- actions -----------------------------------------------------------------------------

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "data-drops":
            event.stop()
            self.action_dropped()

    def action_dropped(self) -> None:
        """Open the documents the drop row under the cursor stands for."""
        if (reason := self.session.grants.reason(NEEDS)) or self.card is None or self.run_id is None:
            self.console.report_message(reason or "no dataset card is shown yet", "" if reason else "pick a run with a card (key p)")
            return
        table = self.query_one("#data-drops", DataTable)
        if table.row_count == 0:
            self.console.report_message(f"run {self.run_id} dropped no documents during curation", "nothing to show")
            return
        name = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        flt, _, rule = name.partition(".")
        total = int(self.card["curation"]["dropped_by_rule"].get(name, 0))
        self.app.push_screen(DroppedScreen(self.run_id, flt, rule or None, total))

    def action_pick_run(self) -> None:
        if self.allowed(NEEDS):
            self.query_one("#data-run", Select).action_show_overlay()

    def action_focus_drops(self) -> None:
        if self.allowed(NEEDS):
            self.query_one("#data-drops", DataTable).focus()

    def action_markdown(self) -> None:
        if self.markdown:
            self.app.push_screen(CardMarkdownScreen(self.markdown))

    # The palette runs commands from any tab: show this one first.
    def palette_pick_run(self) -> None:
        reveal(self)
        self.action_pick_run()

    def palette_dropped(self) -> None:
        reveal(self)
        self.action_dropped()

    def palette_markdown(self) -> None:
        reveal(self)
        self.action_markdown()
