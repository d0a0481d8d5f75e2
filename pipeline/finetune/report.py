"""The evaluation report of a fine-tuning run: ``report.json`` (every figure) and ``report.md`` (for people).

``report.json`` holds the validation loss, the base and tuned task scores, every task's base
and tuned answers, and the gate's verdict with its reasons and thresholds; ``report.md`` shows
the verdict first, then the scores side by side and a table of the answers. Both are written
atomically (``keys.files``), mode 0644 like every stage output. Torch-free.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from keys.files import atomic_write_text
from pipeline.finetune.evaluate import GateVerdict, TaskComparison
from pipeline.result import write_json

__all__ = ["REPORT_JSON", "REPORT_MD", "render_markdown", "report_data", "write_report"]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
# A long answer is cut in the Markdown table (report.json keeps it whole).
CELL_CHARS = 300


def report_data(*, val: dict[str, Any], verdict: GateVerdict, comparison: TaskComparison | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body of the report: ``extra`` (run id, base, adapter, ...) beside the figures."""
    data: dict[str, Any] = dict(extra or {})
    data["validation"] = dict(val)
    data["tasks"] = comparison.as_dict() if comparison is not None else None
    data["verdict"] = verdict.as_dict()
    return _finite(data)


def write_report(
    out_dir: Path, *, val: dict[str, Any], verdict: GateVerdict, comparison: TaskComparison | None = None, extra: dict[str, Any] | None = None
) -> list[Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` (created); returns the two paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = report_data(val=val, verdict=verdict, comparison=comparison, extra=extra)
    json_path = write_json(out_dir / REPORT_JSON, data)
    md_path = out_dir / REPORT_MD
    atomic_write_text(md_path, render_markdown(data), mode=0o644)
    return [json_path, md_path]


def render_markdown(data: dict[str, Any]) -> str:
    """``report.md`` from ``report_data``'s dict."""
    verdict = data["verdict"]
    lines = ["# Fine-tuning evaluation", "", f"**Verdict: {verdict['status']}**", ""]
    if verdict["reasons"]:
        lines += [f"- {reason}" for reason in verdict["reasons"]] + [""]
    if verdict["thresholds"]:
        lines += ["Thresholds: " + ", ".join(f"`{k}` = {v}" for k, v in sorted(verdict["thresholds"].items())), ""]
    val = data["validation"]
    lines += ["## Validation", "", "| loss | perplexity | label tokens |", "|---:|---:|---:|"]
    lines += [f"| {_fmt(val.get('loss'))} | {_fmt(val.get('perplexity'))} | {val.get('tokens', '')} |", ""]
    tasks = data.get("tasks")
    if not tasks:
        lines += ["No task file (`finetune.gate.task_file`): no task scores.", ""]
        return "\n".join(lines)
    base, tuned = tasks["base"], tasks["tuned"]
    lines += ["## Task scores", "", f"{tuned['count']} tasks; exact match is a fraction, BLEU and chrF are sacrebleu's 0-100 corpus scores.", ""]
    lines += ["| score | base | tuned |", "|---|---:|---:|"]
    for name, label in (("exact_match", "exact match"), ("bleu", "BLEU"), ("chrf", "chrF")):
        lines.append(f"| {label} | {_fmt(base[name])} | {_fmt(tuned[name])} |")
    lines += ["", "## Answers", "", "| # | prompt | reference | base | tuned | chrF base | chrF tuned |", "|---:|---|---|---|---|---:|---:|"]
    for i, row in enumerate(tasks["rows"], start=1):
        base_cell = _cell(row["base"]) + (" ✓" if row["base_exact"] else "")
        tuned_cell = _cell(row["tuned"]) + (" ✓" if row["tuned_exact"] else "")
        lines.append(
            f"| {i} | {_cell(row['prompt'])} | {_cell(row['reference'])} | {base_cell} | {tuned_cell} | {_fmt(row['base_chrf'])} | {_fmt(row['tuned_chrf'])} |"
        )
    lines += ["", "✓: exact match (whitespace-normalised)."]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """A table cell: pipes escaped, line breaks as <br>, long text cut (report.json has it whole), empty shown as such."""
    if len(text) > CELL_CHARS:
        text = text[:CELL_CHARS] + "…"
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")
    return text if text.strip() else "*(empty)*"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def _finite(value: Any) -> Any:
    """JSON has no inf or NaN (json.dumps would write invalid JSON): a non-finite float becomes its name, "inf" or "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
