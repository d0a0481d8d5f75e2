"""A recipe: one TOML file that configures every stage of a run.

Typed from top to bottom; an unknown key anywhere is an error naming the dotted key. The
digest of the file's bytes is recorded with the run, so the exact recipe can be proven.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from appliance.recipe_checks import Machine, recipe_problems
from keys.digest import sha256_bytes
from pipeline.clean import CleanConfig
from pipeline.config import check, collect
from pipeline.errors import ConfigError
from pipeline.pii import PiiConfig
from pipeline.settings.cluster import ClusterConfig
from pipeline.settings.dedup import DedupConfig
from pipeline.settings.evaluate import EvalConfig
from pipeline.settings.filters import FiltersConfig
from pipeline.settings.finetune import FinetuneConfig
from pipeline.settings.ingest import IngestConfig
from pipeline.settings.model import ModelConfig
from pipeline.settings.package import PackageConfig
from pipeline.settings.shard import ShardConfig
from pipeline.settings.tokenizer import TokenizerConfig
from pipeline.training.config import DistConfig, TrainConfig

PACKAGED_RECIPES = Path(__file__).with_name("recipes")


@dataclass(kw_only=True)
class RecipeMeta:
    # Shown in the ledger's runs view and the model card.
    name: str
    description: str = ""
    # Corpus folder, relative to the recipe file; `appliance run --source` overrides it.
    source: str = ""

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "name must not be empty")


@dataclass(kw_only=True)
class Recipe:
    recipe: RecipeMeta
    ingest: IngestConfig = field(default_factory=IngestConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    # What runs the data stages' batches: local worker processes, or a running Ray cluster.
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistConfig = field(default_factory=DistConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    # Present: adapt a local base model instead of pre-training (see pipeline.settings.finetune).
    finetune: FinetuneConfig | None = None


@dataclass(frozen=True)
class LoadedRecipe:
    """A parsed recipe with where it came from and the digest of its exact bytes."""

    recipe: Recipe
    path: Path
    digest: str
    text: str

    def source_dir(self, override: Path | None = None) -> Path:
        """The corpus folder: the override, else ``[recipe] source`` relative to the file."""
        if override is not None:
            path, given = Path(override), "--source"
        elif self.recipe.recipe.source:
            path, given = (self.path.parent / self.recipe.recipe.source).resolve(), f"recipe.source in {self.path}"
        else:
            raise ConfigError(
                f"{self.path}: no corpus given: [recipe] source is empty",
                'set recipe.source = "path/to/corpus" or pass --source DIR',
            )
        # Checked before the run starts, so a typo does not leave a failed run in the ledger.
        if not path.is_dir():
            raise ConfigError(f"corpus folder {path} (from {given}) does not exist or is not a folder", f"fix {given}")
        return path


def parse_recipe(text: str, *, source: str, machine: Machine | None = None, recipe_dir: Path | None = None) -> Recipe:
    """Parse and check recipe TOML text; ``source`` names the file in error messages.

    Every problem is reported in one ConfigError: each table's own, then those across tables
    (``appliance.recipe_checks``) and, given ``machine``, those against it (memory, time).
    Given ``recipe_dir`` (the file's folder), a fine-tuning recipe is checked against its local
    base's config.json too.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})", "fix the TOML syntax at the position shown") from None
    except RecursionError:
        raise ConfigError(
            f"{source}: TOML nested too deeply to read (line {_deep_line(text)})", "a recipe is a few flat tables of values: remove the nested arrays or tables"
        ) from None
    if "recipe" not in data:
        raise ConfigError(f"{source}: missing [recipe] section", 'add [recipe] with name = "..."')
    recipe, problems = collect(Recipe, data, source=source)
    if recipe is not None:
        named = {p.key for p in problems}
        try:
            problems += [p for p in recipe_problems(recipe, machine, recipe_dir) if p.key not in named]
        except Exception:  # noqa: BLE001
            # The tables already hold defaults in place of bad values; a check across them may
            # trip over what is left. Those problems are reported; this one would be noise.
            if not problems:
                raise
    if problems or recipe is None:
        raise ConfigError.of(source, problems)
    return recipe


# Deeper than any recipe needs (a table of lists of tables is 3), far below Python's recursion limit.
_DEEP = 64


def _deep_line(text: str) -> int:
    """The line where arrays and inline tables first nest past ``_DEEP``, for the message.

    tomllib gives up with a RecursionError and no position; this scan skips strings and
    comments well enough to point at the right line.
    """
    depth, quote, line, comment = 0, "", 1, False
    for ch in text:
        if ch == "\n":
            line, comment = line + 1, False
            if quote in ('"', "'"):
                quote = ""  # a one-line string cannot span lines; resynchronise
            continue
        if comment:
            continue
        if quote:
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch == "#":
            comment = True
        elif ch in "[{":
            depth += 1
            if depth > _DEEP:
                return line
        elif ch in "]}":
            depth = max(0, depth - 1)
    return line


def load_recipe(path: Path, machine: Machine | None = None, *, read_base: bool = False) -> LoadedRecipe:
    """Read and validate a recipe file (against ``machine`` too, when given).

    ``read_base``: also read a fine-tuning recipe's local base's config.json (relative to the
    recipe's folder) and check the recipe against it. Off by default: the service reads files
    its callers may not, so it asks only once it has checked the caller may read the base.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror}", "check the path") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not UTF-8 text", "save it as UTF-8") from None
    folder = path.resolve().parent if read_base else None
    recipe = parse_recipe(text, source=str(path), machine=machine, recipe_dir=folder)
    return LoadedRecipe(recipe=recipe, path=path.resolve(), digest=sha256_bytes(raw), text=text)


def packaged_recipe(name: str) -> Path:
    """Path of a recipe shipped with the appliance (e.g. ``demo``)."""
    path = PACKAGED_RECIPES / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PACKAGED_RECIPES.glob("*.toml")))
        raise ConfigError(f"no packaged recipe named '{name}'", f"use one of: {known}")
    return path
