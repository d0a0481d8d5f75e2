"""Records -> checked examples, per ``[[finetune.datasets]] format``.

Each ``check_*`` takes a record's fields and returns the example in one normal shape, or raises
``Malformed`` naming the recipe's field and what is wrong with it. Rendering to tokens is in
``pipeline.finetune.render``; this module needs neither torch nor transformers.

Shapes accepted:

- completion: ``{field: "text"}``.
- alpaca: ``{instruction, input (optional, may be empty), output}`` (the recipe's field names).
- chat: ``{messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]}``.
- tools: chat plus ``{"role": "tool", "content": str}`` results, assistant ``tool_calls``
  (OpenAI shape: ``[{"type": "function", "function": {"name": str, "arguments": object or a
  JSON string of one}}]``) and ``tools``: a list of function specs (OpenAI's
  ``{"type": "function", "function": {...}}`` or the bare ``{"name", "description",
  "parameters"}``), or a JSON string of that list. ``[]`` is a conversation without tools; the
  field itself must be there, so a misspelt ``field_tools`` cannot silently drop every tool.
- input_output: Axolotl's ``{"segments": [{"text": str, "label": bool}, ...]}``.

Fields that hold JSON (messages, tools, segments) may also be JSON text, as CSV cells and
some Parquet exports store them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.finetune.records import Malformed, json_type, parse_json
from pipeline.settings.finetune import DatasetConfig

CHAT_ROLES = ("system", "user", "assistant")
TOOL_ROLES = (*CHAT_ROLES, "tool")


@dataclass(frozen=True, slots=True)
class Alpaca:
    instruction: str
    input: str
    output: str


@dataclass(slots=True)
class Conversation:
    # Messages in the shape chat templates expect (tool_calls with ``arguments`` as an object).
    messages: list[dict[str, Any]]
    # Function specs, OpenAI shape; empty for plain chat.
    tools: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Segments:
    # (text, trained on) in order.
    parts: list[tuple[str, bool]]


Checked = str | Alpaca | Conversation | Segments


def check(fields: dict[str, Any], dataset: DatasetConfig, roles_to_train: list[str]) -> Checked:
    """The example in ``fields``, checked for ``dataset.format``; raises ``Malformed``."""
    fmt = dataset.format
    if fmt == "completion":
        return _text(fields, dataset.field, required=True)
    if fmt == "alpaca":
        return Alpaca(
            _text(fields, dataset.field_instruction, required=True),
            _text(fields, dataset.field_input, required=False),
            _text(fields, dataset.field_output, required=True),
        )
    if fmt == "input_output":
        return _segments(fields, "segments")
    tools = _tools(fields, dataset.field_tools) if fmt == "tools" else []
    messages = _messages(fields, dataset.field_messages, TOOL_ROLES if fmt == "tools" else CHAT_ROLES)
    if not any(m["role"] in roles_to_train for m in messages):
        raise Malformed(
            dataset.field_messages, "no_loss", f"no message of a role in [finetune] roles_to_train ({', '.join(roles_to_train)}): nothing to learn from"
        )
    return Conversation(messages, tools)


def _get(fields: dict[str, Any], name: str) -> Any:
    if name not in fields:
        names = ", ".join(sorted(map(str, fields))[:10]) or "none"
        raise Malformed(name, "missing_field", f"no '{name}' field (fields: {names})")
    return fields[name]


def _text(fields: dict[str, Any], name: str, *, required: bool) -> str:
    if not required and fields.get(name) is None:
        return ""  # alpaca's input is optional: absent, null and "" all mean "no input"
    value = _get(fields, name)
    if type(value) is not str:
        raise Malformed(name, "wrong_type", f"'{name}' is a {json_type(value)}, not a string")
    if required and not value.strip():
        raise Malformed(name, "empty", f"'{name}' is empty")
    return value


def _json_field(fields: dict[str, Any], name: str) -> Any:
    value = _get(fields, name)
    return parse_json(value, name) if type(value) is str else value


def _segments(fields: dict[str, Any], name: str) -> Segments:
    value = _json_field(fields, name)
    if type(value) is not list or not value:
        raise Malformed(name, "wrong_type", f'\'{name}\' must be a non-empty list of {{"text", "label"}} objects, got a {json_type(value)}')
    parts = []
    for i, seg in enumerate(value):
        if type(seg) is not dict or type(seg.get("text")) is not str or type(seg.get("label", True)) is not bool:
            raise Malformed(name, "wrong_type", f'segment {i} must be {{"text": string, "label": true or false}}')
        parts.append((seg["text"], seg.get("label", True)))
    if not any(label and text for text, label in parts):
        raise Malformed(name, "no_loss", 'no segment with "label": true and text: nothing to learn from')
    return Segments(parts)


def _messages(fields: dict[str, Any], name: str, roles: tuple[str, ...]) -> list[dict[str, Any]]:
    value = _json_field(fields, name)
    if type(value) is not list or not value:
        raise Malformed(name, "wrong_type", f'\'{name}\' must be a non-empty list of {{"role", "content"}} messages, got a {json_type(value)}')
    out = []
    for i, msg in enumerate(value):
        where = f"message {i}"
        if type(msg) is not dict:
            raise Malformed(name, "bad_message", f"{where} is a {json_type(msg)}, not an object with role and content")
        role = msg.get("role")
        if type(role) is not str:
            raise Malformed(name, "bad_message", f"{where} has no 'role' string")
        if role not in roles:
            hint = ' (tool results need format = "tools")' if role == "tool" else ""
            raise Malformed(name, "unknown_role", f"{where} has role {role!r}; this format knows {', '.join(roles)}{hint}")
        calls = _tool_calls(msg.get("tool_calls"), name, where) if role == "assistant" and "tool" in roles else []
        content = msg.get("content")
        if content is None and calls:
            content = ""  # OpenAI's shape: an assistant turn that only calls tools has null content
        if type(content) is not str:
            raise Malformed(name, "bad_message", f"{where} has no 'content' string (got {json_type(content)})")
        if role == "assistant" and not content.strip() and not calls:
            raise Malformed(name, "empty", f"{where} is an empty assistant response")
        clean: dict[str, Any] = {"role": role, "content": content}
        if calls:
            clean["tool_calls"] = calls
        for key in ("name", "tool_call_id"):
            if type(msg.get(key)) is str:
                clean[key] = msg[key]
        out.append(clean)
    return out


def _tool_calls(value: Any, name: str, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if type(value) is not list:
        raise Malformed(name, "bad_tool_call", f"{where}: tool_calls is a {json_type(value)}, not a list")
    calls = []
    for j, call in enumerate(value):
        at = f"{where}: tool call {j}"
        fn = call.get("function", call) if type(call) is dict else None
        if type(fn) is not dict or type(fn.get("name")) is not str or not fn["name"] or "arguments" not in fn:
            raise Malformed(name, "bad_tool_call", f'{at} must be {{"type": "function", "function": {{"name": string, "arguments": object}}}}')
        args = fn["arguments"]
        if type(args) is str:
            try:
                args = parse_json(args, name)
            except Malformed:
                raise Malformed(name, "bad_tool_call", f"{at}: arguments is not valid JSON") from None
        if type(args) is not dict:
            raise Malformed(name, "bad_tool_call", f"{at}: arguments must be a JSON object, got a {json_type(args)}")
        calls.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return calls


def _tools(fields: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = _json_field(fields, name)
    if type(value) is not list:
        raise Malformed(name, "wrong_type", f"'{name}' must be a list of function specs ([] for none), got a {json_type(value)}")
    specs = []
    for i, spec in enumerate(value):
        fn = spec.get("function", spec) if type(spec) is dict else None
        if type(fn) is not dict or type(fn.get("name")) is not str or not fn["name"]:
            raise Malformed(name, "wrong_type", f'tool {i} must be {{"type": "function", "function": {{"name": string, "parameters": object}}}}')
        specs.append({"type": "function", "function": fn})
    return specs
