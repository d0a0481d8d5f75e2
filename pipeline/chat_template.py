"""The chat template a packaged model ships in ``tokenizer_config.json``.

Without one, fine-tuning chat data on a model pre-trained here falls back to ChatML, whose
``<|im_start|>`` / ``<|im_end|>`` markers are no pieces of our SentencePiece vocabularies: each
is spelled out in several byte or character tokens the model never saw, and its end of turn
is not the eos the model learnt to stop on. So the template uses what every tokenizer of ours
has: plain-text Markdown-style role headers, and the model's own eos to end a turn.

A conversation renders as::

    <s>### System:
    You are terse.</s>
    ### User:
    Hi</s>
    ### Assistant:
    Hello.</s>

- bos first, as every pre-training document started (apply_chat_template's tokenisation adds
  no special tokens of its own; tokenise a rendered string with ``add_special_tokens=False``);
- one turn per message: ``"### " + role.capitalize() + ":\\n"``, the content, eos; turns after
  the first are preceded by ``"\\n"`` (the separator belongs to the next turn, not to the
  eos, so an assistant turn's trained span ends on eos and teaches nothing after it);
- ``add_generation_prompt`` writes ``"\\n### Assistant:\\n"`` (no leading ``"\\n"`` for an empty
  conversation); the generation prompt is therefore a prefix of the render with the answer;
- tools (the Hermes / Qwen convention, as ``pipeline.finetune.render.DEFAULT_TOOLS_SYSTEM``
  writes it for templates without tools, so both paths give the same text): the tool specs as
  JSON lines in the system turn (appended to a first system message after a blank line, or a
  system turn of their own), each assistant tool call as
  ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` after the content (one per
  line), tool results as turns of role "tool" (``### Tool:``).

Every turn renders from its own message alone, so the render of the first k messages is a
prefix of the render of all of them: the fine-tuning renderer locates a turn's tokens that way.
"""

from __future__ import annotations

# The tools preamble below is render.DEFAULT_TOOLS_SYSTEM's text; a test renders a tool conversation both ways.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if tools -%}"
    "{%- set ns = namespace(specs='') -%}"
    "{%- for tool in tools -%}{%- set ns.specs = ns.specs ~ ('\\n' if not loop.first else '') ~ (tool | tojson) -%}{%- endfor -%}"
    "{%- set preamble = '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\\n' ~ ns.specs ~ '\\n</tools>\\n\\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n"
    '<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>\' -%}'
    "{%- if not (messages and messages[0]['role'] == 'system') -%}{{ '### System:\\n' ~ preamble ~ eos_token }}{%- endif -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if tools and loop.first and message['role'] == 'system' -%}"
    "{%- set content = content ~ '\\n\\n' ~ preamble if content else preamble -%}"
    "{%- endif -%}"
    "{{ ('\\n' if not loop.first or (tools and message['role'] != 'system') else '') ~ '### ' ~ (message['role'] | capitalize) ~ ':\\n' ~ content }}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{{ '\\n' if content or not loop.first else '' }}"
    "{{ '<tool_call>\\n{\"name\": ' ~ (fn['name'] | tojson) ~ ', \"arguments\": ' }}"
    "{{ fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) }}"
    "{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ eos_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ('\\n' if messages or tools else '') ~ '### Assistant:\\n' }}{%- endif -%}"
)
