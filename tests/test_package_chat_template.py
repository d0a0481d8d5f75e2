"""The packaged model's chat template: shipped, rendered as documented, usable by the fine-tuning renderer.

Packages a tiny checkpoint twice: with the training tests' SentencePiece model and with one
trained by the tokenizer stage itself (newline piece, no dummy prefix: what the appliance ships).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.chat_template import CHAT_TEMPLATE
from pipeline.finetune.base import inspect_base
from pipeline.finetune.formats import check
from pipeline.finetune.render import IGNORE, Renderer, _default_tools
from pipeline.model import LlamaModel, save_model_config, save_weights
from pipeline.package import PackageConfig, run_package
from pipeline.settings.finetune import DatasetConfig, FinetuneConfig
from pipeline.tokenizer import TokenizerConfig, run_tokenizer
from tests.training_fixtures import corpus, make_tokenizer, tiny_model

transformers = pytest.importorskip("transformers")

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does the cat see?"},
    {"role": "assistant", "content": "The cat sees the red barn."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "A dog finds a green apple."},
]

EXPECTED = (
    "<s>### System:\nBe brief.</s>"
    "\n### User:\nWhat does the cat see?</s>"
    "\n### Assistant:\nThe cat sees the red barn.</s>"
    "\n### User:\nAnd the dog?</s>"
    "\n### Assistant:\nA dog finds a green apple.</s>"
)

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a word", "parameters": {"type": "object"}}}]
TOOLS_EXAMPLE = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "Define barn."},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": '{"word": "barn"}'}}]},
        {"role": "tool", "content": "a farm building"},
        {"role": "assistant", "content": "A farm building."},
    ],
}


def _appliance_tokenizer(root: Path) -> Path:
    """A SentencePiece model from the tokenizer stage itself, on text that has role headers in it."""
    lines = corpus(300) + ["### User:", "### Assistant:", "### System:"] * 5
    docs = ["\n".join(lines[i : i + 10]) for i in range(0, len(lines), 10)]
    pq.write_table(pa.table({"doc_id": list(range(len(docs))), "text": docs}), root / "dataset.parquet")
    return run_tokenizer(root / "dataset.parquet", root, TokenizerConfig(vocab_size=320)).outputs["tokenizer"]


@pytest.fixture(scope="module", params=["training-fixture", "tokenizer-stage"])
def package_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chatpkg")
    tokenizer = make_tokenizer(root) if request.param == "training-fixture" else _appliance_tokenizer(root)
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    torch.manual_seed(0)
    # Room for a whole conversation (the training tests' 32 positions would not hold one).
    model = LlamaModel(tiny_model(max_seq_len=256).resolved(vocab_size=320)).eval()
    save_weights(model, checkpoint / "model.safetensors")
    save_model_config(checkpoint, model.cfg, bos_id=1, eos_id=2)
    return run_package(checkpoint, tokenizer, root / "pkg", PackageConfig(model_name="chat"), {}).outputs["model"]


@pytest.fixture(scope="module")
def tok(package_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(package_dir, local_files_only=True)


def _renderer(tok: Any, fmt: str = "chat") -> Renderer:
    return Renderer(tok, FinetuneConfig(base="base", datasets=[DatasetConfig(path="a.jsonl", format=fmt)]))  # type: ignore[arg-type]


def _render(tok: Any, fields: dict[str, Any], fmt: str = "chat") -> tuple[list[int], list[int]]:
    renderer = _renderer(tok, fmt)
    return renderer.render(check(fields, DatasetConfig(path="a.jsonl", format=fmt), ["assistant"]))  # type: ignore[arg-type]


def _n_tokens(tok: Any, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


# -- (a) shipped and rendered as documented --------------------------------------------------------


def test_tokenizer_config_ships_the_template(package_dir: Path, tok: Any) -> None:
    assert json.loads((package_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"] == CHAT_TEMPLATE
    assert tok.chat_template == CHAT_TEMPLATE
    # The fine-tuning base stage sees it, so a fine-tune on this package renders with it.
    assert inspect_base(package_dir).has_chat_template


def test_conversation_and_generation_prompt_render_as_documented(tok: Any) -> None:
    assert tok.apply_chat_template(CHAT, tokenize=False) == EXPECTED
    prompt = tok.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == EXPECTED[: EXPECTED.rindex("A dog")]
    assert prompt.endswith("</s>\n### Assistant:\n")
    assert tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=False).endswith("What does the cat see?</s>")


def test_tokens_start_with_one_bos_and_end_each_turn_with_eos(tok: Any) -> None:
    ids = list(tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.eos_token_id) == len(CHAT) and ids[-1] == tok.eos_token_id
    # The prompt, tokenised alone (as at inference), is the start of the conversation's tokens.
    prompt = tok.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    prompt_ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ids[: len(prompt_ids)] == prompt_ids
    # No byte of the ChatML fallback: none of our tokenizers has its markers as pieces.
    assert "<|im_start|>" not in tok.decode(ids)


def test_system_message_is_optional(tok: Any) -> None:
    text = tok.apply_chat_template(CHAT[1:3], tokenize=False, add_generation_prompt=False)
    assert text == "<s>### User:\nWhat does the cat see?</s>\n### Assistant:\nThe cat sees the red barn.</s>"


# -- (b) the fine-tuning renderer with the packaged template ---------------------------------------


def test_renderer_uses_the_packaged_template_and_trains_only_the_replies(tok: Any) -> None:
    renderer = _renderer(tok)
    assert renderer.template == CHAT_TEMPLATE  # the model's own, not the recipe's or ChatML
    ids, labels = _render(tok, {"messages": CHAT})
    assert tok.decode(ids) == EXPECTED
    expected = [IGNORE] * len(ids)
    for i, message in enumerate(CHAT):
        if message["role"] == "assistant":
            lo = _n_tokens(tok, tok.apply_chat_template(CHAT[:i], tokenize=False, add_generation_prompt=True))
            hi = _n_tokens(tok, tok.apply_chat_template(CHAT[: i + 1], tokenize=False))
            expected[lo:hi] = ids[lo:hi]
    assert labels == expected
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    # Each reply and the eos that ends it (the model learns to stop), no header, no user text.
    assert trained.count(tok.eos_token_id) == 2
    text = tok.decode(trained)
    assert "The cat sees the red barn.</s>" in text and "A dog finds a green apple.</s>" in text
    assert "###" not in text and "cat see?" not in text and "Be brief" not in text


def test_tool_conversations_render_natively_as_the_fallback_would(tok: Any) -> None:
    renderer = _renderer(tok, "tools")
    assert renderer.native_tools  # the template reads tool_calls, so the renderer hands it tools=
    checked = check(TOOLS_EXAMPLE, DatasetConfig(path="a.jsonl", format="tools"), ["assistant"])  # type: ignore[arg-type]
    native = tok.apply_chat_template(checked.messages, tools=checked.tools, tokenize=False)  # type: ignore[union-attr]
    # The renderer's own convention for templates without tools, through the same template.
    fallback = tok.apply_chat_template(_default_tools(checked.messages, checked.tools), tokenize=False)  # type: ignore[union-attr]
    assert native == fallback
    assert native.startswith("<s>### System:\n# Tools\n\n") and '<tools>\n{"type": "function", "function": {"name": "lookup"' in native
    assert '\n### Assistant:\n<tool_call>\n{"name": "lookup", "arguments": {"word": "barn"}}\n</tool_call></s>' in native
    assert "\n### Tool:\na farm building</s>" in native

    ids, labels = renderer.render(checked)
    assert tok.decode(ids) == native
    trained = tok.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])
    assert trained.startswith("<tool_call>") and trained.endswith("A farm building.</s>")
    assert "a farm building" not in trained and "### Tool" not in trained and "# Tools" not in trained


def test_tools_join_an_existing_system_message(tok: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *TOOLS_EXAMPLE["messages"][:1]]
    text = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s>### System:\nBe brief.\n\n# Tools\n") and text.count("### System:") == 1
    assert text.endswith("</tool_call></s>\n### User:\nDefine barn.</s>\n### Assistant:\n")


_role = st.sampled_from(["system", "user", "assistant", "tool"])
_content = st.text(alphabet="ab #:\n.", max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(roles=st.lists(_role, min_size=1, max_size=6), contents=st.lists(_content, min_size=6, max_size=6), with_tools=st.booleans())
def test_every_prefix_renders_as_a_prefix(tok: Any, roles: list[str], contents: list[str], with_tools: bool) -> None:
    """What the renderer relies on: no turn is rewritten by later ones, and the generation prompt starts the reply."""
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)]
    tools = TOOLS if with_tools else None
    full = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    for k in range(1, len(messages)):
        head = tok.apply_chat_template(messages[:k], tools=tools, tokenize=False)
        assert full.startswith(head)
        if messages[k]["role"] == "assistant":
            prompt = tok.apply_chat_template(messages[:k], tools=tools, tokenize=False, add_generation_prompt=True)
            assert full.startswith(prompt) and len(head) < len(prompt)


# -- (c) the package still loads and generates ------------------------------------------------------


def test_packaged_model_loads_and_continues_a_chat_prompt(package_dir: Path, tok: Any) -> None:
    model = transformers.LlamaForCausalLM.from_pretrained(package_dir, local_files_only=True).eval()
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1] and torch.equal(out[0, : ids.shape[1]], ids[0])
