"""Checked examples -> token ids and labels, with the base model's own tokenizer and chat template.

``labels`` equal ``input_ids`` where the model is trained and are ``IGNORE`` (-100, what
Hugging Face's loss skips) elsewhere. Per format:

- completion: the tokenizer's own special tokens (a bos, for Llama-style tokenizers), the text,
  then eos so the model learns to stop; loss on all of it.
- alpaca: ``ALPACA_PROMPT`` (or ``ALPACA_PROMPT_NO_INPUT``), the Stanford Alpaca template, then
  the output and eos. Loss on the output and eos only, unless ``train_on_inputs``. Prompt and
  output are tokenised apart and joined, so the boundary is exact and matches generation,
  where the prompt is tokenised alone.
- chat: ``tokenizer.apply_chat_template(messages, tokenize=False)`` with the base's template,
  else ``[finetune] chat_template``, else ``DEFAULT_CHAT_TEMPLATE`` (ChatML). A turn's span is
  found by rendering the conversation's prefixes and diffing lengths; every prefix must be a
  prefix of the whole render, else the template rewrites earlier turns and the example is
  refused (``template_mismatch``). A trained assistant turn starts after the generation prompt
  (``<|im_start|>assistant\\n`` in ChatML), which inference supplies, and ends after the
  template's end-of-turn; other trained roles cover their whole turn. Characters map to
  tokens through the fast tokenizer's offsets (a slow tokenizer: by tokenising each prefix
  and checking that its tokens begin the whole).
- tools: as chat, with ``tools=`` passed to the template when the template reads tool calls
  (its source mentions ``tool_calls``, as Qwen2.5's, Llama 3.1's and Mistral's do). A template
  that does not (ChatML, the fixture's) gets ``DEFAULT_TOOLS_SYSTEM`` (the Hermes / Qwen
  convention): the tool specs as JSON lines in a system turn (appended to the first system
  message, or a new one), each tool call as ``<tool_call>\\n{"name", "arguments"}\\n</tool_call>``
  in the assistant content, and "tool" results as turns of role "tool". Loss on assistant
  turns, tool calls included, never on tool results (unless roles_to_train names "tool").
- input_output: each segment tokenised alone (no special tokens added: write them in the text,
  as in Axolotl) and joined; loss on segments labelled true, whatever ``train_on_inputs`` says.

Nothing here can download: only the tokenizer object handed in is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from pipeline.finetune.formats import Alpaca, Checked, Conversation, Segments
from pipeline.finetune.records import Malformed
from pipeline.settings.finetune import FinetuneConfig

IGNORE = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"

# ChatML (OpenAI's, as Qwen ships it): for a base whose tokenizer has no template and a recipe
# that names none. Its markers are plain text to a tokenizer that lacks them as special tokens.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(slots=True)
class Example:
    """One rendered example: tokens, labels (``IGNORE`` where no loss) and where it came from."""

    input_ids: list[int]
    labels: list[int]
    file: str
    line: int

    @property
    def trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class Renderer:
    """Renders checked examples with one tokenizer and the recipe's loss settings."""

    def __init__(self, tokenizer: Any, config: FinetuneConfig) -> None:
        self.tok = tokenizer
        self.train_on_inputs = config.train_on_inputs
        self.roles = frozenset(config.roles_to_train)
        own = tokenizer.chat_template
        if isinstance(own, dict):  # several named templates (some Hugging Face repos): the default one
            own = own.get("default") or next(iter(own.values()), None)
        self.template: str = own or config.chat_template or DEFAULT_CHAT_TEMPLATE
        self.native_tools = "tool_calls" in self.template
        self.eos: int | None = tokenizer.eos_token_id

    def render(self, checked: Checked) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one checked example; raises ``Malformed`` when nothing would be trained."""
        if isinstance(checked, str):
            ids = self._ids(checked, special=True) + self._eos()
            pairs = [(ids, True)]
        elif isinstance(checked, Alpaca):
            template = ALPACA_PROMPT if checked.input else ALPACA_PROMPT_NO_INPUT
            prompt = template.format(instruction=checked.instruction, input=checked.input)
            pairs = [(self._ids(prompt, special=True), self.train_on_inputs), (self._ids(checked.output) + self._eos(), True)]
        elif isinstance(checked, Segments):
            pairs = [(self._ids(text), label) for text, label in checked.parts]
        else:
            return self._conversation(checked)
        ids, labels = [], []
        for part, trained in pairs:
            ids += part
            labels += part if trained else [IGNORE] * len(part)
        return ids, labels

    def _ids(self, text: str, *, special: bool = False) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _eos(self) -> list[int]:
        return [] if self.eos is None else [self.eos]

    # -- chat and tools ------------------------------------------------------------------

    def _conversation(self, conv: Conversation) -> tuple[list[int], list[int]]:
        messages, tools = conv.messages, conv.tools or None
        if (tools or any("tool_calls" in m for m in messages)) and not self.native_tools:
            messages, tools = _default_tools(messages, conv.tools), None
        full = self._chat(messages, tools)
        if self.train_on_inputs:
            spans = [(0, len(full))]
        else:
            spans = self._spans(full, messages, tools)
        ids, labels = self._label(full, spans)
        return ids, labels

    def _chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *, prompt: bool = False) -> str:
        if not messages:
            return ""
        try:
            text = self.tok.apply_chat_template(messages, tools=tools, chat_template=self.template, tokenize=False, add_generation_prompt=prompt)
        except (TemplateError, ValueError, TypeError) as exc:  # Jinja's errors, a template's raise_exception, a missing template
            raise Malformed("messages", "template_mismatch", f"the chat template refused the conversation: {exc}") from None
        return str(text)

    def _spans(self, full: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[tuple[int, int]]:
        spans = []
        for i, message in enumerate(messages):
            if message["role"] not in self.roles:
                continue
            before = self._prefix(full, messages[:i], tools, i)
            end = len(self._prefix(full, messages[: i + 1], tools, i))
            start = len(before)
            if message["role"] == "assistant":
                # The generation prompt ("<|im_start|>assistant\n") is what inference writes: no loss on it.
                header = self._chat(messages[:i], tools, prompt=True)
                if full.startswith(header) and start <= len(header) <= end:
                    start = len(header)
            spans.append((start, end))
        return spans

    def _prefix(self, full: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, turn: int) -> str:
        text = self._chat(messages, tools)
        if not full.startswith(text):
            raise Malformed(
                "messages",
                "template_mismatch",
                f"the chat template renders turn {turn} differently once later turns follow, so its tokens cannot be located"
                ' (set [finetune] chat_template to a template that renders each turn on its own, or "" for ChatML)',
            )
        return text

    def _label(self, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Tokens of ``full`` and labels set on the tokens that start inside a span (characters)."""
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            starts = [start for start, _ in enc["offset_mapping"]]
            labels = [tok if any(a <= s < b for a, b in spans) else IGNORE for tok, s in zip(ids, starts, strict=True)]
            return ids, labels
        # No offsets: tokenise each boundary's prefix and check that its tokens begin the whole.
        ids = self._ids(full)
        labels = [IGNORE] * len(ids)
        for a, b in spans:
            lo, hi = (self._boundary(full, ids, edge) for edge in (a, b))
            labels[lo:hi] = ids[lo:hi]
        return ids, labels

    def _boundary(self, full: str, ids: list[int], edge: int) -> int:
        head = self._ids(full[:edge])
        if ids[: len(head)] != head:
            raise Malformed("messages", "template_mismatch", f"the tokens of the conversation do not split at character {edge} (a turn boundary)")
        return len(head)


def _default_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation for a template that ignores tools: specs in a system turn, calls as JSON in the content."""
    out = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None)
        if calls:
            blocks = [
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False) + "\n</tool_call>"
                for c in calls
            ]
            message["content"] = "\n".join(([message["content"]] if message["content"] else []) + blocks)
        message.pop("tool_call_id", None)
        out.append(message)
    if tools:
        system = DEFAULT_TOOLS_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{system}" if out[0]["content"] else system
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "DEFAULT_CHAT_TEMPLATE", "DEFAULT_TOOLS_SYSTEM", "IGNORE", "Example", "Renderer"]
