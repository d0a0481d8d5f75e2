"""Convert an Axolotl YAML config into an appliance recipe: ``[recipe]``, ``[finetune]``, ``[train]``, ``[distributed]``.

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

Paths (``base_model``, dataset files, the ``deepspeed`` JSON) are read relative to the YAML file's
folder, else the current folder (where Axolotl itself resolves them). In the recipe they are
relative to ``recipe_dir`` (where it will be written) when under it, else (and when printed) absolute.

``optimizer: adamw_bnb_8bit`` (and the other AdamW variants with 8-bit or paged states) becomes
torch AdamW with fp32 states: a checkpoint holds those exactly, so a resumed run continues bit
for bit, and an adapter's states are small anyway. ``load_in_4bit`` needs bitsandbytes, checked
here so the conversion says so instead of the run failing later.

``deepspeed`` and ``fsdp`` / ``fsdp_config`` choose the engine of a full fine-tune (``[distributed]``);
an adapter trains on one process, so with one they fail.

YAML is read with ``yaml.safe_load`` only: a config names values, never Python objects.

Which keys are ignored or refused, and the words of every refusal, are tables in ``axolotl_keys``;
the conversion's result, the recipe's checks (of its values and the files it names) and its text are in ``axolotl_toml``.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, Problem
from pipeline.finetune import axolotl_keys as keys
from pipeline.finetune.axolotl_toml import Conversion, Note, count_examples, deepspeed_refusal, has_template, quoted, recipe_problems, recipe_text, toml_text


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
        self.dist: dict[str, tuple[Any, str]] = {}
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
        self.sub_notes.setdefault(re.split(r"[\[.]", key, maxsplit=1)[0], []).append(Note(key, what))

    def fail(self, key: str, message: str, fix: str) -> None:
        self.problems.append(Problem(key, message, fix))
        self.notes.setdefault(key, Note(key, f"refused: {message}"))

    def refuse(self, key: str, reason: str = "", **values: Any) -> None:
        """Fail ``key`` with the REFUSALS entry for ``reason`` (default: the key itself), filled in with ``values``."""
        message, fix = keys.REFUSALS[reason or key]
        self.fail(key, message.format(key=key, source=self.source, **values), fix.format(key=key, source=self.source, **values))

    def refuse_true(self, key: str, accepted: str = "off") -> None:
        """Refuse ``key`` when it is true (REFUSALS says why); else note it accepted."""
        if self.get(key, bool):
            self.refuse(key)
        self.note(key, f"accepted: {accepted}")

    def set(self, table: str, name: str, value: Any, key: str, *, why: str = "") -> None:
        comment = f"{key}: {why}" if why and key in self.data else (why or key)
        {"finetune": self.ft, "train": self.train, "finetune.gate": self.gate, "distributed": self.dist}[table][name] = (value, comment)
        self.origin[f"{table}.{name}"] = key
        shown = toml_text(value) if len(toml_text(value)) < 80 else f"({len(str(value))} characters)"
        self.note(key, f"mapped to {table}.{name} = {shown}" + (f" ({why})" if why else ""))

    def copy(self, table: str, name: str, key: str, kind: type, default: Any = None, fallback: str = "") -> None:
        """Map ``key`` (read as ``kind``) to ``table.name``; unset, ``default`` commented with ``fallback``, or nothing."""
        value = self.get(key, kind, default)
        if value is not None:
            self.set(table, name, value, self.key_or(key, fallback))

    def key_or(self, key: str, default: str) -> str:
        """The comment for a value: its Axolotl key when the config sets it, else which default."""
        return key if key in self.data else default

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
            self.refuse(name, "type", words=keys.TYPE_WORDS[kind], value=quoted(value))
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
        self.distributed()
        self.remaining()
        if not self.problems:
            self.problems += recipe_problems(self.ft, self.train, self.gate, self.datasets, source=self.source, origin=self.origin, dist=self.dist)
        if self.problems:
            error = ConfigError.of(self.source, self.problems)
            hint = error.hint if len(self.problems) == 1 else f"fix each key named above in {self.source}, then convert it again"
            raise ConfigError(error.message, hint, self.problems)
        notes = [n for k in self.data for n in [self.notes[k], *self.sub_notes.get(k, [])]]
        return Conversion(recipe_text=recipe_text(self.ft, self.train, self.gate, self.datasets, source=self.source, dist=self.dist), notes=notes)

    def model(self) -> Path | None:
        path = self.base_model()
        for key in ("base_model_config", "tokenizer_config"):
            other = self.get(key, str)
            if other is None:
                self.note(key, "accepted: the base directory's own")
            elif path is None or self.find(other)[0] == path:
                self.note(key, "accepted: the same directory as base_model")
            else:
                self.refuse(key, "other_config", other=other)
        for key, suffixes in keys.CAUSAL_CLASSES:
            value = self.get(key, str)
            if value is not None and not value.endswith(suffixes):
                self.refuse(key, "model_class", value=value)
            self.note(key, "accepted: the base is loaded by its config.json as a causal LM, with its own tokenizer")
        self.refuse_true("trust_remote_code", "no code from a model directory runs")
        return path

    def base_model(self) -> Path | None:
        text = self.get("base_model", str)
        if text is None:
            if "base_model" not in self.data:
                self.refuse("base_model", "base_model.missing")
            return None
        path, places = self.find(text)
        if path is None or not path.is_dir():
            self.refuse("base_model", "base_model.remote", text=text, looked=f" (looked for {' and '.join(map(str, places))})" if places else "")
            return None
        if not (path / "config.json").is_file():
            self.refuse("base_model", "base_model.layout", text=text)
            return None
        self.set("finetune", "base", self.written(path), "base_model", why="" if (path / "model.sig").is_file() else keys.UNSIGNED_WHY)
        return path

    def adapter(self) -> None:
        adapter, four = self.get("adapter", str), self.get("load_in_4bit", bool)
        self.refuse_true("load_in_8bit")
        if adapter not in (None, "lora", "qlora"):
            self.refuse("adapter", value=adapter)
            return
        if adapter is None and four:
            self.refuse("load_in_4bit")
            return
        method = "qlora" if adapter == "qlora" or four else ("lora" if adapter else "full")
        if method == "qlora" and not bitsandbytes_available():
            self.refuse("load_in_4bit" if four else "adapter", "bitsandbytes", value="true" if four else "qlora")
            return
        self.set("finetune", "method", method, self.key_or("adapter", "no adapter"), why=keys.METHOD_WHY[method])
        self.note("load_in_4bit", f"mapped to finetune.method = {toml_text(method)}" if four else "accepted: off")
        self.method = method
        for name, value in (self.get("bnb_config_kwargs", dict) or {}).items():
            if name in keys.BNB_KWARGS and method == "qlora":
                self.set("finetune", name, value, "bnb_config_kwargs")
            elif name != "llm_int8_has_fp16_weight":
                self.refuse("bnb_config_kwargs", name=name)
        self.note("bnb_config_kwargs", "accepted: the defaults" if method == "qlora" else "ignored: no 4-bit base")

    def lora(self) -> None:
        if self.method in ("", "full"):
            for key in keys.LORA_KEYS:
                self.note(key, "ignored: no adapter, so every weight trains")
            return
        for key, kind in (("lora_r", int), ("lora_alpha", int), ("lora_dropout", float)):
            self.copy("finetune", key, key, kind)
        targets = self.data.get("lora_target_modules")
        if isinstance(targets, str):
            if targets != "all-linear":
                self.refuse("lora_target_modules", "lora_target_modules.pattern")
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
            self.refuse("lora_target_modules", "lora_target_modules.missing")
        self.note("lora_target_linear", "accepted: false; the modules are lora_target_modules")

    def data_sets(self, base: Path | None) -> None:
        templates: dict[str, str] = {}
        roles: dict[str, list[str]] = {}
        chat = False
        for key, split in (("datasets", "train"), ("test_datasets", "val")):
            items = self.data.get(key)
            if items is None:
                if key == "datasets":
                    self.refuse("datasets", "datasets.missing")
                continue
            if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
                self.refuse(key, "datasets.shape")
                continue
            before = len(self.datasets)
            for i, item in enumerate(items):
                chat = self.dataset(f"{key}[{i}]", item, split, templates, roles) or chat
            self.note(key, f"mapped to {len(self.datasets) - before} [[finetune.datasets]] table(s) with split = {toml_text(split)}")
        self.chat_template(templates, chat, base)
        if len({tuple(r) for r in roles.values()}) > 1:
            self.refuse("datasets", "datasets.roles")
        elif roles:
            self.set("finetune", "roles_to_train", next(iter(roles.values())), next(iter(roles)))
        self.copy("finetune", "train_on_inputs", "train_on_inputs", bool, False, "Axolotl's default")
        self.copy("finetune", "packing", "sample_packing", bool, False, "Axolotl's default")
        size = self.get("val_set_size", float)
        if size is not None and not 0.0 <= size < 1.0:
            self.refuse("val_set_size", value=size)
        elif "test_datasets" in self.data:
            self.set("finetune", "val_fraction", 0.0, "val_set_size", why="test_datasets hold the validation examples")
        elif size:
            self.set("finetune", "val_fraction", size, "val_set_size")
        else:
            self.set("finetune", "val_fraction", 0.05, self.key_or("val_set_size", "no test_datasets"), why=keys.VAL_WHY)

    def dataset(self, key: str, item: dict[str, Any], split: str, templates: dict[str, str], roles: dict[str, list[str]]) -> bool:
        """Add the tables for one Axolotl dataset entry; whether it is a chat."""
        kind = item.get("type")
        fmt = keys.FORMATS.get(kind) if isinstance(kind, str) else None
        if fmt is None:
            self.refuse(f"{key}.type", "dataset.type", value=quoted(kind))
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
        shown = ", ".join(f"{k} = {toml_text(v)}" for k, v in fields)
        for text in paths:
            if not isinstance(text, str) or not text.strip():
                self.refuse(f"{key}.path", "dataset.path", value=quoted(text))
                continue
            path, places = self.find(text)
            if path is None or not path.is_file():
                self.refuse(f"{key}.path", "dataset.remote", text=text, looked=" and ".join(map(str, places)) or "a file, not a URL")
                continue
            self.datasets.append([("path", self.written(path)), *fields, ("split", split)])
            if split == "train":
                self.train_files.append(path)
            self.sub(key, f"mapped to [[finetune.datasets]] path = {toml_text(self.written(path))}, {shown}, split = {toml_text(split)}")
        return fmt == "chat"

    def dataset_key(self, dotted: str, name: str, value: Any) -> None:
        if name in keys.DATASET_HANDLED:
            return
        if name in keys.DATASET_ACCEPTED:
            if value is None or value in keys.DATASET_ACCEPTED[name]:
                self.sub(dotted, "accepted: what the appliance does")
            else:
                self.refuse(dotted, "dataset.value", value=quoted(value))
        elif name in keys.DATASET_IGNORED:
            self.sub(dotted, f"ignored: {keys.DATASET_IGNORED[name]}")
        elif name in keys.DATASET_REFUSED and not _off(value):
            self.refuse(dotted, "dataset.refused", why=keys.DATASET_REFUSED[name])
        elif name in keys.DATASET_REFUSED:
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
            self.refuse("chat_template", "chat_template.differ", names=", ".join(sorted(names)))
            return
        name = next(iter(names), "jinja" if jinja else "tokenizer_default")
        own = base is not None and has_template(base)
        key = "chat_template_jinja" if jinja else "chat_template"
        if jinja:
            self.set("finetune", "chat_template", jinja, key)
        elif name == "chatml" or (name == "tokenizer_default_fallback_chatml" and not own):
            self.set("finetune", "chat_template", keys.CHATML, key, why="Axolotl's chatml")
        elif name in ("tokenizer_default", "tokenizer_default_fallback_chatml"):
            if base is not None and not own:
                self.refuse(key, "chat_template.base", name=name, base=base)
            self.note(key, "accepted: the base tokenizer's own chat template")
        else:
            self.refuse(key, "chat_template.unknown", name=name)
        self.note("chat_template", f"accepted: {top}, with chat_template_jinja" if top == "jinja" else "accepted: unset")
        self.note("chat_template_jinja", "accepted: unset")

    def schedule(self) -> None:
        batch, accum, total = self.get("micro_batch_size", int, 1), self.get("gradient_accumulation_steps", int), self.get("batch_size", int)
        if accum is None and total is not None and batch:
            if total % batch:
                self.refuse("batch_size", total=total, batch=batch)
            accum = max(1, total // batch)
            self.note("batch_size", f"mapped to train.grad_accum = {accum} (batch_size / micro_batch_size)")
        self.note("batch_size", "ignored: gradient_accumulation_steps sets the batch")
        self.set("train", "batch_size", batch or 1, self.key_or("micro_batch_size", "Axolotl's default"))
        self.set("train", "grad_accum", accum or 1, self.key_or("gradient_accumulation_steps", "batch_size" if total else "Axolotl's default"))
        self.copy("train", "seq_len", "sequence_len", int, 2048, "Axolotl's default")
        steps, epochs = self.get("max_steps", int), self.get("num_epochs", float, 1.0)
        if steps is not None:
            self.set("train", "steps", steps, "max_steps")
            self.note("num_epochs", "ignored: max_steps sets the length, as it does in Axolotl")
        elif epochs is not None:
            steps = self.estimate_steps(epochs, (batch or 1) * (accum or 1))
            if steps is not None:
                why = f"estimated: {epochs:g} epoch(s) of the training examples at {(batch or 1) * (accum or 1)} per step"
                self.set("train", "steps", steps, self.key_or("num_epochs", "Axolotl's default, 1 epoch"), why=why)
        lr = self.get("learning_rate", float)
        if lr is None:
            self.refuse("learning_rate")
            return
        self.set("train", "lr", lr, "learning_rate")
        name = self.get("lr_scheduler", str) or "cosine"
        if name in ("cosine", "cosine_with_min_lr"):
            ratio = self.get("cosine_min_lr_ratio", float, 0.0)
            if name == "cosine_with_min_lr":
                kwargs = self.get("lr_scheduler_kwargs", dict) or {}
                ratio = float(kwargs.get("min_lr_rate", float(kwargs.get("min_lr") or 0.0) / lr))
                self.note("lr_scheduler_kwargs", "mapped to train.min_lr")
            self.set("train", "schedule", "cosine", self.key_or("lr_scheduler", "Axolotl's default"))
            self.set("train", "min_lr", lr * ratio, self.key_or("cosine_min_lr_ratio", "cosine to 0, as the Trainer's"))
        elif name in ("constant", "constant_with_warmup"):
            self.set("train", "schedule", "constant", "lr_scheduler")
            self.set("train", "min_lr", 0.0, "lr_scheduler", why="unused by a constant schedule")
            self.note("cosine_min_lr_ratio", "ignored: the schedule is constant")
        else:
            self.refuse("lr_scheduler", value=name)
        warmup, ratio_w = self.get("warmup_steps", int), self.get("warmup_ratio", float)
        if name == "constant":
            self.set("train", "warmup_steps", 0, "lr_scheduler", why="Axolotl's constant schedule has no warmup")
            self.note("warmup_steps", "ignored: lr_scheduler: constant has no warmup (constant_with_warmup has)")
        elif warmup is not None:
            self.set("train", "warmup_steps", warmup, "warmup_steps")
        elif steps is not None:
            self.set("train", "warmup_steps", round((ratio_w or 0.0) * steps), self.key_or("warmup_ratio", "the Trainer's default, none"))
        self.note("warmup_ratio", "ignored: warmup_steps is set, or the schedule has no warmup")

    def estimate_steps(self, epochs: float, per_step: int) -> int | None:
        counts = [count_examples(f) for f in self.train_files]
        packing = bool(self.data.get("sample_packing"))
        if not counts or packing or None in counts:
            self.refuse("num_epochs", why="examples are packed, so steps depend on token counts" if packing else "only JSONL files are counted here")
            return None
        held = float(self.ft.get("val_fraction", (0.0, ""))[0])
        return max(1, math.ceil(epochs * sum(c for c in counts if c) * (1.0 - held) / per_step))

    def optimisation(self) -> None:
        self.refuse_true("fp16")
        bf16 = self.data.get("bf16")
        if not (bf16 is None or isinstance(bf16, bool) or bf16 in ("auto", "full")):
            self.refuse("bf16", value=quoted(bf16))
            bf16 = None
        precision = {True: "bf16", "full": "bf16", False: "fp32"}.get(bf16, "auto")
        self.set("train", "precision", precision, self.key_or("bf16", "Axolotl's default"))
        if self.method == "qlora" and "bnb_4bit_compute_dtype" not in self.ft:
            dtype, why = "float32" if precision == "fp32" else "bfloat16", "the 4-bit base computes in the training precision"
            self.set("finetune", "bnb_4bit_compute_dtype", dtype, self.key_or("bf16", "Axolotl's default"), why=why)
        self.copy("train", "tf32", "tf32", bool)
        ckpt = self.data.get("gradient_checkpointing")
        if ckpt in ("offload", "offload_disk"):
            self.set("finetune", "gradient_checkpointing", True, "gradient_checkpointing", why="recomputed on the device, not offloaded")
        elif self.get("gradient_checkpointing", bool) is not None:
            self.set("finetune", "gradient_checkpointing", bool(ckpt), "gradient_checkpointing")
        for name, key, default in keys.TRAINER_DEFAULTS:
            self.copy("train", name, key, float, default, "the Trainer's default")
        self.copy("train", "seed", "seed", int)
        optimizer = self.get("optimizer", str)
        if optimizer in keys.OPTIMIZERS_COMPACT:
            self.note("optimizer", f"ignored: {keys.COMPACT_WHY}")
        elif optimizer is not None and optimizer not in keys.OPTIMIZERS_ADAMW:
            self.refuse("optimizer", value=optimizer)
        self.note("optimizer", "accepted: torch AdamW")

    def checkpoints(self) -> None:
        steps = self.train.get("steps", (0, ""))[0]
        for key, name in keys.STEP_KEYS:
            value = self.get(key, float)
            if value is None:
                continue
            if 0 < value < 1 and steps:
                self.set("train", name, max(1, round(value * steps)), key, why=f"{value:g} of {steps} steps")
            elif value >= 1 and value == int(value):
                self.set("train", name, int(value), key)
            else:
                self.refuse(key, "steps", value=value)
        limit = self.get("save_total_limit", int)
        if limit is not None:
            self.set("train", "keep_last", max(1, limit), "save_total_limit")
        self.copy("finetune.gate", "max_new_tokens", "eval_max_new_tokens", int)
        for key, why in keys.STRATEGIES.items():
            self.note(key, "accepted: every so many steps" if self.data.get(key) in (None, "steps") else f"ignored: {why}")

    def distributed(self) -> None:
        """deepspeed, fsdp, fsdp_config: the engine of a full fine-tune ([distributed]); an adapter trains on one process."""
        given, adapter = [k for k in keys.ENGINE_KEYS if not _off(self.data.get(k))], self.data.get("adapter")
        if given and not _off(adapter):
            for key in given:
                self.refuse(key, "engine.adapter", adapter=adapter if isinstance(adapter, str) else quoted(adapter))
        elif given and given[0] == "deepspeed":
            self.deepspeed(self.data["deepspeed"])
            for key in given[1:]:
                self.refuse(key, "engine.both")
        elif given:
            self.fsdp(given)
        for key in keys.ENGINE_KEYS:
            self.note(key, "accepted: off")

    def deepspeed(self, text: Any) -> None:
        path, places = self.find(text) if isinstance(text, str) else (None, [])
        if path is None or not path.is_file():
            looked = " and ".join(map(str, places)) or "a file, not a URL"
            self.refuse("deepspeed", "deepspeed.missing" if isinstance(text, str) else "deepspeed.path", text=text, looked=looked, value=quoted(text))
            return
        written, refused = self.written(path), deepspeed_refusal(path, self.train)
        self.dist.update(engine=("deepspeed", "deepspeed"), deepspeed_config=(written, "deepspeed"))
        self.origin.update({"distributed.engine": "deepspeed", "distributed.deepspeed_config": "deepspeed"})
        what = f'mapped to distributed.engine = "deepspeed", deepspeed_config = {toml_text(written)}: {keys.NPROC_WHY}'
        self.note("deepspeed", what + (f"; the run will refuse the file as it stands: {refused}" if refused else ""))

    def fsdp(self, given: list[str]) -> None:
        """distributed.engine = "fsdp"; a note on each fsdp option (a setting that is true) and fsdp_config key, naming those not honoured."""
        options, config = self.data.get("fsdp"), self.get("fsdp_config", dict) or {}
        options = options.split() if isinstance(options, str) else self.get("fsdp", list) or []
        self.dist["engine"], self.origin["distributed.engine"] = ("fsdp", f"{given[0]}: {keys.FSDP_WHY}"), given[0]
        entries = [("fsdp", o, o, True) for o in options] + [("fsdp_config", str(n), str(n).removeprefix("fsdp_"), v) for n, v in config.items()]
        skipped: dict[str, list[str]] = {"fsdp": [], "fsdp_config": []}
        for key, spelt, name, value in entries:
            dotted, (honoured, why) = f"{key}.{spelt}", keys.FSDP_SETTINGS.get(name, ((), "unknown to this converter"))
            if name == "activation_checkpointing" and value is True:
                self.ft["gradient_checkpointing"], self.origin["finetune.gradient_checkpointing"] = (True, f"{dotted}: {keys.ACTIVATION_WHY}"), key
                self.sub(dotted, f"mapped to finetune.gradient_checkpointing = true ({keys.ACTIVATION_WHY})")
            elif honoured is not None and not (value is None or value in honoured or str(value).upper() in honoured):
                self.sub(dotted, f"ignored: {why}")
                skipped[key].append(spelt)
            else:
                self.sub(dotted, f"ignored: {why}" if honoured is None else "accepted: what the appliance does")
        for key in given:
            also = f"; not honoured: {', '.join(skipped[key])}" if skipped[key] else ""
            self.note(key, f'mapped to distributed.engine = "fsdp": {keys.FSDP_WHY}; {keys.NPROC_WHY}{also}')

    def remaining(self) -> None:
        for key, value in self.data.items():
            if key in self.notes:
                continue
            if key.startswith(keys.REMOTE_PREFIXES) or key in keys.REMOTE:
                sends = not _off(value) and value not in ("disabled", "offline")
                why = keys.HUB_WHY if "hub" in key else keys.LOG_WHY
                self.note(key, f"refused: {why}" if sends else "ignored: off (and nothing leaves the appliance either way)")
            elif key in keys.IGNORED:
                self.note(key, f"ignored: {keys.IGNORED[key]}")
            elif key in keys.REFUSED and _off(value):
                self.note(key, "accepted: off")
            elif key in keys.REFUSED:
                self.fail(key, f"{key}: {keys.REFUSED[key][0]}", keys.REFUSED[key][1])
            elif key == "special_tokens" and _off(value):
                self.note(key, "accepted: none")
            elif key == "special_tokens" and isinstance(value, dict) and set(value) == {"pad_token"}:
                self.note(key, "ignored: padding carries no loss and no attention, so the pad token does not change training")
            elif key == "special_tokens":
                self.refuse(key)
            else:
                self.note(key, "ignored: unknown to this converter")
