"""Judging a fine-tuned model: validation loss, task scores of base vs tuned, and the promotion gate.

- ``validation_loss``: the token-weighted mean cross-entropy of the held-out windows, the same
  loss the trainer minimises (``train._token_loss_sum``: position t predicts ``labels[t + 1]``),
  so a val loss is comparable with the training curve.
- ``load_tasks`` / ``compare_on_tasks``: ``[finetune.gate] task_file`` holds {"prompt",
  "reference"} pairs. Each prompt is rendered as training rendered its examples (``Prompter``,
  on ``render.Renderer``), answered greedily by the base (peft's ``disable_adapter``) and by the
  tuned model, and both are scored: exact match (whitespace-normalised, a fraction), and
  sacrebleu's corpus BLEU and chrF (0-100).
- ``gate_verdict``: the tuned model's figures against the gate's thresholds; a ``GateVerdict``
  with a reason per threshold missed. The caller records a refused model and does not package it.

The QLoRA no_grad trap (LIBRARY-NOTES): a ``torch.no_grad()`` forward through a 4-bit base
*before* peft wraps it leaves every adapter gradient None. Everything here runs on the trained
peft model, after training, so the no_grad forwards below are safe; do not call them on a bare
4-bit base that is still to be trained.

Report files: ``pipeline.finetune.report``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DataError, TrainingError
from pipeline.finetune.packing import Window, collate
from pipeline.finetune.records import Malformed, Skip, json_type, read_records
from pipeline.finetune.render import ALPACA_PROMPT_NO_INPUT, Renderer
from pipeline.settings.finetune import FinetuneConfig, GateConfig

__all__ = [
    "GateVerdict",
    "Prompter",
    "Scores",
    "TaskComparison",
    "TaskPair",
    "TaskRow",
    "compare_on_tasks",
    "exact_match",
    "gate_verdict",
    "generate_answers",
    "load_tasks",
    "normalise",
    "score_answers",
    "validation_loss",
]

GATE = "finetune.gate"
_TASK_HINT = (
    'each line of the task file is one JSON object {"prompt": "...", "reference": "..."}; fix that line or set finetune.gate.task_file = "" to skip task scores'
)


# -- validation loss -------------------------------------------------------------------------


def validation_loss(model: Any, windows: Sequence[Window], pad_id: int, *, batch_size: int) -> dict[str, float | int]:
    """{"loss", "perplexity", "tokens"}: mean cross-entropy per label token of ``windows`` (labels != -100 after the shift).

    Token-weighted over all windows, however they fall into batches. Runs under no_grad with the
    model in eval mode (LoRA dropout off) and puts the model back in the mode it was in. Safe on
    a QLoRA model only because it runs after peft wrapped and trained it (see the module docstring).
    """
    import torch

    from pipeline.finetune.train import _token_loss_sum  # the trainer's own loss: val and train losses mean the same thing

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not windows:
        raise DataError("no validation windows to measure a loss on", 'add a [[finetune.datasets]] table with split = "val", or raise finetune.val_fraction')
    weight = model.get_input_embeddings().weight
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                batch = collate(windows[start : start + batch_size], pad_id, dtype=weight.dtype)
                batch = {k: v.to(weight.device) for k, v in batch.items()}
                n = int((batch["labels"][:, 1:] != -100).sum())
                if n:
                    total += float(_token_loss_sum(model, batch).double())
                    count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("the validation windows hold no label token", "check the val examples: each needs a response that carries loss")
    loss = total / count
    perplexity = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
    return {"loss": loss, "perplexity": perplexity, "tokens": count}


# -- the task file -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskPair:
    """One task: a prompt, the answer wanted, and where it was read."""

    prompt: str
    reference: str
    file: str
    line: int


def load_tasks(path: Path, label: str | None = None) -> list[TaskPair]:
    """The pairs of a task file (JSONL); the first malformed line raises ``DataError`` naming file, line and field."""
    name = label or str(path)
    tasks: list[TaskPair] = []
    for record in read_records(Path(path), name):
        if isinstance(record, Skip):
            raise DataError(record.text(), _TASK_HINT)
        try:
            prompt, reference = (_text_field(record.fields, key) for key in ("prompt", "reference"))
        except Malformed as bad:
            raise DataError(Skip(record.file, record.line, bad.field, bad.reason, bad.detail, record.unit).text(), _TASK_HINT) from None
        tasks.append(TaskPair(prompt, reference, record.file, record.line))
    if not tasks:
        raise DataError(f"{name}: the task file holds no task", f"{_TASK_HINT}; add at least one line")
    return tasks


def _text_field(fields: dict[str, Any], key: str) -> str:
    if key not in fields:
        raise Malformed(key, "missing_field", f"missing field '{key}'")
    value = fields[key]
    if not isinstance(value, str):
        raise Malformed(key, "wrong_type", f"field '{key}' must be a string, got a JSON {json_type(value)}")
    if not value.strip():
        raise Malformed(key, "empty", f"field '{key}' is empty")
    return value


# -- prompts and greedy answers -----------------------------------------------------------------


class Prompter:
    """Task prompts rendered as training rendered examples, and answers cut where the model ends its turn.

    The rendering follows the recipe's first training dataset: chat and tools -> the prompt as
    one user message through the chat template with the generation prompt; alpaca -> the
    Alpaca prompt (no input); completion and input_output -> the raw text (with the
    tokenizer's own special tokens, a bos for Llama-style ones, as completion training adds).
    """

    def __init__(self, tokenizer: Any, fcfg: FinetuneConfig) -> None:
        self.tok = tokenizer
        # The training renderer itself: its template choice (base's, recipe's, ChatML) and tokenisation.
        self.renderer = Renderer(tokenizer, fcfg)
        train = [d for d in fcfg.datasets if d.split == "train"] or fcfg.datasets
        first = train[0].format
        self.format = "chat" if first in ("chat", "tools") else "alpaca" if first == "alpaca" else "completion"
        self.end_text = self._end_of_turn() if self.format == "chat" else ""
        stops = {tokenizer.eos_token_id}
        if self.end_text:
            marker = self.renderer._ids(self.end_text)
            if len(marker) == 1:  # a special token (ChatML's <|im_end|>, Llama 3's <|eot_id|>): stop generating on it
                stops.add(marker[0])
        self.stop_ids = sorted(i for i in stops if i is not None)

    def ids(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as the model saw prompts in training; raises ``Malformed`` if the template refuses it."""
        if self.format == "chat":
            # Tokenised without added specials, as Renderer._label tokenises a whole conversation.
            return self.renderer._ids(self.renderer._chat([{"role": "user", "content": prompt}], None, prompt=True))
        if self.format == "alpaca":
            return self.renderer._ids(ALPACA_PROMPT_NO_INPUT.format(instruction=prompt), special=True)
        return self.renderer._ids(prompt, special=True)

    def answer(self, new_ids: Sequence[int]) -> str:
        """The text of generated ids, cut at the first stop id and at the end-of-turn text (a marker that is no single token), stripped."""
        ids = list(new_ids)
        cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        text = str(self.tok.decode(ids[:cut], skip_special_tokens=True))
        if self.end_text and self.end_text in text:
            text = text[: text.index(self.end_text)]
        return text.strip()

    def _end_of_turn(self) -> str:
        """What the template writes after an assistant turn's content, up to the first whitespace ("<|im_end|>" in ChatML)."""
        sentinel = "\x00ANSWER\x00"
        try:
            text = self.renderer._chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}], None)
        except Malformed:
            return ""
        after = text.split(sentinel, 1)[1] if sentinel in text else ""
        parts = after.split()
        return parts[0] if parts else ""


def generate_answers(model: Any, prompter: Prompter, prompts: Sequence[str], *, max_new_tokens: int) -> list[str]:
    """Greedy answers of ``model`` to ``prompts``, up to ``max_new_tokens`` tokens each, stopping at eos / end of turn.

    One prompt at a time (no padding to get wrong). Eval mode and no_grad: after training only
    (the QLoRA trap, module docstring); the model's mode is restored.
    """
    import torch

    device = model.get_input_embeddings().weight.device
    pad = prompter.tok.pad_token_id if prompter.tok.pad_token_id is not None else prompter.stop_ids[0] if prompter.stop_ids else 0
    was_training = model.training
    model.eval()
    answers = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([prompter.ids(prompt)], dtype=torch.long, device=device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=prompter.stop_ids or None,
                    pad_token_id=pad,
                    use_cache=True,  # LoraSpec turns the cache off for training; generation wants it
                )
                answers.append(prompter.answer(out[0, ids.shape[1] :].tolist()))
    finally:
        model.train(was_training)
    return answers


# -- scores ------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Whitespace collapsed to single spaces and trimmed: what exact match compares."""
    return " ".join(text.split())


def exact_match(hypothesis: str, reference: str) -> bool:
    return normalise(hypothesis) == normalise(reference)


@dataclass(frozen=True, slots=True)
class Scores:
    """Task scores of one model: exact match a fraction in [0, 1]; BLEU and chrF sacrebleu's corpus scores (0-100)."""

    exact_match: float
    bleu: float
    chrf: float
    count: int


def score_answers(hypotheses: Sequence[str], references: Sequence[str]) -> Scores:
    """Exact match, corpus BLEU and corpus chrF of ``hypotheses`` against ``references`` (one reference each)."""
    import sacrebleu

    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need one hypothesis per reference and at least one: {len(hypotheses)} hypotheses, {len(references)} references")
    hyps, refs = list(hypotheses), list(references)
    matched = sum(exact_match(h, r) for h, r in zip(hyps, refs, strict=True))
    return Scores(
        exact_match=matched / len(refs),
        bleu=float(sacrebleu.corpus_bleu(hyps, [refs]).score),
        chrf=float(sacrebleu.corpus_chrf(hyps, [refs]).score),
        count=len(refs),
    )


@dataclass(frozen=True, slots=True)
class TaskRow:
    """One task's answers, base beside tuned, with each answer's exact match and sentence chrF."""

    prompt: str
    reference: str
    base: str
    tuned: str
    base_exact: bool
    tuned_exact: bool
    base_chrf: float
    tuned_chrf: float
    file: str
    line: int


@dataclass(frozen=True, slots=True)
class TaskComparison:
    base: Scores
    tuned: Scores
    rows: list[TaskRow] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"base": asdict(self.base), "tuned": asdict(self.tuned), "rows": [asdict(r) for r in self.rows]}


def compare_on_tasks(model: Any, prompter: Prompter, tasks: Sequence[TaskPair], *, max_new_tokens: int, base: Any = None) -> TaskComparison:
    """Answers and scores of the base and the tuned ``model`` on ``tasks``.

    ``base``: the base model itself (a full fine-tune); None = ``model`` is a peft model and the
    base is ``model`` with its adapter disabled.
    """
    import sacrebleu

    if base is None and not hasattr(model, "disable_adapter"):
        raise TrainingError(
            f"comparing base and tuned answers needs the peft model (base + adapter) or the base model, got a {type(model).__name__} alone",
            "pass the model LoraSpec.build returned after training, or the base as base=",
        )
    prompts = [t.prompt for t in tasks]
    for t in tasks:  # a prompt the chat template refuses is the task file's fault: name its line before any generation
        try:
            prompter.ids(t.prompt)
        except Malformed as bad:
            raise DataError(Skip(t.file, t.line, "prompt", bad.reason, bad.detail).text(), _TASK_HINT) from None
    if base is not None:
        base_answers = generate_answers(base, prompter, prompts, max_new_tokens=max_new_tokens)
    else:
        with model.disable_adapter():
            base_answers = generate_answers(model, prompter, prompts, max_new_tokens=max_new_tokens)
    tuned = generate_answers(model, prompter, prompts, max_new_tokens=max_new_tokens)
    refs = [t.reference for t in tasks]
    rows = [
        TaskRow(
            t.prompt,
            t.reference,
            b,
            a,
            exact_match(b, t.reference),
            exact_match(a, t.reference),
            float(sacrebleu.sentence_chrf(b, [t.reference]).score),
            float(sacrebleu.sentence_chrf(a, [t.reference]).score),
            t.file,
            t.line,
        )
        for t, b, a in zip(tasks, base_answers, tuned, strict=True)
    ]
    return TaskComparison(score_answers(base_answers, refs), score_answers(tuned, refs), rows)


# -- the promotion gate --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """Whether the tuned model may be packaged, and why not.

    ``reasons`` names every threshold missed with the value and the key; ``promoted`` is true
    exactly when there is none. ``thresholds``: the gate's active limits by dotted key;
    ``scores``: the figures they were held against.
    """

    promoted: bool
    reasons: list[str]
    thresholds: dict[str, float]
    scores: dict[str, float | None]

    def __post_init__(self) -> None:
        if self.promoted != (not self.reasons):
            raise ValueError("a GateVerdict is promoted exactly when it has no reasons; build it with gate_verdict()")

    @property
    def status(self) -> str:
        return "promoted" if self.promoted else "not promoted"

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "promoted": self.promoted,
            "reasons": list(self.reasons),
            "thresholds": dict(self.thresholds),
            "scores": dict(self.scores),
        }


def _num(value: float) -> str:
    return str(round(value, 4))


def gate_verdict(scores: Scores | None, val: dict[str, Any], gate: GateConfig) -> GateVerdict:
    """The tuned model's ``scores`` (None without a task file) and validation loss ``val`` against ``gate``.

    A threshold of 0 is no threshold. A figure that is missing or not a finite number misses
    every threshold set on it (NaN compares false both ways, so it is never let through).
    """
    figures: dict[str, float | None] = {
        "exact_match": scores.exact_match if scores else None,
        "bleu": scores.bleu if scores else None,
        "chrf": scores.chrf if scores else None,
        "val_loss": float(val["loss"]) if val.get("loss") is not None else None,
    }
    minimums = {"exact_match": gate.min_exact_match, "bleu": gate.min_bleu, "chrf": gate.min_chrf}
    thresholds: dict[str, float] = {}
    reasons: list[str] = []
    for name, minimum in minimums.items():
        if minimum <= 0:
            continue
        key = f"{GATE}.min_{name}"
        thresholds[key] = minimum
        value = figures[name]
        if value is None:
            reasons.append(f"{name} was not measured but {key} is {_num(minimum)} (set {GATE}.task_file to a task file)")
        elif not (math.isfinite(value) and value >= minimum):
            reasons.append(f"{name} {_num(value)} < {key} {_num(minimum)}")
    loss = figures["val_loss"]
    if loss is None or not math.isfinite(loss):
        reasons.append(f"val_loss is {loss}, not a finite number: the tuned model cannot be judged")
    elif gate.max_val_loss > 0:
        key = f"{GATE}.max_val_loss"
        thresholds[key] = gate.max_val_loss
        if not loss <= gate.max_val_loss:
            reasons.append(f"val_loss {_num(loss)} > {key} {_num(gate.max_val_loss)}")
    return GateVerdict(promoted=not reasons, reasons=reasons, thresholds=thresholds, scores=figures)
