"""A fine-tuning run through the service: base verified and recorded file by file, examples
rendered with the base's tokenizer, the adapter trained, signed and recorded with its lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli, new_home, run_to_end
from tests.finetune_fixtures import build_tiny_base

pytestmark = pytest.mark.slow

LINES = [
    "The module provides functions for working with paths.",
    "Call open() to read a file; the result is a file object.",
    "Lists hold items in order, and dictionaries map keys to values.",
    "A function returns a value; a generator yields many.",
    "Errors are raised as exceptions and handled with try and except.",
    "Strings are immutable; numbers can be integers or floating point.",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


def _recipe(folder: Path, base: Path, *, unsigned_ok: bool = True, gate: str = "") -> Path:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES * 3))
    recipe = folder / "ft.toml"
    recipe.write_text(
        f"""[recipe]
name = "ft-test"

[finetune]
base = "{base}"
allow_unsigned_base = {"true" if unsigned_ok else "false"}
method = "lora"
target_modules = ["q_proj", "v_proj"]
lora_r = 4
lora_alpha = 8
val_fraction = 0.2

[[finetune.datasets]]
path = "data/train.jsonl"
format = "completion"

[train]
steps = 4
batch_size = 2
seq_len = 64
lr = 1e-3
warmup_steps = 1
checkpoint_every = 2
log_every = 1
"""
        + gate
    )
    return recipe


def _artifacts(svc: object, run_id: str) -> list[tuple[str, str, str]]:
    rows = svc.ledger.select(  # type: ignore[attr-defined]
        "SELECT json_extract_string(body, '$.data.kind'), json_extract_string(body, '$.data.name'), json_extract_string(body, '$.data.stage') FROM events "
        "WHERE kind = 'artifact.recorded' AND json_extract_string(body, '$.data.run_id') = ? ORDER BY seq",
        [run_id],
    )
    return [tuple(r) for r in rows]


def test_a_lora_run_records_base_examples_and_a_signed_adapter(tmp_path: Path, base: Path) -> None:
    recipe = _recipe(tmp_path, base)
    with new_home(tmp_path / "home") as svc:
        final = run_to_end(svc, recipe)
        assert final["status"] == "succeeded", final
        run_id = final["run_id"]
        arts = _artifacts(svc, run_id)
        # Its base lives outside the store, so the service will not sample from the adapter: it says why and what to do.
        from appliance.server.client import LocalClient
        from pipeline.errors import ConfigError

        with pytest.raises(ConfigError, match=r"LoRA adapter whose base \(tiny-llama\) is not a model in this appliance's store") as refused:
            LocalClient(svc).call("model.generate", model=final["summary"]["model_digest"], prompts=["The"], sample={"max_new_tokens": 2})
        assert "finetune.merge = true" in refused.value.diagnostics()
    stats = final["summary"]["stats"]
    assert stats["base"]["unsigned_allowed"] is True and stats["base"]["verification"] == "unsigned-allowed"
    assert stats["examples"]["train_examples"] > 0 and stats["examples"]["val_examples"] > 0
    assert stats["finetune"]["steps"] == 4 and stats["finetune"]["completed"] is True
    kinds = {k for k, _, _ in arts}
    assert {"base-model-file", "base-model", "finetune-examples", "adapter", "source", "eval-report", "model"} <= kinds, arts
    assert stats["ft_evaluate"]["promoted"] is True and stats["ft_evaluate"]["val_loss"] > 0
    assert stats["ft_package"]["packaged"] is True
    base_files = [n for k, n, _ in arts if k == "base-model-file"]
    assert any(n.endswith("/model.safetensors") for n in base_files) and any(n.endswith("/tokenizer.json") for n in base_files)
    adapter = Path(final["summary"]["model_path"])
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "model.sig").is_file() and (adapter / "MODEL_CARD.md").is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, local_files_only=True), adapter)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_an_unsigned_base_is_refused_before_anything_loads(tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, base, unsigned_ok=False)
    new_home(tmp_path / "home").close()
    code, _, err = cli(capsys, "--home", str(tmp_path / "home"), "finetune", str(recipe))
    assert code != 0 and "allow_unsigned_base" in err and "Traceback" not in err
    # Refused in the base stage: nothing of the base was recorded, no adapter trained.
    from appliance.service import Service
    from tests.conftest import PASSPHRASE

    with Service.open(tmp_path / "home", PASSPHRASE.encode()) as svc:
        kinds = svc.ledger.select("SELECT DISTINCT json_extract_string(body, '$.data.kind') FROM events WHERE kind = 'artifact.recorded'")
    assert {k for (k,) in kinds} == {"recipe"}, kinds


def test_a_model_below_the_gate_is_recorded_and_not_packaged(tmp_path: Path, base: Path) -> None:
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps({"prompt": t[:20], "reference": t[20:]}) + "\n" for t in LINES[:3]))
    recipe = _recipe(tmp_path, base, gate='\n[finetune.gate]\ntask_file = "tasks.jsonl"\nmin_chrf = 99.0\nmax_new_tokens = 8\n')
    with new_home(tmp_path / "home") as svc:
        final = run_to_end(svc, recipe)
        arts = _artifacts(svc, final["run_id"])
    assert final["status"] == "succeeded", final
    stats = final["summary"]["stats"]
    assert stats["ft_evaluate"]["promoted"] is False and any("finetune.gate.min_chrf" in r for r in stats["ft_evaluate"]["reasons"])
    assert "base_scores" in stats["ft_evaluate"] and "tuned_scores" in stats["ft_evaluate"]
    assert stats["ft_package"] == {"promoted": False, "reasons": stats["ft_evaluate"]["reasons"], "packaged": False}
    assert "model" not in {k for k, _, _ in arts}


def _adapter_tensors(path: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_kill_9_mid_finetune_then_resume_is_bit_identical(tmp_path: Path, base: Path) -> None:
    import os
    import signal
    import time

    import torch

    from appliance.service import Caller
    from appliance.service.api import dispatch

    steps = "steps = 8\nbatch_size = 2"
    straight = _recipe(tmp_path / "a", base)
    straight.write_text(straight.read_text().replace("steps = 4\nbatch_size = 2", steps))
    with new_home(tmp_path / "a" / "home") as svc:
        final = run_to_end(svc, straight)
    assert final["status"] == "succeeded", final
    want = _adapter_tensors(Path(final["summary"]["model_path"]))

    killed = _recipe(tmp_path / "b", base)
    killed.write_text(killed.read_text().replace("steps = 4\nbatch_size = 2", steps))
    with new_home(tmp_path / "b" / "home") as svc:
        run_id = dispatch(svc, Caller.current(), "run.start", {"recipe": str(killed)})["run_id"]
        ckpts = tmp_path / "b" / "home" / "work" / run_id / "finetune" / "checkpoints"
        deadline = time.monotonic() + 300
        while not (ckpts.is_dir() and any((d / "COMPLETE").is_file() for d in ckpts.iterdir())):
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        job = svc.runs.active[run_id].job
        assert job is not None and job.proc is not None
        os.kill(job.proc.pid, signal.SIGKILL)  # no handler runs: the newest complete checkpoint is all there is
        assert svc.runs.wait(run_id)["status"] == "failed"
        dispatch(svc, Caller.current(), "run.resume", {"run": run_id})
        final = svc.runs.wait(run_id)
        saved = svc.ledger.select(
            "SELECT CAST(body ->> '$.data.step' AS BIGINT), body ->> '$.data.stage' FROM events WHERE kind = 'checkpoint.saved' AND body ->> '$.data.run_id' = ? ORDER BY seq",
            [run_id],
        )
        resumed = svc.ledger.select(
            "SELECT CAST(body ->> '$.data.step' AS BIGINT) FROM events WHERE kind = 'train.resumed' AND body ->> '$.data.run_id' = ?", [run_id]
        )
    assert final["status"] == "succeeded", final
    assert final["summary"]["stats"]["finetune"]["resumed_from_step"] > 0
    # Every checkpoint the job wrote was recorded as it appeared, and the resume started from one of them.
    assert saved and {stage for _, stage in saved} == {"finetune"} and [s for s, _ in saved][-1] == 8
    assert resumed and resumed[0][0] in {s for s, _ in saved}
    got = _adapter_tensors(Path(final["summary"]["model_path"]))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # type: ignore[arg-type]


def test_pre_train_here_adapt_here(tmp_path: Path, home_copy: tuple[Path, object]) -> None:
    # The appliance's own packaged model, named by digest, is a base: found in the store, its
    # model-signing signature verified with the home's key, never copied out.
    from appliance.service import Service
    from tests.conftest import PASSPHRASE

    home, summary = home_copy
    digest = summary.model_digest  # type: ignore[attr-defined]
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES * 2))
    recipe = tmp_path / "ft" / "adapt.toml"
    recipe.write_text(
        f"""[recipe]
name = "adapt-here"

[finetune]
base = "model:{digest[:16]}"
target_modules = ["q_proj", "v_proj"]
val_fraction = 0.2

[[finetune.datasets]]
path = "train.jsonl"
format = "completion"

[train]
steps = 3
batch_size = 2
seq_len = 64
warmup_steps = 1
checkpoint_every = 3
"""
    )
    with Service.open(home, PASSPHRASE.encode()) as svc:
        final = run_to_end(svc, recipe)
        arts = _artifacts(svc, final["run_id"])
    assert final["status"] == "succeeded", final
    base = final["summary"]["stats"]["base"]
    assert base["verification"] == "key" and base["unsigned_allowed"] is False
    assert base["base"] == str(svc.store.path_of(digest))
    assert "model" in {k for k, _, _ in arts}


def test_a_window_longer_than_the_base_context_is_refused_at_the_start(tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The base's config.json is read when the run is asked for: refused before anything is recorded.
    recipe = _recipe(tmp_path, base)
    recipe.write_text(recipe.read_text().replace("seq_len = 64", "seq_len = 1024"))
    new_home(tmp_path / "home").close()
    code, _, err = cli(capsys, "--home", str(tmp_path / "home"), "finetune", str(recipe))
    assert code != 0 and "Traceback" not in err
    assert "train.seq_len = 1024 is longer than the base model's context (256 positions" in err and "config.json" in err
    from appliance.service import Service
    from tests.conftest import PASSPHRASE

    with Service.open(tmp_path / "home", PASSPHRASE.encode()) as svc:
        started = svc.ledger.select("SELECT count(*) FROM events WHERE kind IN ('run.started', 'artifact.recorded')")
    assert started == [(0,)]


def test_a_missing_finetune_extra_is_refused_at_the_start(tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from appliance.service import Caller
    from appliance.service.api import dispatch
    from pipeline.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    recipe = _recipe(tmp_path, base)
    with new_home(tmp_path / "home") as svc:
        with pytest.raises(ConfigError, match="fine-tuning needs peft") as err:
            dispatch(svc, Caller.current(), "run.start", {"recipe": str(recipe)})
        assert ".[finetune]" in err.value.hint and svc.runs.list(Caller.current()) == []


def test_a_full_fine_tune_on_two_ranks_is_recorded_packaged_and_loads(tmp_path: Path, base: Path) -> None:
    # method = "full" through the service: two DDP ranks under torchrun, every checkpoint recorded,
    # the tuned weights a signed "finetuned-model", the promoted model a transformers directory.
    recipe = _recipe(tmp_path, base)
    text = recipe.read_text().replace('method = "lora"', 'method = "full"').replace("[train]", "[train]\nnum_threads = 1")
    recipe.write_text(text + "\n[distributed]\nnproc_per_node = 2\n")
    with new_home(tmp_path / "home") as svc:
        final = run_to_end(svc, recipe)
        assert final["status"] == "succeeded", final
        run_id = final["run_id"]
        arts = _artifacts(svc, run_id)
        saved = svc.ledger.select(
            "SELECT CAST(body ->> '$.data.step' AS BIGINT) FROM events WHERE kind = 'checkpoint.saved' AND body ->> '$.data.run_id' = ? ORDER BY seq", [run_id]
        )
    stats = final["summary"]["stats"]
    assert stats["finetune"]["engine"] == "ddp" and stats["finetune"]["world_size"] == 2 and stats["finetune"]["method"] == "full"
    assert [s for (s,) in saved] == [2, 4]
    kinds = {k for k, _, _ in arts}
    assert "finetuned-model" in kinds and "adapter" not in kinds and "model" in kinds, arts
    model_dir = Path(final["summary"]["model_path"])
    assert (model_dir / "model.sig").is_file() and "full fine-tune" in (model_dir / "MODEL_CARD.md").read_text()

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    start = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)
    assert set(load_file(str(model_dir / "model.safetensors"))) == {n for n, _ in start.named_parameters()}


def test_a_lora_run_on_two_processes_is_refused_at_the_start(tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, base)
    recipe.write_text(recipe.read_text() + "\n[distributed]\nnproc_per_node = 2\n")
    new_home(tmp_path / "home").close()
    code, _, err = cli(capsys, "--home", str(tmp_path / "home"), "finetune", str(recipe))
    assert code != 0 and "Traceback" not in err
    assert 'finetune.method = "lora" trains on one process' in err and "nproc_per_node = 1" in err
