"""The console's Chat tab on a real service: sampling from tiny-test, settings checked inline,
the model.use gate, and compare (base and fine-tune side by side) disabled with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.widgets import Button, Input, Label, RichLog, Select

from tests.console_fixtures import console_base, console_home, open_console, run_console, settle  # noqa: F401

GENERATE_S = 120.0  # a generation job starts a Python with torch; the service verifies the model first


async def open_chat(app: Any, pilot: Any) -> Any:
    await pilot.press("8")
    await settle(pilot, app)
    return app.query_one("ChatPane")


def log_text(app: Any, which: str = "#chat-log") -> str:
    return "\n".join(line.text for line in app.query_one(which, RichLog).lines)


def label_text(app: Any, selector: str) -> str:
    return str(app.query_one(selector, Label).render())


async def type_prompt(app: Any, pilot: Any, text: str) -> None:
    app.query_one("#chat-prompt", Input).focus()
    await pilot.pause()
    for ch in text:
        await pilot.press("space" if ch == " " else ch)


def test_tiny_test_answers_a_greedy_prompt(console_home: Path) -> None:
    with open_console(console_home) as session:
        (model,) = [m for m in session.call("registry.list") if m["kind"] == "model"]

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_chat(app, pilot)
            assert app.focused is app.query_one("#chat-prompt", Input)  # press 8 and type
            assert app.query_one("#chat-model", Select).value == model["digest"]
            assert "tiny-test:1" in str(app.query_one("#chat-log", RichLog).border_title)
            app.query_one("#chat-temperature", Input).value = "0"  # greedy
            app.query_one("#chat-max-new-tokens", Input).value = "8"
            await type_prompt(app, pilot, "The class")
            await pilot.press("enter")
            assert pane.busy and app.query_one("#chat-send", Button).disabled  # no second send while one is on its way
            await settle(pilot, app, timeout=GENERATE_S)
            text = log_text(app)
            assert "you › The class" in text
            assert "tiny-test:1 › The class" in text and "8 new tokens" in text and "stored model" in text
            assert app.query_one("#chat-prompt", Input).value == ""  # sent: ready for the next one
            assert not pane.busy and not app.query_one("#chat-send", Button).disabled
            assert app.errors == []

        run_console(session, steps)


def test_bad_settings_are_shown_inline_and_nothing_is_sent(console_home: Path) -> None:
    with open_console(console_home) as session:

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_chat(app, pilot)
            app.query_one("#chat-temperature", Input).value = "-1"
            app.query_one("#chat-top-p", Input).value = "abc"
            await pilot.pause()
            problems = label_text(app, "#chat-problems")
            # Every bad field at once, as the job's own checks word them, and marked where it is typed.
            assert "temperature: must be >= 0" in problems and "top-p: 'abc' is not a number" in problems
            assert app.query_one("#chat-temperature", Input).has_class("-invalid")
            assert not app.query_one("#chat-top-k", Input).has_class("-invalid")
            await type_prompt(app, pilot, "hello")
            await pilot.press("enter")
            await settle(pilot, app)
            assert "not sent" in label_text(app, "#chat-status")
            assert log_text(app) == "" and not pane.busy
            assert app.query_one("#chat-prompt", Input).value == "hello"  # kept, to send once fixed
            assert not [w for w in app.workers if w.group == "chat-generate"]
            app.query_one("#chat-temperature", Input).value = "0.5"
            app.query_one("#chat-top-p", Input).value = "0.9"
            await pilot.pause()
            assert label_text(app, "#chat-problems") == ""

        run_console(session, steps)


def test_an_auditor_sees_send_disabled_naming_model_use(console_home: Path) -> None:
    with open_console(console_home, user="ada") as session:

        async def steps(app: Any, pilot: Any) -> None:
            await open_chat(app, pilot)
            send = app.query_one("#chat-send", Button)
            assert send.disabled and "lacks model.use" in str(send.tooltip)
            status = label_text(app, "#chat-status")
            assert "send disabled" in status and "ada (auditor) lacks model.use" in status
            assert app.query_one("#chat-compare", Button).disabled
            await type_prompt(app, pilot, "hi")
            await pilot.press("ctrl+s")
            await settle(pilot, app)
            assert "model.use" in app.errors[-1][0]
            assert log_text(app) == "" and not [w for w in app.workers if w.group == "chat-generate"]

        run_console(session, steps)


def test_compare_is_disabled_with_the_reason_when_there_is_no_fine_tune(console_home: Path) -> None:
    with open_console(console_home, user="mel") as session:

        async def steps(app: Any, pilot: Any) -> None:
            pane = await open_chat(app, pilot)
            compare = app.query_one("#chat-compare", Button)
            assert compare.disabled and "no fine-tune of tiny-test:1" in str(compare.tooltip)
            assert not app.query_one("#chat-send", Button).disabled  # mel (ml-engineer) holds model.use
            await pilot.press("ctrl+t")
            assert not pane.compare
            assert "compare disabled" in label_text(app, "#chat-status") and "appliance finetune" in label_text(app, "#chat-status")
            assert not app.query_one("#chat-log-tuned", RichLog).display
            assert all(callable(getattr(pane, method)) for _, _, method in pane.PALETTE)
            assert {b.id for b in pane.BINDINGS} >= {"chat.send", "chat.compare", "chat.model"}

        run_console(session, steps)


def test_fine_tunes_are_paired_with_their_packaged_base() -> None:
    from appliance.console.chat import fine_tune_bases, pair_for

    base, tuned, other = "a" * 64, "b" * 64, "c" * 64
    models = [
        {"digest": base, "kind": "model", "run_id": "run-1", "name": "tiny", "version": 1},
        {"digest": tuned, "kind": "model", "run_id": "run-2", "name": "tiny-ft", "version": 1},
        {"digest": other, "kind": "model", "run_id": "run-3", "name": "ext-ft", "version": 1},
        {"digest": "d" * 64, "kind": "finetuned-model", "run_id": "run-2", "name": "tiny-ft", "version": 2},
    ]
    # Run 2 fine-tuned the stored model (its store directory is its digest); run 3 a base from outside.
    files = [
        {"name": f"base:{base}/config.json", "kind": "base-model-file", "run_id": "run-2"},
        {"name": f"base:{base}/model.safetensors", "kind": "base-model-file", "run_id": "run-2"},
        {"name": "base:Qwen2-0.5B/config.json", "kind": "base-model-file", "run_id": "run-3"},
    ]
    bases = fine_tune_bases(models, files)
    assert bases == {tuned: base}
    order = [base, tuned, other]
    assert pair_for(tuned, bases, order) == pair_for(base, bases, order) and pair_for(base, bases, order).tuned == tuned  # type: ignore[union-attr]
    assert pair_for(other, bases, order) is None


def test_settings_use_the_job_checks_and_the_service_bound() -> None:
    from appliance.console.chat import SERVICE_MAX_NEW_TOKENS, parse_sample
    from appliance.service.models import MAX_NEW_TOKENS

    assert SERVICE_MAX_NEW_TOKENS == MAX_NEW_TOKENS
    sample, problems = parse_sample({"temperature": "0", "top_p": "0.9", "top_k": "0", "max_new_tokens": "16", "seed": "7"})
    assert problems == {} and sample == {"temperature": 0.0, "top_p": 0.9, "top_k": 0, "max_new_tokens": 16, "seed": 7}
    sample, problems = parse_sample({"temperature": "x", "top_p": "0", "top_k": "-1", "max_new_tokens": "5000", "seed": "1.5"})
    assert sample is None and set(problems) == {"temperature", "top_p", "top_k", "max_new_tokens", "seed"}
    assert "top-p: must be in (0, 1]" in problems["top_p"] and "service's bound" in problems["max_new_tokens"]


def _adapt_the_packaged_model(svc: Any, folder: Path) -> dict[str, Any]:
    """A real LoRA fine-tune of the home's own packaged model (as `appliance finetune` runs it)."""
    import json

    from appliance.server.client import LocalClient
    from tests.conftest import run_to_end

    (base,) = [m for m in LocalClient(svc).call("registry.list") if m["kind"] == "model"]
    folder.mkdir()
    lines = ["The class keeps its state in attributes.", "A module is a file of Python definitions.", "The function returns a list of names."]
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines * 3))
    recipe = folder / "adapt.toml"
    recipe.write_text(
        f"""[recipe]
name = "tiny-adapted"

[finetune]
base = "model:{base["digest"][:16]}"
target_modules = ["q_proj", "v_proj"]
val_fraction = 0.2

[[finetune.datasets]]
path = "train.jsonl"
format = "completion"

[train]
steps = 2
batch_size = 2
seq_len = 64
warmup_steps = 1
checkpoint_every = 2
"""
    )
    final = run_to_end(svc, recipe)
    assert final["status"] == "succeeded", final
    return base


def test_compare_sends_one_prompt_to_a_real_fine_tune_and_its_base(tmp_path: Path, console_home: Path) -> None:
    from appliance.service import Service
    from tests.conftest import PASSPHRASE

    with Service.open(console_home, PASSPHRASE.encode()) as svc:
        base = _adapt_the_packaged_model(svc, tmp_path / "ft")
        with open_console(console_home, svc=svc) as session:
            (tuned,) = [m for m in session.call("registry.list") if m["kind"] == "model" and m["digest"] != base["digest"]]

            async def steps(app: Any, pilot: Any) -> None:
                pane = await open_chat(app, pilot)
                # The newest model is picked, and it is the fine-tune: found through its run's base files.
                assert app.query_one("#chat-model", Select).value == tuned["digest"]
                assert pane.bases == {tuned["digest"]: base["digest"]}
                assert not app.query_one("#chat-compare", Button).disabled
                await pilot.press("ctrl+t")
                await pilot.pause()
                assert pane.compare and app.query_one("#chat-log-tuned", RichLog).display
                assert str(app.query_one("#chat-log", RichLog).border_title) == f"base {base['name']}:{base['version']}"
                assert str(app.query_one("#chat-log-tuned", RichLog).border_title) == f"tuned {tuned['name']}:{tuned['version']}"
                app.query_one("#chat-temperature", Input).value = "0"
                app.query_one("#chat-max-new-tokens", Input).value = "6"
                await type_prompt(app, pilot, "The class")
                await pilot.press("enter")
                await settle(pilot, app, timeout=2 * GENERATE_S)
                left, right = log_text(app), log_text(app, "#chat-log-tuned")
                # Each column: the prompt once, and its own model's answer with how it was verified.
                for text, model in ((left, base), (right, tuned)):
                    assert text.count("you › The class") == 1, app.errors
                    assert f"{model['name']}:{model['version']} › The class" in text and "6 new tokens" in text, app.errors
                assert f"{tuned['name']}:" not in left and f"{base['name']}:{base['version']} ›" not in right
                assert not pane.busy and app.errors == []

            run_console(session, steps)
