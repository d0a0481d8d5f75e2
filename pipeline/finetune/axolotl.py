"""Convert an Axolotl YAML config into an appliance recipe: ``[recipe]``, ``[finetune]``, ``[train]``.

People arrive with the Axolotl config of a project that already works; retyping it as a recipe
loses settings silently. So every top-level key gets exactly one note, and nothing is dropped
without saying so:

- ``mapped to finetune.lora_r = 8``: the recipe holds the same setting.
- ``accepted: ...``: the value is what the appliance does anyway (``trust_remote_code: false``).
- ``ignored: ...``: machinery that does not change what is learnt (kernels, dataloader workers,
  output folders), or a choice the appliance makes itself; the note says which and why.
- ``refused: ...``: not honoured, and the conversion goes on: remote logging and hub uploads
  (``wandb_project``). Nothing leaves the appliance; training is the same without them.

What cannot be honoured safely *and* would change what is trained (a hub ``base_model``,
``trust_remote_code: true``, preference training, an optimizer other than AdamW, added tokens)
fails the conversion with one ``ConfigError`` naming every such key and its fix at once.

Axolotl leaves unset values to the Hugging Face Trainer, whose defaults differ from the
appliance's pre-training ones (weight decay 0, beta2 0.999, no warmup, cosine to 0); the recipe
writes those out, so the converted run trains as the Axolotl one would. Each written value
carries a comment naming the Axolotl key (or default) it came from.

Paths (``base_model``, dataset files) are read relative to the YAML file's folder, else the
current folder (where Axolotl itself resolves them). In the recipe they are relative to
``recipe_dir`` (where the recipe will be written) when they lie under it, else absolute; with no
``recipe_dir`` (a recipe printed to stdout, its folder unknown) they are absolute.

``optimizer: adamw_bnb_8bit`` (and the other AdamW variants with 8-bit or paged states) becomes
torch AdamW with fp32 states: a checkpoint holds those exactly, so a resumed run continues bit
for bit, and an adapter's states are small anyway. ``load_in_4bit`` needs bitsandbytes, checked
here so the conversion says so instead of the run failing later.

YAML is read with ``yaml.safe_load`` only: a config names values, never Python objects.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.config import collect, toml_value
from pipeline.errors import ConfigError, Problem
from pipeline.settings.finetune import FinetuneConfig
from pipeline.training.config import TrainConfig


class Note(NamedTuple):
    """What became of one Axolotl key: ``what`` starts with mapped / accepted / ignored / refused."""

    key: str
    what: str

    def line(self) -> str:
        return f"{self.key}: {self.what}"


@dataclass(frozen=True)
class Conversion:
    """The recipe TOML text, and one note per Axolotl key (and per dataset entry and its keys)."""

    recipe_text: str
    notes: list[Note]


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes is installed, found without importing it.

    Importing it imports torch and probes CUDA (seconds, and warnings on machines without a
    GPU); the converter stays torch-free. The training job probes it for real, 4-bit layers
    included (``pipeline.finetune.spec.qlora_available``).
    """
    return importlib.util.find_spec("bitsandbytes") is not None


def convert_axolotl(yaml_text: str, *, source: str, yaml_dir: Path | None = None, recipe_dir: Path | None = None, cwd: Path | None = None) -> Conversion:
    """The recipe for the Axolotl config ``yaml_text``; ``source`` names the file in messages.

    Relative paths are read from ``yaml_dir`` (default: the folder of ``source``), else ``cwd``
    (default: the current folder), and written relative to ``recipe_dir`` when under it, else
    absolute. Raises ConfigError listing every key that cannot be honoured.
    """
    import yaml

    try:
        data = yaml.safe_load(yaml_text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{source}: not valid YAML{at} ({reason})", "fix the YAML syntax at the position shown") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply to read", "an Axolotl config is a mapping of settings: remove the nesting") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: an Axolotl config is a mapping of settings (base_model: ..., datasets: ...), got {_kind(data)}",
            "give the YAML file Axolotl trains with",
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{source}: setting names must be text, got {bad[0]!r}", "quote the name, or fix the indentation that made a value a key")
    folder = Path(yaml_dir) if yaml_dir is not None else Path(source).resolve().parent
    return _Converter(data, source, folder, Path(cwd) if cwd is not None else Path.cwd(), recipe_dir).run()


def _kind(value: Any) -> str:
    if value is None:
        return "an empty document"
    return {list: "a list", str: "text", int: "a number", float: "a number", bool: "true or false"}.get(type(value), type(value).__name__)


def _off(value: Any) -> bool:
    """Unset, false, empty or zero: how Axolotl configs spell "not used"."""
    if isinstance(value, (list, dict)):
        return not value
    return value is None or value is False or value in ("", 0, "false", "False", "none", "None")


def _from(key: str, data: dict[str, Any], default: str) -> str:
    """The comment for a value: its Axolotl key when the config sets it, else which default."""
    return key if key in data else default


class _Converter:
    def __init__(self, data: dict[str, Any], source: str, yaml_dir: Path, cwd: Path, recipe_dir: Path | None) -> None:
        self.data, self.source, self.yaml_dir, self.cwd = data, source, yaml_dir, cwd
        self.recipe_dir = Path(recipe_dir).resolve() if recipe_dir is not None else None
        self.notes: dict[str, Note] = {}
        self.sub_notes: dict[str, list[Note]] = {}
        self.problems: list[Problem] = []
        # Recipe values in order, each with the comment saying where it came from.
        self.ft: dict[str, tuple[Any, str]] = {}
        self.train: dict[str, tuple[Any, str]] = {}
        self.gate: dict[str, tuple[Any, str]] = {}
        self.datasets: list[list[tuple[str, Any]]] = []
        self.train_files: list[Path] = []
        self.method = ""
        # Recipe key -> Axolotl key, so that a value the recipe refuses is reported by the key to edit.
        self.origin: dict[str, str] = {}

    # -- recording -----------------------------------------------------------------------------

    def note(self, key: str, what: str) -> None:
        if key in self.data:
            self.notes.setdefault(key, Note(key, what))

    def sub(self, key: str, what: str) -> None:
        self.sub_notes.setdefault(key.split("[")[0], []).append(Note(key, what))

    def fail(self, key: str, message: str, fix: str) -> None:
        self.problems.append(Problem(key, message, fix))
        self.notes.setdefault(key, Note(key, f"refused: {message}"))

    def set(self, table: str, name: str, value: Any, key: str, *, why: str = "") -> None:
        comment = f"{key}: {why}" if why and key in self.data else (why or key)
        {"finetune": self.ft, "train": self.train, "finetune.gate": self.gate}[table][name] = (value, comment)
        self.origin[f"{table}.{name}"] = key
        self.note(
            key,
            f"mapped to {table}.{name} = {_toml(value) if len(_toml(value)) < 80 else '(' + str(len(str(value))) + ' characters)'}"
            + (f" ({why})" if why else ""),
        )

    def get(self, key: str, kind: type, default: Any = None, *, where: dict[str, Any] | None = None, name: str = "") -> Any:
        """The value of ``key`` as ``kind``; a wrong type is a problem naming the key, and gives ``default``."""
        data, name = (self.data if where is None else where), (name or key)
        value = data.get(key)
        if value is None:
            return default
        ok = isinstance(value, (int, float) if kind is float else kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, str):
            # YAML 1.1 reads 2e-4 (no dot) as text; Axolotl's pydantic takes it as a number.
            try:
                value, ok = float(value), True
            except ValueError:
                ok = False
        if kind is float and ok:
            value = float(value)
            ok = math.isfinite(value)
        if isinstance(value, list):
            ok = kind is list and all(isinstance(v, str) and v.strip() for v in value)
        if not ok:
            words = {int: "a whole number", float: "a finite number", bool: "true or false", str: "text", list: "a list of names", dict: "a mapping"}[kind]
            self.fail(name, f"{name} must be {words}, got {_shown(value)}", f"fix {name} in {self.source}")
            return default  # the conversion fails; later steps go on with the default to find more
        return value

    # -- paths ---------------------------------------------------------------------------------

    def find(self, text: str) -> tuple[Path | None, list[Path]]:
        """The existing path ``text`` names (the YAML's folder first, then the current one), and where it looked."""
        if "://" in text:
            return None, []
        given = Path(text).expanduser()
        places = list(dict.fromkeys(p.resolve() for p in ([given] if given.is_absolute() else [self.yaml_dir / given, self.cwd / given])))
        return next((p for p in places if p.exists()), None), places

    def written(self, path: Path) -> str:
        if self.recipe_dir is not None and path.is_relative_to(self.recipe_dir):
            return path.relative_to(self.recipe_dir).as_posix()
        return str(path)

    # -- the conversion, in the order later steps need -----------------------------------------

    def run(self) -> Conversion:
        base = self.model()
        self.adapter()
        self.lora()
        self.data_sets(base)
        self.schedule()
        self.optimisation()
        self.checkpoints()
        self.remaining()
        if not self.problems:
            self.validate()
        if self.problems:
            error = ConfigError.of(self.source, self.problems)
            hint = error.hint if len(self.problems) == 1 else f"fix each key named above in {self.source}, then convert it again"
            raise ConfigError(error.message, hint, self.problems)
        notes = [n for k in self.data for n in [self.notes[k], *self.sub_notes.get(k, [])]]
        return Conversion(recipe_text=self.toml(), notes=notes)

    def model(self) -> Path | None:
        path = self.base_model()
        for key in ("base_model_config", "tokenizer_config"):
            other = self.get(key, str)
            if other is None:
                self.note(key, "accepted: the base directory's own")
            elif path is None or self.find(other)[0] == path:
                self.note(key, "accepted: the same directory as base_model")
            else:
                self.fail(
                    key,
                    f"{key} {other!r} differs from base_model: the appliance uses the base directory's own config and tokenizer",
                    f"copy those files into the base directory and remove {key}",
                )
        for key, suffixes in (("model_type", ("ForCausalLM",)), ("tokenizer_type", ("Tokenizer", "TokenizerFast"))):
            value = self.get(key, str)
            if value is not None and not value.endswith(suffixes):
                self.fail(
                    key,
                    f"{key}: {value} is not a causal language model's class: the appliance fine-tunes causal LMs",
                    f"remove {key} (the base's config.json names its class)",
                )
            self.note(key, "accepted: the base is loaded by its config.json as a causal LM, with its own tokenizer")
        if self.get("trust_remote_code", bool):
            self.fail(
                "trust_remote_code",
                "trust_remote_code: true would run Python code shipped in the model directory; no code from a model directory runs here",
                "remove it, and use a base whose architecture transformers implements (Llama, Qwen2, Mistral, ...)",
            )
        self.note("trust_remote_code", "accepted: no code from a model directory runs")
        return path

    def base_model(self) -> Path | None:
        text = self.get("base_model", str)
        if text is None:
            if "base_model" not in self.data:
                self.fail("base_model", "base_model is missing", "set base_model to the local directory of the model to fine-tune")
            return None
        path, places = self.find(text)
        if path is None or not path.is_dir():
            looked = f" (looked for {' and '.join(map(str, places))})" if places else ""
            self.fail(
                "base_model",
                f"base_model {text!r} is not a local directory{looked}: the appliance never downloads",
                "copy the model's folder (config.json, *.safetensors, tokenizer files) onto this machine and point base_model at that directory",
            )
            return None
        if not (path / "config.json").is_file():
            self.fail(
                "base_model",
                f"base_model {text!r} has no config.json: not a model in Hugging Face layout",
                "point base_model at the folder holding config.json",
            )
            return None
        unsigned = (
            "" if (path / "model.sig").is_file() else "it has no model.sig, and the run refuses an unsigned base unless finetune.allow_unsigned_base = true"
        )
        self.set("finetune", "base", self.written(path), "base_model", why=unsigned)
        return path

    def adapter(self) -> None:
        adapter, four = self.get("adapter", str), self.get("load_in_4bit", bool)
        if self.get("load_in_8bit", bool):
            self.fail(
                "load_in_8bit",
                "load_in_8bit: true (LoRA on an 8-bit base) is not offered",
                "use load_in_4bit: true (QLoRA), or remove it for LoRA on a bf16 base",
            )
        self.note("load_in_8bit", "accepted: off")
        if adapter not in (None, "lora", "qlora"):
            self.fail(
                "adapter", f"adapter: {adapter} is not offered: the appliance trains lora, qlora, or (no adapter) every weight", "set adapter: lora or qlora"
            )
            return
        if adapter is None and four:
            self.fail(
                "load_in_4bit", "load_in_4bit: true with no adapter would train every weight of a 4-bit model", "set adapter: qlora, or remove load_in_4bit"
            )
            return
        method = "qlora" if adapter == "qlora" or four else ("lora" if adapter else "full")
        if method == "qlora" and not bitsandbytes_available():
            key = "load_in_4bit" if four else "adapter"
            self.fail(
                key,
                f"{key}: {'true' if four else 'qlora'} needs bitsandbytes (the 4-bit NF4 base), which is not installed here",
                'pip install bitsandbytes (or the fine-tuning extra: pip install -e ".[finetune]"), or set load_in_4bit: false and adapter: lora',
            )
            return
        why = {"qlora": "LoRA on a 4-bit NF4 base", "lora": "LoRA on the base as stored", "full": "no adapter: every weight trains"}[method]
        self.set("finetune", "method", method, _from("adapter", self.data, "no adapter"), why=why)
        self.note("load_in_4bit", f"mapped to finetune.method = {_toml(method)}" if four else "accepted: off")
        self.method = method
        kwargs = self.get("bnb_config_kwargs", dict) or {}
        for name, value in kwargs.items():
            if name in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype") and method == "qlora":
                self.set("finetune", name, value, "bnb_config_kwargs")
            elif name != "llm_int8_has_fp16_weight":
                self.fail(
                    "bnb_config_kwargs",
                    f"bnb_config_kwargs.{name} is not offered",
                    "keep only bnb_4bit_quant_type, bnb_4bit_use_double_quant and bnb_4bit_compute_dtype",
                )
        self.note("bnb_config_kwargs", "accepted: the defaults" if method == "qlora" else "ignored: no 4-bit base")

    def lora(self) -> None:
        if self.method in ("", "full"):
            for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear"):
                self.note(key, "ignored: no adapter, so every weight trains")
            return
        for key, kind in (("lora_r", int), ("lora_alpha", int), ("lora_dropout", float)):
            value = self.get(key, kind)
            if value is not None:
                self.set("finetune", key, value, key)
        targets = self.data.get("lora_target_modules")
        if isinstance(targets, str):
            if targets != "all-linear":
                self.fail(
                    "lora_target_modules",
                    "lora_target_modules as a pattern is not offered",
                    "list the module names, e.g. [q_proj, v_proj], or set lora_target_linear: true",
                )
            targets = [targets]
        elif targets is not None:
            targets = self.get("lora_target_modules", list)
        if self.get("lora_target_linear", bool):
            # Axolotl adds every linear layer to the named ones: the union is all of them.
            self.set("finetune", "target_modules", ["all-linear"], "lora_target_linear", why="every linear layer but the output head")
            self.note("lora_target_modules", "ignored: lora_target_linear: true adapts every linear layer, these included")
        elif targets:
            self.set("finetune", "target_modules", list(targets), "lora_target_modules")
        elif "lora_target_modules" not in self.data:
            self.fail("lora_target_modules", "no LoRA target modules", "add lora_target_linear: true, or lora_target_modules: [q_proj, v_proj]")
        self.note("lora_target_linear", "accepted: false; the modules are lora_target_modules")

    def data_sets(self, base: Path | None) -> None:
        templates: dict[str, str] = {}
        roles: dict[str, list[str]] = {}
        chat = False
        for key, split in (("datasets", "train"), ("test_datasets", "val")):
            items = self.data.get(key)
            if items is None:
                if key == "datasets":
                    self.fail("datasets", "datasets is missing", "list the training files: datasets: [{path: train.jsonl, type: completion}]")
                continue
            if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
                self.fail(key, f"{key} must be a list of mappings (- path: ..., type: ...)", f"fix {key} in {self.source}")
                continue
            before = len(self.datasets)
            for i, item in enumerate(items):
                chat = self.dataset(f"{key}[{i}]", item, split, templates, roles) or chat
            self.note(key, f"mapped to {len(self.datasets) - before} [[finetune.datasets]] table(s) with split = {_toml(split)}")
        self.chat_template(templates, chat, base)
        if len({tuple(r) for r in roles.values()}) > 1:
            self.fail("datasets", "the datasets train different roles_to_train: one set of roles is trained", "give every dataset the same roles_to_train")
        elif roles:
            self.set("finetune", "roles_to_train", next(iter(roles.values())), next(iter(roles)))
        self.set("finetune", "train_on_inputs", bool(self.get("train_on_inputs", bool, False)), _from("train_on_inputs", self.data, "Axolotl's default"))
        self.set("finetune", "packing", bool(self.get("sample_packing", bool, False)), _from("sample_packing", self.data, "Axolotl's default"))
        size = self.get("val_set_size", float)
        if size is not None and not 0.0 <= size < 1.0:
            self.fail(
                "val_set_size",
                f"val_set_size = {size:g} is a count of examples; the appliance holds out a fraction",
                "set val_set_size to a fraction below 1, e.g. 0.05",
            )
        elif "test_datasets" in self.data:
            self.set("finetune", "val_fraction", 0.0, "val_set_size", why="test_datasets hold the validation examples")
        elif size:
            self.set("finetune", "val_fraction", size, "val_set_size")
        else:
            why = "a validation loss is always measured here, so 5 % of the training examples are held out; Axolotl held out none"
            self.set("finetune", "val_fraction", 0.05, _from("val_set_size", self.data, "no test_datasets"), why=why)

    def dataset(self, key: str, item: dict[str, Any], split: str, templates: dict[str, str], roles: dict[str, list[str]]) -> bool:
        """Add the tables for one Axolotl dataset entry; whether it is a chat."""
        kind = item.get("type")
        fmt = _FORMATS.get(kind) if isinstance(kind, str) else None
        if fmt is None:
            self.fail(f"{key}.type", f"{key}.type: {_shown(kind)} is not offered", f"use one of: {', '.join(_FORMATS)}")
            return False
        fields: list[tuple[str, Any]] = [("format", fmt)]
        if fmt == "completion":
            fields.append(("field", self.get("field", str, "text", where=item, name=f"{key}.field")))
        if fmt == "chat":
            fields.append(("field_messages", self.get("field_messages", str, "messages", where=item, name=f"{key}.field_messages")))
            tools = self.get("field_tools", str, where=item, name=f"{key}.field_tools")
            if tools:
                fields[0] = ("format", "tools")
                fields.append(("field_tools", tools))
            if item.get("roles_to_train") is not None:
                roles[f"{key}.roles_to_train"] = self.get("roles_to_train", list, where=item, name=f"{key}.roles_to_train") or ["assistant"]
            for name in ("chat_template", "chat_template_jinja"):
                if item.get(name) is not None:
                    templates[f"{key}.{name}"] = str(item[name])
        for name, value in item.items():
            self.dataset_key(f"{key}.{name}", name, value)
        files = item.get("data_files")
        paths = [files] if isinstance(files, str) else files if isinstance(files, list) else [item.get("path")]
        shown = ", ".join(f"{k} = {_toml(v)}" for k, v in fields)
        for text in paths:
            if not isinstance(text, str) or not text.strip():
                self.fail(f"{key}.path", f"{key}.path must name a local file, got {_shown(text)}", f"set {key}.path to a JSONL, Parquet or CSV file")
                continue
            path, places = self.find(text)
            if path is None or not path.is_file():
                looked = " and ".join(map(str, places)) or "a file, not a URL"
                self.fail(
                    f"{key}.path",
                    f"{key}.path {text!r} is not a local file (looked for {looked}): the appliance never downloads",
                    "copy the data onto this machine and give its path",
                )
                continue
            self.datasets.append([("path", self.written(path)), *fields, ("split", split)])
            if split == "train":
                self.train_files.append(path)
            self.sub(key, f"mapped to [[finetune.datasets]] path = {_toml(self.written(path))}, {shown}, split = {_toml(split)}")
        return fmt == "chat"

    def dataset_key(self, dotted: str, name: str, value: Any) -> None:
        if name in ("path", "type", "data_files", "field", "field_messages", "field_tools", "roles_to_train", "chat_template", "chat_template_jinja"):
            return
        if name in _DATASET_ACCEPTED:
            if value is None or value in _DATASET_ACCEPTED[name]:
                self.sub(dotted, "accepted: what the appliance does")
            else:
                self.fail(dotted, f"{dotted}: {_shown(value)} is not offered", f"remove {dotted}")
        elif name in _DATASET_IGNORED:
            self.sub(dotted, f"ignored: {_DATASET_IGNORED[name]}")
        elif name in _DATASET_REFUSED and not _off(value):
            self.fail(dotted, f"{dotted}: {_DATASET_REFUSED[name]}", f"remove {dotted}")
        elif name in _DATASET_REFUSED:
            self.sub(dotted, "accepted: off")
        else:
            self.sub(dotted, "ignored: unknown to this converter")

    def chat_template(self, templates: dict[str, str], chat: bool, base: Path | None) -> None:
        if not chat:
            for key in ("chat_template", "chat_template_jinja"):
                self.note(key, "ignored: no chat_template dataset renders with it")
            return
        top, top_jinja = self.get("chat_template", str), self.get("chat_template_jinja", str)
        jinja = top_jinja or next((v for k, v in templates.items() if k.endswith("_jinja") and v), "")
        names = {v for k, v in templates.items() if k.endswith(".chat_template")} | ({top} if top else set())
        names.discard("jinja")
        if len(names) > 1:
            self.fail(
                "chat_template",
                f"the datasets name different chat templates ({', '.join(sorted(names))}); one template renders them all",
                "use one chat_template",
            )
            return
        name = next(iter(names), "jinja" if jinja else "tokenizer_default")
        own = base is not None and _has_template(base)
        key = "chat_template_jinja" if jinja else "chat_template"
        if jinja:
            self.set("finetune", "chat_template", jinja, key)
        elif name == "chatml" or (name == "tokenizer_default_fallback_chatml" and not own):
            self.set("finetune", "chat_template", _CHATML, key, why="Axolotl's chatml")
        elif name in ("tokenizer_default", "tokenizer_default_fallback_chatml"):
            if base is not None and not own:
                self.fail(
                    key,
                    f"chat_template: {name}, but the base {base} has no chat template",
                    "set chat_template: chatml, or give a template as chat_template_jinja",
                )
            self.note(key, "accepted: the base tokenizer's own chat template")
        else:
            self.fail(
                key, f"chat_template: {name} is not built in here (chatml and tokenizer_default are)", "copy the template's Jinja text into chat_template_jinja"
            )
        self.note("chat_template", f"accepted: {top}, with chat_template_jinja" if top == "jinja" else "accepted: unset")
        self.note("chat_template_jinja", "accepted: unset")

    def schedule(self) -> None:
        batch, accum, total = self.get("micro_batch_size", int, 1), self.get("gradient_accumulation_steps", int), self.get("batch_size", int)
        if accum is None and total is not None and batch:
            if total % batch:
                self.fail("batch_size", f"batch_size {total} is not a multiple of micro_batch_size {batch}", "set gradient_accumulation_steps instead")
            accum = max(1, total // batch)
            self.note("batch_size", f"mapped to train.grad_accum = {accum} (batch_size / micro_batch_size)")
        self.note("batch_size", "ignored: gradient_accumulation_steps sets the batch")
        self.set("train", "batch_size", batch or 1, _from("micro_batch_size", self.data, "Axolotl's default"))
        self.set("train", "grad_accum", accum or 1, _from("gradient_accumulation_steps", self.data, "batch_size" if total else "Axolotl's default"))
        self.set("train", "seq_len", self.get("sequence_len", int, 2048), _from("sequence_len", self.data, "Axolotl's default"))
        steps, epochs = self.get("max_steps", int), self.get("num_epochs", float, 1.0)
        if steps is not None:
            self.set("train", "steps", steps, "max_steps")
            self.note("num_epochs", "ignored: max_steps sets the length, as it does in Axolotl")
        elif epochs is not None:
            steps = self.estimate_steps(epochs, (batch or 1) * (accum or 1))
            if steps is not None:
                why = f"estimated: {epochs:g} epoch(s) of the training examples at {(batch or 1) * (accum or 1)} per step"
                self.set("train", "steps", steps, _from("num_epochs", self.data, "Axolotl's default, 1 epoch"), why=why)
        lr = self.get("learning_rate", float)
        if lr is None:
            self.fail("learning_rate", "learning_rate is missing (Axolotl requires it too)", "set learning_rate, e.g. 0.0002 for LoRA")
            return
        self.set("train", "lr", lr, "learning_rate")
        name = self.get("lr_scheduler", str) or "cosine"
        if name in ("cosine", "cosine_with_min_lr"):
            ratio = self.get("cosine_min_lr_ratio", float, 0.0)
            if name == "cosine_with_min_lr":
                kwargs = self.get("lr_scheduler_kwargs", dict) or {}
                ratio = float(kwargs.get("min_lr_rate", float(kwargs.get("min_lr") or 0.0) / lr))
                self.note("lr_scheduler_kwargs", "mapped to train.min_lr")
            self.set("train", "schedule", "cosine", _from("lr_scheduler", self.data, "Axolotl's default"))
            self.set("train", "min_lr", lr * ratio, _from("cosine_min_lr_ratio", self.data, "cosine to 0, as the Trainer's"))
        elif name in ("constant", "constant_with_warmup"):
            self.set("train", "schedule", "constant", "lr_scheduler")
            self.set("train", "min_lr", 0.0, "lr_scheduler", why="unused by a constant schedule")
            self.note("cosine_min_lr_ratio", "ignored: the schedule is constant")
        else:
            self.fail(
                "lr_scheduler",
                f"lr_scheduler: {name} is not offered (cosine, cosine_with_min_lr, constant and constant_with_warmup are)",
                "set lr_scheduler: cosine",
            )
        warmup, ratio_w = self.get("warmup_steps", int), self.get("warmup_ratio", float)
        if name == "constant":
            self.set("train", "warmup_steps", 0, "lr_scheduler", why="Axolotl's constant schedule has no warmup")
            self.note("warmup_steps", "ignored: lr_scheduler: constant has no warmup (constant_with_warmup has)")
        elif warmup is not None:
            self.set("train", "warmup_steps", warmup, "warmup_steps")
        elif steps is not None:
            self.set("train", "warmup_steps", round((ratio_w or 0.0) * steps), _from("warmup_ratio", self.data, "the Trainer's default, none"))
        self.note("warmup_ratio", "ignored: warmup_steps is set, or the schedule has no warmup")

    def estimate_steps(self, epochs: float, per_step: int) -> int | None:
        counts = [_count_lines(f) for f in self.train_files]
        packing = bool(self.data.get("sample_packing"))
        if not counts or packing or None in counts:
            why = "examples are packed, so steps depend on token counts" if packing else "only JSONL files are counted here"
            self.fail(
                "num_epochs",
                f"num_epochs without max_steps: the appliance trains a fixed number of steps, and {why}",
                "set max_steps = ceil(num_epochs x examples / (micro_batch_size x gradient_accumulation_steps)); with sample_packing, tokens / sequence_len for examples",
            )
            return None
        held = float(self.ft.get("val_fraction", (0.0, ""))[0])
        return max(1, math.ceil(epochs * sum(c for c in counts if c) * (1.0 - held) / per_step))

    def optimisation(self) -> None:
        bf16, fp16 = self.data.get("bf16"), self.get("fp16", bool)
        if fp16:
            self.fail(
                "fp16",
                "fp16: true is not offered: the appliance trains in bf16 (no loss scaling to get wrong) or fp32",
                "set bf16: true (Ampere or newer GPUs), or fp16: false for fp32",
            )
        self.note("fp16", "accepted: off")
        if not (bf16 is None or isinstance(bf16, bool) or bf16 in ("auto", "full")):
            self.fail("bf16", f"bf16 must be true, false, auto or full, got {_shown(bf16)}", "set bf16: true")
            bf16 = None
        precision = {True: "bf16", "full": "bf16", False: "fp32"}.get(bf16, "auto")
        self.set("train", "precision", precision, _from("bf16", self.data, "Axolotl's default"))
        if self.method == "qlora" and "bnb_4bit_compute_dtype" not in self.ft:
            why = "the 4-bit base computes in the training precision"
            self.set(
                "finetune", "bnb_4bit_compute_dtype", "float32" if precision == "fp32" else "bfloat16", _from("bf16", self.data, "Axolotl's default"), why=why
            )
        tf32 = self.get("tf32", bool)
        if tf32 is not None:
            self.set("train", "tf32", tf32, "tf32")
        ckpt = self.data.get("gradient_checkpointing")
        if ckpt in ("offload", "offload_disk"):
            self.set("finetune", "gradient_checkpointing", True, "gradient_checkpointing", why="recomputed on the device, not offloaded")
        elif self.get("gradient_checkpointing", bool) is not None:
            self.set("finetune", "gradient_checkpointing", bool(ckpt), "gradient_checkpointing")
        self.set("train", "weight_decay", self.get("weight_decay", float, 0.0), _from("weight_decay", self.data, "the Trainer's default"))
        self.set("train", "beta1", self.get("adam_beta1", float, 0.9), _from("adam_beta1", self.data, "the Trainer's default"))
        self.set("train", "beta2", self.get("adam_beta2", float, 0.999), _from("adam_beta2", self.data, "the Trainer's default"))
        self.set("train", "grad_clip", self.get("max_grad_norm", float, 1.0), _from("max_grad_norm", self.data, "the Trainer's default"))
        seed = self.get("seed", int)
        if seed is not None:
            self.set("train", "seed", seed, "seed")
        optimizer = self.get("optimizer", str)
        if optimizer in _OPTIMIZERS_COMPACT:
            self.note(
                "optimizer",
                "ignored: the appliance uses torch AdamW with fp32 states, which a checkpoint holds exactly so a resumed run "
                "continues bit for bit; an adapter's states are small anyway (LoRA trains well under 1 % of the weights)",
            )
        elif optimizer is not None and optimizer not in _OPTIMIZERS_ADAMW:
            self.fail(
                "optimizer",
                f"optimizer: {optimizer} is not offered: the appliance trains with AdamW",
                "set optimizer: adamw_torch (and re-tune learning_rate if it was set for another optimizer)",
            )
        self.note("optimizer", "accepted: torch AdamW")

    def checkpoints(self) -> None:
        steps = self.train.get("steps", (0, ""))[0]
        for key, name in (("save_steps", "checkpoint_every"), ("eval_steps", "eval_every"), ("logging_steps", "log_every")):
            value = self.get(key, float)
            if value is None:
                continue
            if 0 < value < 1 and steps:
                self.set("train", name, max(1, round(value * steps)), key, why=f"{value:g} of {steps} steps")
            elif value >= 1 and value == int(value):
                self.set("train", name, int(value), key)
            else:
                self.fail(key, f"{key} must be a whole number of steps or a fraction of them, got {value:g}", f"set {key} to a whole number")
        limit = self.get("save_total_limit", int)
        if limit is not None:
            self.set("train", "keep_last", max(1, limit), "save_total_limit")
        budget = self.get("eval_max_new_tokens", int)
        if budget is not None:
            self.set("finetune.gate", "max_new_tokens", budget, "eval_max_new_tokens")
        for key in ("save_strategy", "eval_strategy", "evaluation_strategy"):
            if self.data.get(key) in (None, "steps"):
                self.note(key, "accepted: every so many steps")
            elif key == "save_strategy":
                self.note(key, "ignored: a checkpoint is saved every train.checkpoint_every steps, so a run can resume")
            else:
                self.note(key, "ignored: validation loss is measured every train.eval_every steps and at the end")

    def remaining(self) -> None:
        for key, value in self.data.items():
            if key in self.notes:
                continue
            if key.startswith(("wandb_", "mlflow_", "comet_")) or key in _REMOTE:
                sends = not _off(value) and value not in ("disabled", "offline")
                why = _HUB_WHY if "hub" in key else _LOG_WHY
                self.note(key, f"refused: {why}" if sends else "ignored: off (and nothing leaves the appliance either way)")
            elif key in _IGNORED:
                self.note(key, f"ignored: {_IGNORED[key]}")
            elif key in _REFUSED:
                if _off(value):
                    self.note(key, "accepted: off")
                else:
                    self.fail(key, f"{key}: {_REFUSED[key][0]}", _REFUSED[key][1])
            elif key == "special_tokens":
                if _off(value):
                    self.note(key, "accepted: none")
                elif isinstance(value, dict) and set(value) == {"pad_token"}:
                    self.note(key, "ignored: padding carries no loss and no attention, so the pad token does not change training")
                else:
                    self.fail(
                        key,
                        "special_tokens other than pad_token change the tokenizer; the appliance uses the base's tokens unchanged",
                        "remove them, or set them in the base's tokenizer files",
                    )
            else:
                self.note(key, "ignored: unknown to this converter")

    # -- output --------------------------------------------------------------------------------

    def validate(self) -> None:
        """The recipe's own checks on the mapped values, reported by the Axolotl key to change."""
        ft: dict[str, Any] = {k: v for k, (v, _) in self.ft.items()}
        ft["datasets"] = [dict(d) for d in self.datasets]
        if self.gate:
            ft["gate"] = {k: v for k, (v, _) in self.gate.items()}
        for table, data, cls in (("finetune", ft, FinetuneConfig), ("train", {k: v for k, (v, _) in self.train.items()}, TrainConfig)):
            for p in collect(cls, data, source=self.source, prefix=table)[1]:
                key = self.origin.get(p.key, p.key)
                self.problems.append(Problem(key, f"{key} gives {p.text()}", f"change {key} in {self.source}"))

    def toml(self) -> str:
        name = Path(self.source).name
        lines = [
            f"# Converted from the Axolotl config {name} by `appliance finetune --from-axolotl`.",
            "# Each comment names the Axolotl key (or default) a value came from. Paths are relative to this file, or absolute.",
            "",
            "[recipe]",
            f"name = {_toml(Path(self.source).stem or 'axolotl')}",
            f"description = {_toml(f'Fine-tune converted from the Axolotl config {name}')}",
            "",
            "[finetune]",
            *_rows(self.ft),
            "# allow_unsigned_base = true  # only for a base you trust without a model.sig; the choice is recorded in the ledger",
        ]
        for entry in self.datasets:
            lines += ["", "[[finetune.datasets]]", *(f"{k} = {_toml(v)}" for k, v in entry)]
        if self.gate:
            lines += ["", "[finetune.gate]", *_rows(self.gate)]
        return "\n".join([*lines, "", "[train]", *_rows(self.train)]) + "\n"


def _rows(table: dict[str, tuple[Any, str]]) -> list[str]:
    out = []
    for k, (v, why) in table.items():
        text = _toml(v)
        out.append(f"# {why}\n{k} = {text}" if "\n" in text or len(why) > 100 else f"{k} = {text}  # {why}")
    return out


def _toml(value: Any) -> str:
    """``value`` as TOML: a multi-line string as a literal block (templates stay readable)."""
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if not isinstance(value, str):
        return toml_value(value)
    if "\n" in value and "'''" not in value and all(c in "\t\n" or (" " <= c and c != "\x7f") for c in value):
        return "'''\n" + value + "'''"
    # JSON's escapes are TOML's, but TOML also wants DEL escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _count_lines(path: Path) -> int | None:
    """Non-blank lines of a JSONL file (one example each); None for formats not counted here."""
    name = path.name.lower()
    if not name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return None
    opener: Any = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except (OSError, EOFError):
        return None


def _has_template(base: Path) -> bool:
    try:
        config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    template = config.get("chat_template") if isinstance(config, dict) else None
    return bool(template) or (base / "chat_template.jinja").is_file() or (base / "chat_template.json").is_file()


# -- the keys: what each Axolotl setting becomes ------------------------------------------------

_FORMATS = {"completion": "completion", "alpaca": "alpaca", "chat_template": "chat", "input_output": "input_output"}

# Axolotl's chatml template (src/axolotl/utils/chat_templates), in its plain form.
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The same AdamW update with fp32 states in torch's implementation.
_OPTIMIZERS_ADAMW = {"adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw", "adamw_apex_fused", "optimi_adamw"}
# AdamW with compressed or paged states: the appliance keeps fp32 states (see the module docstring).
_OPTIMIZERS_COMPACT = {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch_4bit", "ao_adamw_8bit", "adamw_anyprecision"}

_LOG_WHY = "nothing leaves the appliance; training metrics go to TensorBoard event files in the run"
_HUB_WHY = "nothing leaves the appliance; the tuned model is packaged and signed in its home (`appliance model export` copies it out)"
# Besides every wandb_*, mlflow_* and comet_* key.
_REMOTE = {
    "use_wandb",
    "use_mlflow",
    "use_comet",
    "hf_mlflow_log_artifacts",
    "hub_model_id",
    "hub_strategy",
    "push_to_hub",
    "hub_private_repo",
    "push_dataset_to_hub",
}


def _many(names: str, why: str) -> dict[str, str]:
    return dict.fromkeys(names.split(), why)


# Any value: machinery, or a choice the appliance makes itself; training learns the same.
_IGNORED = {
    "output_dir": "the appliance keeps a run's checkpoints and packaged model in its home (`appliance model export` copies a model out)",
    "dataset_prepared_path": "examples are rendered inside the run; nothing is cached elsewhere",
    "pad_to_sequence_len": "padding to a fixed length only steadies memory use; padded positions carry no loss, so training is the same",
    "eval_batch_size": "validation batches hold train.batch_size sequences",
    "use_tensorboard": "metrics always go to TensorBoard event files in the run",
    "save_safetensors": "the appliance writes safetensors",
    "save_only_model": "checkpoints keep the optimizer state, so a run resumes exactly",
    "group_by_length": "it only reorders batches",
    "adam_epsilon": "torch AdamW's 1e-8, the Trainer's default too",
    "gradient_checkpointing_kwargs": "the appliance decides how layers are recomputed",
    "hf_use_auth_token": "nothing is downloaded, so no token is needed",
    "lr_div_factor": "for one_cycle only",
    "image_resize_algorithm": "for images only",
    "auto_find_batch_size": "micro_batch_size is used as given",
    **_many(
        "resume_from_checkpoint auto_resume_from_checkpoints", "a new run starts from the base; continue a stopped appliance run with `appliance resume RUN`"
    ),
    **_many("saves_per_epoch evals_per_epoch", "the appliance counts steps: train.checkpoint_every and train.eval_every"),
    **_many("loss_watchdog_threshold loss_watchdog_patience", "the appliance stops a run whose loss diverges by itself"),
    **_many(
        "eval_table_size eval_causal_lm_metrics do_causal_lm_eval do_bench_eval bench_dataset bench_split",
        "the appliance scores exact match, BLEU and chrF on the prompts of [finetune.gate] task_file",
    ),
    **_many(
        "eval_sample_packing sample_packing_eff_est total_num_tokens sample_packing_group_size sample_packing_bin_size sample_pack_sequentially "
        "batch_flattening",
        "packing details; finetune.packing decides",
    ),
    **_many(
        "flash_attention sdp_attention xformers_attention flash_attn_cross_entropy flash_attn_rms_norm flash_attn_fuse_qkv flash_attn_fuse_mlp "
        "flash_optimum lora_mlp_kernel lora_qkv_kernel lora_o_kernel liger_rope liger_rms_norm liger_glu_activation liger_layer_norm "
        "liger_fused_linear_cross_entropy cut_cross_entropy torch_compile torch_compile_backend",
        "a kernel choice: the appliance picks its kernels, and the maths is the same",
    ),
    "plugins": "no plugin code runs; Axolotl's plugins swap kernels, which the appliance picks itself",
    **_many(
        "device_map max_memory gpu_memory_limit low_cpu_mem_usage lora_on_cpu fsdp fsdp_config deepspeed ddp_timeout ddp_bucket_cap_mb "
        "ddp_broadcast_buffers ddp_find_unused_parameters sequence_parallel_degree heads_k_stride ring_attn_func tensor_parallel_size "
        "context_parallel_size local_rank world_size",
        "the appliance places the run on its devices ([distributed])",
    ),
    **_many(
        "dataset_processes dataset_num_proc dataset_keep_in_memory dataloader_num_workers dataloader_pin_memory dataloader_prefetch_factor "
        "dataloader_drop_last remove_unused_columns skip_prepare_dataset torchdistx_path include_tokens_per_second profiler_steps gc_steps",
        "loading and profiling machinery",
    ),
    **_many("shuffle_merged_datasets shuffle_before_merging_datasets", "the appliance shuffles the training examples with train.seed"),
    **_many("is_llama_derived_model is_mistral_derived_model is_qwen_derived_model is_falcon_derived_model", "the base's config.json names its architecture"),
    **_many("revision_of_model base_model_ignore_patterns", "a local directory holds one version of one model"),
    **_many("tokenizer_use_fast tokenizer_legacy", "the base's tokenizer is loaded as its files describe"),
    **_many(
        "resize_token_embeddings_to_32x shrink_embeddings mean_resizing_embeddings embeddings_skip_upcast", "no tokens are added, so embeddings keep their size"
    ),
    **_many("strict debug debug_num_examples", "Axolotl's own checks and logging"),
}

_NOT_LORA = ("is not offered: the appliance trains plain LoRA", "remove it")
_NOT_SFT = ("is not offered: the appliance fine-tunes with next-token loss on examples (no preference or reward training)", "remove it")
# Unset, false or empty: accepted. Set: the conversion fails (it would change what is trained).
_REFUSED = {
    "lora_model_dir": ("starting from an existing adapter is not offered; a run trains a new one", "remove lora_model_dir"),
    "lora_fan_in_fan_out": (
        "fan-in/fan-out LoRA (GPT-2's Conv1D layers) is not offered",
        "remove it: the appliance adapts Llama, Qwen and Mistral-style bases",
    ),
    "lora_modules_to_save": ("training whole modules beside the adapter is not offered", "remove lora_modules_to_save"),
    **dict.fromkeys(
        "peft_use_dora peft_use_rslora peft_layers_to_transform peft_layers_pattern peft_layer_replication loraplus_lr_ratio loraplus_lr_embedding "
        "peft relora_steps relora_warmup_steps relora_anneal_steps relora_prune_ratio relora_cpu_offload".split(),
        _NOT_LORA,
    ),
    **dict.fromkeys(
        "rl rl_beta dpo_use_weighting rpo_alpha orpo_alpha kto_desirable_weight kto_undesirable_weight cpo_alpha simpo_gamma trl reward_model "
        "process_reward_model".split(),
        _NOT_SFT,
    ),
    **dict.fromkeys("tokens added_tokens_overrides".split(), ("adding tokens changes the tokenizer; the appliance uses the base's unchanged", "remove it")),
    **dict.fromkeys("gptq qat quantization".split(), ("quantized training other than QLoRA's NF4 is not offered", "remove it, or use load_in_4bit: true")),
    **dict.fromkeys("bfloat16 float16".split(), ("pure half-precision weights are not offered; bf16 means autocast here", "remove it and set bf16: true")),
    **dict.fromkeys("overrides_of_model_config overrides_of_model_kwargs random_init_weights".split(), ("changing the base model is not offered", "remove it")),
    **dict.fromkeys("image_size processor_type".split(), ("multimodal training is not offered", "remove it")),
    "neftune_noise_alpha": ("noisy embeddings (NEFTune) are not offered", "remove it"),
    "noisy_embedding_alpha": ("noisy embeddings (NEFTune) are not offered", "remove it"),
    "s2_attention": ("shifted-sparse attention changes the model's attention; not offered", "remove it"),
    "lr_quadratic_warmup": ("a quadratic warmup is not offered (warmup is linear)", "remove it"),
    "cosine_constant_lr_ratio": ("a cosine with a constant tail is not offered", "remove it, or use cosine_min_lr_ratio"),
    "lr_scheduler_kwargs": ("scheduler arguments are not offered", "remove them (cosine_min_lr_ratio sets the floor)"),
    "early_stopping_patience": ("the appliance trains the steps it is given; the gate ([finetune.gate]) decides promotion", "remove it"),
    "unfrozen_parameters": ("training chosen weights of the base is not offered", "use an adapter, or no adapter for every weight"),
    "optim_args": ("optimizer arguments are not offered", "remove them (adam_beta1, adam_beta2 and weight_decay are)"),
    "optim_target_modules": ("for GaLore, which is not offered", "remove it"),
    "default_system_message": ("a default system message is not offered", "put the system message in the examples"),
    "eot_tokens": ("end-of-turn tokens come from the base's chat template here", "remove it"),
    "chat_template_kwargs": ("chat template arguments are not offered", "remove them"),
    "pretraining_dataset": ("streaming a pre-training dataset is not offered here; pre-training is a recipe of its own", "remove it"),
    "curriculum_sampling": ("examples are shuffled with train.seed; curriculum order is not offered", "remove it"),
    "dataset_exact_deduplication": ("the appliance does not deduplicate fine-tuning examples", "deduplicate the files first, then remove it"),
    "dataset_shard_num": ("training on a shard of the data is not offered", "remove it"),
    "dataset_shard_idx": ("training on a shard of the data is not offered", "remove it"),
}

_DEFAULT_ROLES = {"user": ["human", "user"], "assistant": ["gpt", "assistant"], "system": ["system"], "tool": ["tool"]}
# Dataset entry keys accepted with these values only.
_DATASET_ACCEPTED: dict[str, tuple[Any, ...]] = {
    "split": ("train",),
    "ds_type": ("json", "jsonl", "parquet", "csv"),
    "message_property_mappings": ({"role": "role", "content": "content"},),
    "message_field_role": ("role",),
    "message_field_content": ("content",),
    "field_system": ("system",),
    "roles": (_DEFAULT_ROLES,),
    "trust_remote_code": (False,),
}
_DATASET_IGNORED = {
    "train_on_eos": "each trained turn's end-of-turn token is trained (Axolotl's turn)",
    "train_on_eot": "each trained turn's end-of-turn token is trained (Axolotl's turn)",
    "preprocess_shards": "loading machinery",
}
_DATASET_REFUSED = {
    "name": "a Hugging Face dataset configuration; the appliance reads local files",
    "revision": "a Hugging Face dataset revision; the appliance reads local files",
    "shards": "training on a shard of the data is not offered",
    "shards_idx": "training on a shard of the data is not offered",
    "message_field_training": "per-turn training flags are not offered (roles_to_train is)",
    "message_field_training_detail": "per-token training spans are not offered (roles_to_train is)",
    "drop_system_message": "dropping system turns is not offered",
    "split_thinking": "splitting reasoning traces is not offered",
}
