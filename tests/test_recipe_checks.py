"""Every recipe value is checked before the first stage runs, and every problem is named at once."""

from __future__ import annotations

import math
import re
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.recipe import Recipe, parse_recipe
from appliance.recipe_checks import Machine, parameter_count
from pipeline.config import toml_value
from pipeline.errors import ConfigError
from tests.conftest import cli, new_home

# A machine like CI's: 2 cores, 24 GiB, no GPU. Fixed, so the tests do not depend on the host.
SMALL = Machine(memory_bytes=24 << 30, cpu_cores=2)
BIG_GPU = Machine(memory_bytes=2 << 40, cpu_cores=128, gpu_count=8, gpu_memory_bytes=80 << 30)


def refuse(text: str, machine: Machine | None = SMALL) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse_recipe('[recipe]\nname = "probe"\n' + text, source="probe.toml", machine=machine)
    return err.value


# (case, recipe tables, the key named, a fragment of the message, a fragment of the fix)
BAD = [
    ("vocab_size_1", "[tokenizer]\nvocab_size = 1\n", "tokenizer.vocab_size", "below the 262 pieces", "vocab_size = 4000"),
    ("vocab_size_no_bytes", "[tokenizer]\nvocab_size = 5\nbyte_fallback = false\n", "tokenizer.vocab_size", "below the 6 pieces", "4000"),
    ("seq_len_past_context", "[train]\nseq_len = 512\n", "train.seq_len", "longer than the model's context of 256", "train.seq_len = 256"),
    ("preset_context", '[model]\npreset = "tiny"\n[train]\nseq_len = 256\n', "train.seq_len", "preset 'tiny'", "train.seq_len = 128"),
    ("eval_seq_len_past_context", "[evaluate]\nseq_len = 1000\n", "evaluate.seq_len", "longer than the model's context", "evaluate.seq_len = 0"),
    ("dim_2_40", "[model]\ndim = 1099511627776\n", "model", "more than the 24.0 GiB", 'preset = "20m"'),
    ("lr_inf", "[train]\nlr = inf\n", "train.lr", "is inf, not a finite number", "train.lr = 0.001"),
    ("lr_nan", "[train]\nlr = nan\n", "train.lr", "is nan", "train.lr = 0.001"),
    ("min_lr_neg_inf", "[train]\nmin_lr = -inf\n", "train.min_lr", "-inf", "train.min_lr = 0.0001"),
    ("steps_2_63", "[train]\nsteps = 9223372036854775807\n", "train.steps", "years", "at most"),
    ("steps_1e26", "[train]\nsteps = 1e26\n", "train.steps", "must be a whole number, got 1e+26", "train.steps = 2000"),
    ("max_new_tokens_1e8", "[evaluate]\nmax_new_tokens = 100000000\n", "evaluate.max_new_tokens", "more than the model's context", "at most 256"),
    ("max_new_tokens_float", "[evaluate]\nmax_new_tokens = 1e8\n", "evaluate.max_new_tokens", "must be a whole number", "= 64"),
    ("model_vocab_below_tokenizer", "[model]\nvocab_size = 300\n", "model.vocab_size", "smaller than the tokenizer's", "model.vocab_size = 0"),
    ("typo_with_close_match", "[train]\nstpes = 10\n", "train.stpes", "unknown key", "did you mean 'steps'"),
]


@pytest.mark.parametrize(("text", "key", "said", "fix"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_each_bad_value_is_named_with_a_value_that_works(text: str, key: str, said: str, fix: str) -> None:
    err = refuse(text)
    assert [p.key for p in err.problems] == [key], err.diagnostics()
    assert said in err.message and fix in err.hint, err.diagnostics()
    assert "probe.toml" in err.message


def test_every_problem_is_reported_at_once() -> None:
    text = """
[tokenizer]
vocab_size = 1
[train]
seq_len = 512
lr = inf
stpes = 10
[evaluate]
max_new_tokens = 100000000
[shard]
val_fraction = 1.5
[dedup]
bands = 0
"""
    err = refuse(text)
    keys = {p.key for p in err.problems}
    assert {"tokenizer.vocab_size", "train.seq_len", "train.lr", "evaluate.max_new_tokens", "train.stpes", "shard.val_fraction", "dedup.bands"} <= keys
    assert err.message.startswith(f"probe.toml: {len(err.problems)} problems:")
    # One line per problem, each with its own fix.
    assert all(f"  - {p.line()}" in err.message for p in err.problems)


def test_a_bad_table_does_not_hide_the_checks_across_tables() -> None:
    # train.lr is bad, yet the step budget of the same table is still measured.
    err = refuse("[train]\nlr = inf\nsteps = 9223372036854775807\n")
    assert {p.key for p in err.problems} == {"train.lr", "train.steps"}


def test_memory_is_measured_per_process_and_sharding_is_suggested() -> None:
    # 1b on a 24 GiB CPU machine: ~16 GB of training state fits; with 2 processes sharing it, not.
    ok = '[model]\npreset = "1b"\n[train]\nseq_len = 128\nsteps = 10\n'
    parse_recipe('[recipe]\nname = "x"\n' + ok, source="r.toml", machine=SMALL)
    err = refuse(ok + "[distributed]\nnproc_per_node = 2\n")
    assert "per process (2 processes per node)" in err.message and 'engine = "fsdp"' in err.hint
    # The same on a machine with 80 GB GPUs fits.
    parse_recipe('[recipe]\nname = "x"\n' + ok + "[distributed]\nnproc_per_node = 2\n", source="r.toml", machine=BIG_GPU)


def test_step_budget_says_how_long_and_scales_with_the_hardware() -> None:
    steps = "[train]\nsteps = 100000000000\n"
    err = refuse(steps)
    assert re.search(r"at least [\d,.e+]+ years even at 200 GFLOP/s on each of 2 CPU core", err.message), err.message
    # Eight GPUs at a PFLOP/s each finish the default model's 1e11 steps within the year bound.
    parse_recipe('[recipe]\nname = "x"\n' + steps + "[distributed]\nnproc_per_node = 8\n", source="r.toml", machine=BIG_GPU)


def test_without_a_machine_only_the_recipe_itself_is_checked() -> None:
    # Recorded recipes are re-read by jobs on other machines: no memory or time check there.
    parse_recipe('[recipe]\nname = "x"\n[model]\ndim = 1099511627776\n', source="r.toml")


def test_parameter_count_is_the_models() -> None:
    torch = pytest.importorskip("torch")
    from pipeline.model import LlamaModel
    from pipeline.settings.model import ModelConfig

    for kw in ({"preset": "tiny"}, {}, {"dim": 96, "n_heads": 6, "n_kv_heads": 2, "n_layers": 3, "tie_embeddings": False}):
        cfg = ModelConfig(**kw)
        with torch.device("meta"):
            model = LlamaModel(cfg.resolved(vocab_size=777))
        assert parameter_count(cfg, 777) == sum(p.numel() for p in model.parameters()), kw


def test_the_tokenizer_minimum_matches_the_pieces_the_stage_adds() -> None:
    from pipeline import tokenizer
    from pipeline.settings.tokenizer import SPECIAL_PIECES

    assert SPECIAL_PIECES == len({tokenizer.UNK_ID, tokenizer.BOS_ID, tokenizer.EOS_ID}) + len(tokenizer.USER_SYMBOLS)


def test_a_bad_recipe_is_refused_before_anything_is_recorded(tmp_path: Path, tiny_recipe: Path) -> None:
    text = tiny_recipe.read_text()
    bad = text.replace("lr = 3e-3", "lr = inf").replace("vocab_size = 400", "vocab_size = 1").replace("seq_len = 32", "seq_len = 4096")
    tiny_recipe.write_text(bad)
    from appliance.service import Caller
    from appliance.service.api import dispatch

    with new_home(tmp_path / "home") as svc:
        before = svc.ledger.select("SELECT count(*) FROM events")[0][0]
        with pytest.raises(ConfigError) as err:
            dispatch(svc, Caller.current(), "run.start", {"recipe": str(tiny_recipe)})
        assert {p.key for p in err.value.problems} >= {"train.lr", "tokenizer.vocab_size", "train.seq_len"}
        # Nothing was started: no run, no work folder, only the refusal's authorization record.
        assert svc.runs.list(Caller.current()) == []
        assert not any((tmp_path / "home" / "work").glob("*"))
        events = svc.ledger.select("SELECT kind FROM events ORDER BY seq")[before:]
        assert all(kind.startswith("authz.") for (kind,) in events), events


def test_recipe_check_command(tmp_path: Path, tiny_recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "recipe", "check", str(tiny_recipe))
    assert code == 0, err
    assert "ok — model" in out and "tokens per step" in out and str(tiny_recipe.parent / "corpus") in out
    tiny_recipe.write_text(tiny_recipe.read_text().replace("lr = 3e-3", "lr = inf").replace("steps = 12", "steps = 9223372036854775807"))
    code, out, err = cli(capsys, "recipe", "check", str(tiny_recipe))
    assert code == 2 and "2 problems" in err and "train.lr is inf" in err and "train.steps" in err
    assert "Traceback" not in err


def test_a_recipe_error_inside_a_stage_says_to_start_a_new_run(tmp_path: Path, tiny_recipe: Path) -> None:
    # Only the corpus can say a vocabulary is too large: refused by the tokenizer stage, whose
    # hint must not offer `appliance resume` (the run keeps the recipe it recorded).
    tiny_recipe.write_text(tiny_recipe.read_text().replace("vocab_size = 400", "vocab_size = 200000"))
    from tests.conftest import run_to_end

    with new_home(tmp_path / "home") as svc:
        final = run_to_end(svc, tiny_recipe)
    assert final["status"] == "failed", final
    text = str(final)
    assert "tokenizer.vocab_size" in text and "start a new run with `appliance run " in text
    assert "appliance resume" not in text


# -- property: nothing a recipe can hold makes the checker raise anything but ConfigError ------------

_KEYS = [
    "steps", "lr", "min_lr", "seq_len", "batch_size", "vocab_size", "dim", "n_heads", "n_kv_heads", "n_layers", "max_seq_len",
    "preset", "max_new_tokens", "val_fraction", "split", "split_chars", "engine", "nproc_per_node", "nnodes", "bands", "rows",
    "enabled", "on_error", "extensions", "include", "prompts", "temperature", "schedule", "seed", "ffn_dim", "multiple_of",
    "character_coverage", "byte_fallback", "warmup_steps", "decay_fraction", "grad_accum", "device", "top_k", "name", "x",
]  # fmt: skip
_TABLES = [
    "recipe", "ingest", "clean", "filters", "pii", "dedup", "tokenizer", "shard", "model", "train", "distributed", "evaluate",
    "package", "nonsense",
]  # fmt: skip
_scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2, 3, 64, 100, 256, 2**31, 2**40, 2**62]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(alphabet=string.printable, max_size=12),
    st.sampled_from(["tiny", "20m", "1b", "bpe", "fsdp", "deepspeed", "paragraphs", "max_chars", "file", "skip", "cuda", ".txt", "**"]),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=3), max_leaves=6)
_tables = st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6)
_recipes = st.dictionaries(st.sampled_from(_TABLES), _tables | _scalars, max_size=6)


def _toml(data: dict[str, Any]) -> str:
    """A TOML document for ``data``: top-level scalars first, then one table per mapping."""

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, float) and math.isfinite(v):
            return repr(v) if ("." in repr(v) or "e" in repr(v)) else repr(v) + ".0"
        return toml_value(v)

    head = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items()) for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(head + tables) + "\n"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_recipes, machine=st.sampled_from([None, SMALL, BIG_GPU]))
def test_generated_recipes_give_a_recipe_or_a_config_error(data: dict[str, Any], machine: Machine | None) -> None:
    data.setdefault("recipe", {"name": "generated"})
    text = _toml(data)
    try:
        recipe = parse_recipe(text, source="gen.toml", machine=machine)
    except ConfigError as exc:
        assert exc.message.startswith("gen.toml") and exc.hint, exc.diagnostics()
        return
    assert isinstance(recipe, Recipe)
