"""Fine-tuning examples: reading, checking, rendering with loss masks, packing, validation split.

Real files in tmp_path and the real tokenizer of a tiny local base (tests.finetune_fixtures).
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import DataError
from pipeline.finetune.examples import example_hash, load_examples, split_validation
from pipeline.finetune.packing import build_windows, collate, pad_id_of
from pipeline.finetune.render import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, DEFAULT_CHAT_TEMPLATE, IGNORE, Example
from pipeline.settings.finetune import DatasetConfig, FinetuneConfig
from tests.finetune_fixtures import build_tiny_base

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a list?"},
    {"role": "assistant", "content": "Lists hold items in order."},
    {"role": "user", "content": "And a string?"},
    {"role": "assistant", "content": "Strings are immutable."},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def tok(base: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base, local_files_only=True)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def config(*datasets: DatasetConfig, **kw: Any) -> FinetuneConfig:
    return FinetuneConfig(base="base", datasets=list(datasets), **kw)


def load(tmp_path: Path, tok: Any, rows: list[Any], fmt: str = "completion", name: str = "a.jsonl", **kw: Any) -> Any:
    write_jsonl(tmp_path / name, rows)
    return load_examples(config(DatasetConfig(path=name, format=fmt), **kw), tok, tmp_path)  # type: ignore[arg-type]


def everything(ex: Any) -> list[Example]:
    return sorted(ex.train + ex.val, key=lambda e: e.line)


def trained_text(tok: Any, example: Example) -> str:
    return tok.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE])


def assert_mask(example: Example, prompt_len: int) -> None:
    """-100 exactly on the first ``prompt_len`` tokens, the ids themselves on the rest."""
    assert example.labels[:prompt_len] == [IGNORE] * prompt_len
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    assert len(example.labels) > prompt_len


# -- rendering per format ------------------------------------------------------------------


def test_completion_trains_on_all_and_ends_with_eos(tmp_path: Path, tok: Any) -> None:
    ex = load(tmp_path, tok, [{"text": "The quick brown fox."}, {"text": "Lists hold items."}])
    for e in everything(ex):
        assert e.input_ids[-1] == tok.eos_token_id
        assert e.labels == e.input_ids
    assert tok.decode(everything(ex)[0].input_ids, skip_special_tokens=True) == "The quick brown fox."


def test_alpaca_prompt_carries_no_loss(tmp_path: Path, tok: Any) -> None:
    rows = [{"instruction": "Name a type.", "input": "Python", "output": "A list."}, {"instruction": "Say hi.", "output": "Hi."}]
    first, second = everything(load(tmp_path, tok, rows, "alpaca"))
    prompt = tok(ALPACA_PROMPT.format(instruction="Name a type.", input="Python"))["input_ids"]
    assert_mask(first, len(prompt))
    assert first.input_ids[: len(prompt)] == prompt
    assert trained_text(tok, first) == "A list.</s>"
    prompt2 = tok(ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."))["input_ids"]
    assert_mask(second, len(prompt2))


def test_alpaca_train_on_inputs(tmp_path: Path, tok: Any) -> None:
    (e, _) = everything(load(tmp_path, tok, [{"instruction": "Say hi.", "output": "Hi."}] * 2, "alpaca", train_on_inputs=True))
    assert e.labels == e.input_ids


def render(tok: Any, fields: dict[str, Any], fmt: str, **kw: Any) -> Example:
    """One example through the checks and the renderer, as load_examples does."""
    from pipeline.finetune.formats import check
    from pipeline.finetune.render import Renderer

    cfg = config(DatasetConfig(path="a.jsonl", format=fmt), **kw)  # type: ignore[arg-type]
    ids, labels = Renderer(tok, cfg).render(check(fields, cfg.datasets[0], cfg.roles_to_train))
    return Example(ids, labels, "a.jsonl", 1)


def chat_prefix_len(tok: Any, messages: list[dict[str, Any]], **kw: Any) -> int:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_chat_loss_only_on_the_assistant_reply(tok: Any) -> None:
    e = render(tok, {"messages": CHAT[:3]}, "chat")
    # The generation prompt "<|im_start|>assistant\n" is the prompt's last part: no loss on it.
    assert_mask(e, chat_prefix_len(tok, CHAT[:2]))
    assert trained_text(tok, e) == "Lists hold items in order.<|im_end|>\n"
    assert tok.decode(e.input_ids) == tok.apply_chat_template(CHAT[:3], tokenize=False)


def test_chat_multi_turn_trains_every_assistant_turn(tok: Any) -> None:
    e = render(tok, {"messages": CHAT}, "chat")
    assert trained_text(tok, e) == "Lists hold items in order.<|im_end|>\nStrings are immutable.<|im_end|>\n"
    assert e.labels[: chat_prefix_len(tok, CHAT[:2])] == [IGNORE] * chat_prefix_len(tok, CHAT[:2])


def test_roles_to_train_picks_the_turns(tok: Any) -> None:
    e = render(tok, {"messages": CHAT[:3]}, "chat", roles_to_train=["user"])
    assert trained_text(tok, e) == "<|im_start|>user\nWhat is a list?<|im_end|>\n"
    both = render(tok, {"messages": CHAT[:3]}, "chat", roles_to_train=["user", "assistant"])
    assert trained_text(tok, both) == "<|im_start|>user\nWhat is a list?<|im_end|>\nLists hold items in order.<|im_end|>\n"


def test_chat_train_on_inputs_trains_everything(tok: Any) -> None:
    e = render(tok, {"messages": CHAT[:3]}, "chat", train_on_inputs=True)
    assert e.labels == e.input_ids


def test_base_without_template_uses_the_recipes_then_the_default(base: Path) -> None:
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(base, local_files_only=True)
    bare.chat_template = None
    default = render(bare, {"messages": CHAT[:3]}, "chat")
    assert tok_text(bare, default).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert trained_text(bare, default) == "Lists hold items in order.<|im_end|>\n"
    mine = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    own = render(bare, {"messages": CHAT[:3]}, "chat", chat_template=mine)
    assert tok_text(bare, own) == "[system] Be brief.\n[user] What is a list?\n[assistant] Lists hold items in order.\n"
    assert trained_text(bare, own).strip() == "Lists hold items in order."
    assert tok_text(bare, default) == bare.apply_chat_template(CHAT[:3], chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False)


def tok_text(tok: Any, e: Example) -> str:
    return tok.decode(e.input_ids)


TOOLS_EXAMPLE = {
    "tools": [{"type": "function", "function": {"name": "lookup", "description": "Find a word", "parameters": {"type": "object"}}}],
    "messages": [
        {"role": "user", "content": "Define list."},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": '{"word": "list"}'}}]},
        {"role": "tool", "content": "items in order"},
        {"role": "assistant", "content": "Items in order."},
    ],
}


def test_tools_default_rendering_trains_calls_not_results(tok: Any) -> None:
    e = render(tok, TOOLS_EXAMPLE, "tools")
    text = tok_text(tok, e)
    # The fixture's ChatML ignores tools: specs go into a system turn, calls into the content as JSON.
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "lookup"' in text
    assert "<|im_start|>tool\nitems in order<|im_end|>" in text
    assert trained_text(tok, e) == ('<tool_call>\n{"name": "lookup", "arguments": {"word": "list"}}\n</tool_call><|im_end|>\nItems in order.<|im_end|>\n')


def test_tools_native_template_gets_tools_and_tool_calls(base: Path) -> None:
    from transformers import AutoTokenizer

    native = AutoTokenizer.from_pretrained(base, local_files_only=True)
    native.chat_template = (
        "{% if tools %}<|im_start|>system\nTOOLS {{ tools | length }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% for c in m.get('tool_calls', []) %}CALL {{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    e = render(native, TOOLS_EXAMPLE, "tools")
    assert tok_text(native, e).startswith("<|im_start|>system\nTOOLS 1<|im_end|>\n")
    assert trained_text(native, e) == 'CALL lookup {"word": "list"}<|im_end|>\nItems in order.<|im_end|>\n'


def test_input_output_segments(tok: Any) -> None:
    fields = {"segments": [{"text": "Q: a list?\n", "label": False}, {"text": "A: items.", "label": True}, {"text": " (end)", "label": False}]}
    e = render(tok, fields, "input_output")
    n = len(tok("Q: a list?\n", add_special_tokens=False)["input_ids"])
    m = len(tok("A: items.", add_special_tokens=False)["input_ids"])
    assert e.labels[:n] == [IGNORE] * n and e.labels[n : n + m] == e.input_ids[n : n + m] and set(e.labels[n + m :]) == {IGNORE}
    assert trained_text(tok, e) == "A: items."


# -- malformed examples --------------------------------------------------------------------

MALFORMED = [
    ("completion", "{not json", "", "malformed JSON"),
    ("completion", '["a list"]', "", "JSON array"),
    ("completion", {"txt": "x"}, "text", "no 'text' field"),
    ("completion", {"text": 3}, "text", "not a string"),
    ("alpaca", {"instruction": "Say hi.", "output": ""}, "output", "empty"),
    ("chat", {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages", "message 0 has no 'role'"),
    ("chat", {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages", "message 0 has no 'content'"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "role 'wizard'"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "messages", "empty assistant response"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "messages", "nothing to learn"),
    ("tools", {"tools": [], "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": ["lookup"]}]}, "messages", "tool call 0"),
    (
        "tools",
        {"tools": [], "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1"}}]}]},
        "messages",
        "arguments is not valid JSON",
    ),
    ("tools", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "tools", "no 'tools' field"),
    ("input_output", {"segments": [{"text": "a", "label": "yes"}]}, "segments", "segment 0"),
]


@pytest.mark.parametrize(("fmt", "bad", "field", "words"), MALFORMED)
def test_malformed_example_fails_naming_file_line_and_field(tmp_path: Path, tok: Any, fmt: str, bad: Any, field: str, words: str) -> None:
    good = {
        "completion": {"text": "Hello."},
        "alpaca": {"instruction": "Say hi.", "output": "Hi."},
        "chat": {"messages": CHAT[:3]},
        "tools": TOOLS_EXAMPLE,
        "input_output": {"segments": [{"text": "a", "label": True}]},
    }[fmt]
    with pytest.raises(DataError) as err:
        load(tmp_path, tok, [good, good, bad], fmt, name="set.jsonl")
    message = err.value.message
    assert message.startswith("set.jsonl: line 3: ") and words in message
    if field:
        assert f"'{field}'" in message
    assert 'on_error = "skip"' in err.value.hint


def test_skip_mode_counts_and_records_skips(tmp_path: Path, tok: Any) -> None:
    rows: list[Any] = [{"text": "One."}, "{oops", {"text": ""}, {"text": "Two."}, {"body": "x"}, {"text": "Three."}]
    ex = load(tmp_path, tok, rows, on_error="skip")
    assert len(ex.train) + len(ex.val) == 3 and ex.read == 6
    assert [(s.file, s.line, s.field, s.reason) for s in ex.skips] == [
        ("a.jsonl", 2, "", "malformed_json"),
        ("a.jsonl", 3, "text", "empty"),
        ("a.jsonl", 5, "text", "missing_field"),
    ]
    assert ex.skips[2].as_dict()["line"] == 5


def test_a_file_with_no_usable_example_is_an_error_in_skip_mode(tmp_path: Path, tok: Any) -> None:
    with pytest.raises(DataError, match="no usable example"):
        load(tmp_path, tok, [{"body": "x"}, {"body": "y"}], on_error="skip")


def test_deeply_nested_json_is_malformed_not_a_crash(tmp_path: Path, tok: Any) -> None:
    deep = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    medium = json.dumps({"messages": [{"role": "user", "content": "hi", "x": json.loads("[" * 200 + "]" * 200)}, {"role": "assistant", "content": "ok"}]})
    with pytest.raises(DataError, match=r"a\.jsonl: line 2: .*nested"):
        load(tmp_path, tok, [{"text": "fine"}, deep], on_error="fail")
    ex = load(tmp_path, tok, [{"messages": CHAT[:3]}, deep, medium, {"messages": CHAT}], "chat", on_error="skip")
    assert [(s.line, s.reason) for s in ex.skips] == [(2, "too_deep"), (3, "too_deep")]


def test_missing_file_and_unknown_suffix(tmp_path: Path, tok: Any) -> None:
    with pytest.raises(DataError, match="no such example file"):
        load_examples(config(DatasetConfig(path="nope.jsonl")), tok, tmp_path)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"\.jsonl, \.jsonl\.gz, \.parquet or \.csv"):
        load_examples(config(DatasetConfig(path="a.txt")), tok, tmp_path)


# -- other file formats --------------------------------------------------------------------


def test_jsonl_gz_parquet_and_csv_inputs(tmp_path: Path, tok: Any) -> None:
    rows = [{"instruction": f"Say {w}.", "input": "", "output": f"{w.title()}."} for w in ("hi", "bye", "yes")]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    rendered = {}
    for name in ("a.jsonl.gz", "a.parquet", "a.csv"):
        ex = load_examples(config(DatasetConfig(path=name, format="alpaca")), tok, tmp_path)
        rendered[name] = sorted(e.input_ids for e in ex.train + ex.val)
    assert rendered["a.jsonl.gz"] == rendered["a.parquet"] == rendered["a.csv"]


def test_parquet_chat_with_nested_columns_and_bad_row(tmp_path: Path, tok: Any) -> None:
    rows = [{"messages": CHAT[:3]}, {"messages": [{"role": "robot", "content": "x"}]}, {"messages": CHAT}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    ex = load_examples(config(DatasetConfig(path="c.parquet", format="chat"), on_error="skip"), tok, tmp_path)
    assert len(ex.train + ex.val) == 2
    (skip,) = ex.skips
    assert (skip.unit, skip.line, skip.field, skip.reason) == ("row", 1, "messages", "unknown_role")
    with pytest.raises(DataError, match=r"c\.parquet: row 1: field 'messages': message 0 has role 'robot'"):
        load_examples(config(DatasetConfig(path="c.parquet", format="chat")), tok, tmp_path)


def test_csv_messages_as_json_text_and_line_numbers(tmp_path: Path, tok: Any) -> None:
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(CHAT[:3])])
        writer.writerow(["multi\nline, not json"])
        writer.writerow([json.dumps(CHAT)])
    with pytest.raises(DataError, match=r"c\.csv: line 3: field 'messages': malformed JSON"):
        load_examples(config(DatasetConfig(path="c.csv", format="chat")), tok, tmp_path)


# -- validation split ----------------------------------------------------------------------


def test_val_split_is_stable_and_keeps_duplicates_together(tmp_path: Path, tok: Any) -> None:
    rows = [{"text": f"Example number {i}."} for i in range(60)] + [{"text": "Example number 7."}]
    a = load(tmp_path, tok, rows, val_fraction=0.2)
    b = load(tmp_path, tok, list(reversed(rows)), val_fraction=0.2)
    assert sorted(e.input_ids for e in a.val) == sorted(e.input_ids for e in b.val)
    assert 3 <= len(a.val) <= 25 and len(a.train) + len(a.val) == 61
    val_ids = {tuple(e.input_ids) for e in a.val}
    assert not val_ids & {tuple(e.input_ids) for e in a.train}


def test_val_split_holds_out_one_and_refuses_one(tmp_path: Path, tok: Any) -> None:
    ex = load(tmp_path, tok, [{"text": "One."}, {"text": "Two."}], val_fraction=0.0)
    assert len(ex.train) == 1 and len(ex.val) == 1
    (held,) = ex.val
    assert example_hash(held) == min(example_hash(e) for e in ex.train + ex.val)
    with pytest.raises(DataError) as err:
        load(tmp_path, tok, [{"text": "Only."}])
    assert "[finetune] datasets" in err.value.message and "val_fraction" in err.value.hint
    train, val = split_validation(ex.train + ex.val, 0.99)
    assert len(train) == 1 and len(val) == 1


def test_val_datasets_are_the_validation_set(tmp_path: Path, tok: Any) -> None:
    write_jsonl(tmp_path / "t.jsonl", [{"text": "Train me."}])
    write_jsonl(tmp_path / "v.jsonl", [{"text": "Check me."}])
    ex = load_examples(config(DatasetConfig(path="t.jsonl"), DatasetConfig(path="v.jsonl", split="val")), tok, tmp_path)
    assert [e.file for e in ex.train] == ["t.jsonl"] and [e.file for e in ex.val] == ["v.jsonl"]


# -- packing -------------------------------------------------------------------------------


def ex_of(ids: list[int], prompt: int = 0) -> Example:
    return Example(list(ids), [IGNORE] * prompt + list(ids[prompt:]), "x", 1)


def test_packing_positions_restart_and_windows_fill() -> None:
    examples = [ex_of(range(10, 10 + n)) for n in (5, 3, 6, 2, 4)]
    packed = build_windows(examples, 10, packing=True)
    assert packed.truncated == packed.dropped == 0
    assert sorted(len(w.input_ids) for w in packed.windows) == [10, 10]
    for w in packed.windows:
        starts = [i for i, p in enumerate(w.position_ids) if p == 0]
        assert starts == [i for i, s in enumerate(w.segments) if i == 0 or s != w.segments[i - 1]]
    assert sum(len(w.input_ids) for w in packed.windows) == 20


def test_truncation_is_counted_and_a_prompt_only_cut_dropped() -> None:
    long = ex_of(range(1, 30))
    prompt_heavy = ex_of(range(1, 30), prompt=25)
    packed = build_windows([long, prompt_heavy, ex_of([5, 6, 7])], 8, packing=True)
    assert packed.truncated == 2 and packed.dropped == 1
    assert [len(w.input_ids) for w in packed.windows] == [8, 3]
    assert packed.windows[0].input_ids == list(range(1, 9))


def test_no_packing_right_pads_with_a_2d_mask() -> None:
    windows = build_windows([ex_of([5, 6, 7], prompt=1), ex_of([8, 9])], 16, packing=False).windows
    batch = collate(windows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, 9, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_packed_mask_is_block_diagonal_causal() -> None:
    import torch

    windows = build_windows([ex_of([5, 6, 7]), ex_of([8, 9]), ex_of([1, 2, 3, 4])], 5, packing=True).windows
    assert [w.input_ids for w in windows] == [[1, 2, 3, 4], [5, 6, 7, 8, 9]]
    batch = collate(windows, pad_id=0, dtype=torch.bfloat16)
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bfloat16
    assert (mask[1, 0] == 0).int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    # Padding sees only itself (no all-masked row, no NaN); real tokens never see padding.
    assert (mask[0, 0] == 0).int().tolist()[3:] == [[1, 1, 1, 1, 0], [0, 0, 0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist()[0][-1] == IGNORE and batch["input_ids"].tolist()[0][-1] == 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_see_each_other(base: Path, tok: Any, attn: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, attn_implementation=attn).eval()
    a = render(tok, {"messages": CHAT[:3]}, "chat")
    a2 = render(tok, {"messages": CHAT[3:5]}, "chat")
    b = render(tok, {"text": "Lists hold items."}, "completion")
    # Best-fit decreasing puts the longer example first: b follows a (or a2) in the window.
    assert min(len(a.input_ids), len(a2.input_ids)) > len(b.input_ids) and len(a2.input_ids) != len(a.input_ids)
    seq = len(a.input_ids) + len(a2.input_ids) + len(b.input_ids)
    pad = pad_id_of(tok)

    def logits_of_b(first: Example, isolate: bool = True) -> torch.Tensor:
        (window,) = build_windows([first, b], seq, packing=True).windows
        batch = collate([window], pad)
        at = window.segments.index(1)
        assert window.input_ids[at:] == b.input_ids
        mask = batch["attention_mask"] if isolate else None
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask)
        return out.logits[0, at : at + len(b.input_ids)]

    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b.input_ids])).logits[0]
    one, other = logits_of_b(a), logits_of_b(a2)
    torch.testing.assert_close(one, other, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one, alone, atol=1e-5, rtol=1e-5)
    # The check has teeth: position ids alone (what transformers would detect without a cache)
    # do not isolate here, so b's logits follow a's tokens.
    assert not torch.allclose(logits_of_b(a, isolate=False), logits_of_b(a2, isolate=False), atol=1e-5)


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path: Path, base: Path) -> None:
    from transformers import AutoTokenizer

    odd = AutoTokenizer.from_pretrained(base, local_files_only=True)
    # Like templates that drop earlier turns' reasoning: the last message renders differently.
    odd.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] if loop.last else m['content'][:3] }}\n{% endfor %}"
    write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError) as err:
        load_examples(config(DatasetConfig(path="c.jsonl", format="chat")), odd, tmp_path)
    assert "c.jsonl: line 1: field 'messages'" in err.value.message and "chat_template" in err.value.hint


def test_qwen2_packed_examples_do_not_see_each_other(tmp_path: Path, tok: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_tiny_base(tmp_path / "qwen", arch="qwen2"), local_files_only=True).eval()
    b = render(tok, {"text": "Lists hold items."}, "completion")
    outs = []
    for first in (render(tok, {"messages": CHAT[:3]}, "chat"), render(tok, {"messages": CHAT[3:5]}, "chat")):
        (window,) = build_windows([first, b], 128, packing=True).windows
        batch = collate([window], pad_id_of(tok))
        at = window.segments.index(1)
        with torch.no_grad():
            outs.append(model(**{k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}).logits[0, at:])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40)), min_size=1, max_size=30),
    seq_len=st.integers(2, 32),
    packing=st.booleans(),
)
def test_windows_hold_every_kept_example_once(lengths: list[tuple[int, int]], seq_len: int, packing: bool) -> None:
    examples = [
        Example(list(range(100 * i, 100 * i + n)), [IGNORE] * min(p, n) + list(range(100 * i + min(p, n), 100 * i + n)), "x", i)
        for i, (n, p) in enumerate(lengths)
    ]
    packed = build_windows(examples, seq_len, packing)
    assert packed.truncated == sum(n > seq_len for n, _ in lengths)
    pieces = []
    for w in packed.windows:
        assert 0 < len(w.input_ids) <= seq_len and len(w.labels) == len(w.position_ids) == len(w.segments) == len(w.input_ids)
        for s in sorted(set(w.segments)):
            idx = [i for i, seg in enumerate(w.segments) if seg == s]
            assert [w.position_ids[i] for i in idx] == list(range(len(idx)))
            pieces.append(([w.input_ids[i] for i in idx], [w.labels[i] for i in idx]))
    expected = [(e.input_ids[:seq_len], e.labels[:seq_len]) for e in examples if any(label != IGNORE for label in e.labels[:seq_len])]
    assert sorted(pieces) == sorted(expected)
    assert len(expected) == len(examples) - packed.dropped
