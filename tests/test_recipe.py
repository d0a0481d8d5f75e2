"""Recipes: every shipped recipe loads; unknown keys and bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.recipe import PACKAGED_RECIPES, load_recipe, packaged_recipe, parse_recipe
from pipeline.errors import ConfigError

ASSETS = Path(__file__).with_name("assets")
SHIPPED = sorted(PACKAGED_RECIPES.glob("*.toml")) + sorted(ASSETS.glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path: Path) -> None:
    loaded = load_recipe(path)
    assert loaded.recipe.recipe.name
    assert len(loaded.digest) == 64


def test_digest_is_of_the_exact_bytes(tmp_path: Path) -> None:
    a = tmp_path / "a.toml"
    a.write_text('[recipe]\nname = "x"\n')
    b = tmp_path / "b.toml"
    b.write_text('[recipe]\nname = "x"  # same recipe, other bytes\n')
    assert load_recipe(a).digest != load_recipe(b).digest


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[recipe]\nname = "x"\n[train]\nlr_warmup = 3\n', "train.lr_warmup"),
        ('[recipe]\nname = "x"\ncolour = "red"\n', "recipe.colour"),
        ('[recipe]\nname = "x"\n[trian]\nsteps = 3\n', "trian"),
        ('[recipe]\nname = "x"\n[train]\nsteps = "many"\n', "train.steps"),
        ('[recipe]\nname = "x"\n[model]\ndim = 1.5\n', "model.dim"),
    ],
)
def test_bad_keys_are_named(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipe(text, source="r.toml")
    assert named in err.value.message and "r.toml" in err.value.message


def test_missing_recipe_section_and_bad_toml() -> None:
    with pytest.raises(ConfigError, match=r"\[recipe\]"):
        parse_recipe("[train]\nsteps = 3\n", source="r.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_recipe("[recipe\nname=", source="r.toml")


def test_source_required_somewhere(tmp_path: Path) -> None:
    p = tmp_path / "r.toml"
    p.write_text('[recipe]\nname = "x"\n')
    with pytest.raises(ConfigError) as err:
        load_recipe(p).source_dir()
    assert "--source" in err.value.diagnostics()
    assert load_recipe(p).source_dir(tmp_path) == tmp_path


def test_unknown_packaged_recipe() -> None:
    with pytest.raises(ConfigError) as err:
        packaged_recipe("nope")
    assert "demo" in err.value.diagnostics()


def test_missing_corpus_folder_is_named_before_anything_runs(tmp_path: Path) -> None:
    p = tmp_path / "r.toml"
    p.write_text('[recipe]\nname = "x"\nsource = "nope"\n')
    with pytest.raises(ConfigError) as err:
        load_recipe(p).source_dir()
    assert "nope" in err.value.message and "recipe.source" in err.value.message
    with pytest.raises(ConfigError, match="--source"):
        load_recipe(p).source_dir(tmp_path / "also-nope")


def test_stage_configs_are_the_recipe_configs() -> None:
    # Code that imports a config from its stage module gets the very class the recipe builds.
    import pipeline.evaluate
    import pipeline.ingest
    import pipeline.model
    import pipeline.package
    import pipeline.shard
    import pipeline.tokenizer
    import pipeline.train
    from appliance.recipe import Recipe

    recipe = parse_recipe('[recipe]\nname = "x"\n', source="r.toml")
    assert isinstance(recipe, Recipe)
    for name, cls in [
        ("ingest", pipeline.ingest.IngestConfig),
        ("tokenizer", pipeline.tokenizer.TokenizerConfig),
        ("shard", pipeline.shard.ShardConfig),
        ("model", pipeline.model.ModelConfig),
        ("train", pipeline.train.TrainConfig),
        ("distributed", pipeline.train.DistConfig),
        ("evaluate", pipeline.evaluate.EvalConfig),
        ("package", pipeline.package.PackageConfig),
    ]:
        assert type(getattr(recipe, name)) is cls, name


def test_a_recipe_nested_2000_deep_is_a_clear_error() -> None:
    text = '[recipe]\nname = "deep"\nx = ' + "[" * 2000 + "]" * 2000 + "\n"
    with pytest.raises(ConfigError, match=r"r.toml: TOML nested too deeply to read \(line 3\)"):
        parse_recipe(text, source="r.toml")
