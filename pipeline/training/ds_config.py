"""DeepSpeed JSON configs: read the file a user brings, refuse what the appliance does not run,
and fill the rest from the recipe so the two can never disagree silently.

Users arrive with the templates the DeepSpeed and Hugging Face docs publish (ZeRO-2, ZeRO-3 with
CPU offload, fp16 with a dynamic loss scale, ``"auto"`` placeholders). Those are accepted as
written; anything outside an explicit allow-list is a ConfigError naming the dotted key, because
DeepSpeed itself ignores or half-applies many keys and a typo would otherwise change nothing
without a word. The recipe owns the batch, the clipping, the optimizer and the schedule.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.training.config import TrainConfig

SUPPORTED_STAGES = (1, 2, 3)

# A schema maps a key to the kind of value it takes, or to the schema of a nested section.
# Kinds: "bool", "int" (an integral number; 1e9 as JSON writes it is fine), "num", "device".
Schema = dict[str, "str | Schema"]

_OFFLOAD_OPTIMIZER: Schema = {"device": "device", "pin_memory": "bool", "buffer_count": "int", "fast_init": "bool", "ratio": "num"}
_OFFLOAD_PARAM: Schema = {"device": "device", "pin_memory": "bool", "buffer_count": "int", "buffer_size": "int", "max_in_cpu": "int"}
_ZERO: Schema = {
    "stage": "int",
    "offload_optimizer": _OFFLOAD_OPTIMIZER,
    "offload_param": _OFFLOAD_PARAM,
    "overlap_comm": "bool",
    "contiguous_gradients": "bool",
    "reduce_scatter": "bool",
    "reduce_bucket_size": "int",
    "allgather_partitions": "bool",
    "allgather_bucket_size": "int",
    "round_robin_gradients": "bool",
    "sub_group_size": "int",
    "stage3_prefetch_bucket_size": "int",
    "stage3_param_persistence_threshold": "int",
    "stage3_max_live_parameters": "int",
    "stage3_max_reuse_distance": "int",
    "stage3_gather_16bit_weights_on_model_save": "bool",
    "gather_16bit_weights_on_model_save": "bool",
    # DeepSpeed's own field names, which it accepts beside the stage3_ spellings (Axolotl's
    # zero3 templates write them so); renamed to the stage3_ spelling once read.
    "max_live_parameters": "int",
    "max_reuse_distance": "int",
}
# Unprefixed name -> the stage3_ spelling the rest of the appliance reads.
_ZERO_ALIASES = {"max_live_parameters": "stage3_max_live_parameters", "max_reuse_distance": "stage3_max_reuse_distance"}
_FP16: Schema = {
    "enabled": "bool",
    "auto_cast": "bool",
    "loss_scale": "num",
    "initial_scale_power": "int",
    "loss_scale_window": "int",
    "hysteresis": "int",
    "consecutive_hysteresis": "bool",
    "min_loss_scale": "num",
}
_BF16: Schema = {"enabled": "bool"}
TOP_LEVEL: Schema = {
    "train_batch_size": "int",
    "train_micro_batch_size_per_gpu": "int",
    "gradient_accumulation_steps": "int",
    "gradient_clipping": "num",
    "steps_per_print": "int",
    "wall_clock_breakdown": "bool",
    "zero_allow_untested_optimizer": "bool",
    # Lets ZeRO-Offload step a torch optimizer on the CPU (the appliance passes torch AdamW).
    "zero_force_ds_cpu_optimizer": "bool",
    "zero_optimization": _ZERO,
    "fp16": _FP16,
    "bf16": _BF16,
}

# Where HF-style templates write "auto". The first five come from the recipe here; the three
# bucket sizes scale with the model's width, so resolve_model_autos fills them once the model exists.
AUTO_FROM_RECIPE = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "fp16.enabled", "bf16.enabled")
AUTO_FROM_MODEL = (
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)

_REFUSED = {
    "optimizer": 'the appliance passes its own torch AdamW (lr, betas and weight decay from the recipe\'s [train] table); delete the "optimizer" section',
    "scheduler": 'the appliance sets the learning rate every step from [train] schedule/lr/min_lr/warmup_steps; delete the "scheduler" section',
}


def load_deepspeed_config(path: Path, train: TrainConfig, world: int, device_type: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON and return the config DeepSpeed will run, resolved against the recipe.

    Substitutions made for the device (fp16 or offload on a CPU) are issued as warnings; call
    ``resolve_deepspeed_config`` to receive them as a list instead. Model-sized ``"auto"`` bucket
    sizes are left for ``resolve_model_autos``.
    """
    config, notes = resolve_deepspeed_config(read_json(path), train, world, device_type, source=str(path))
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return config


def read_json(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist", "fix [distributed] deepspeed_config (it is relative to the recipe)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"DeepSpeed config {path} cannot be read ({exc})", "point [distributed] deepspeed_config at a UTF-8 JSON file") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"DeepSpeed config {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "fix the JSON syntax (trailing commas and comments are not JSON)",
        ) from None
    if not isinstance(body, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object, got {type(body).__name__}", "write the config as { ... }")
    return body


def resolve_deepspeed_config(raw: Mapping[str, Any], train: TrainConfig, world: int, device_type: str, *, source: str) -> tuple[dict[str, Any], list[str]]:
    """(config for deepspeed.initialize, notes on substitutions). ``source`` names the file in errors."""
    for key, hint in _REFUSED.items():
        if key in raw:
            raise ConfigError(f"{source}: the '{key}' section is not supported", hint)
    cfg = _validated(raw, TOP_LEVEL, source, prefix="")
    notes: list[str] = []
    zero = cfg.get("zero_optimization")
    if not isinstance(zero, dict) or "stage" not in zero:
        raise ConfigError(
            f"{source}: 'zero_optimization.stage' is missing",
            f'set it to one of {", ".join(map(str, SUPPORTED_STAGES))} (engine = "ddp" is the unsharded choice)',
        )
    for alias, name in _ZERO_ALIASES.items():
        if alias in zero:
            if name in zero:
                raise ConfigError(
                    f"{source}: 'zero_optimization.{alias}' and 'zero_optimization.{name}' are the same setting, given twice",
                    f"keep one of them ({zero[alias]!r} or {zero[name]!r})",
                )
            zero[name] = zero.pop(alias)
    if zero["stage"] not in SUPPORTED_STAGES:
        raise ConfigError(
            f"{source}: 'zero_optimization.stage' is {zero['stage']}, not one of {', '.join(map(str, SUPPORTED_STAGES))}",
            'use 1, 2 or 3, or engine = "ddp" for no sharding',
        )
    _fill_from_recipe(cfg, train, world, source)
    _resolve_precision(cfg, train, device_type, source, notes)
    _resolve_offload(zero, device_type, source, notes, cfg)
    return cfg, notes


def resolve_model_autos(config: Mapping[str, Any], hidden_size: int) -> dict[str, Any]:
    """Fill the bucket sizes HF templates leave as ``"auto"`` with HF's rule for a model of this width."""
    out = copy.deepcopy(dict(config))
    zero = out.get("zero_optimization", {})
    rule = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in rule.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return out


def _validated(section: Mapping[str, Any], schema: Schema, source: str, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in section.items():
        dotted = f"{prefix}{key}"
        kind = schema.get(key)
        if kind is None:
            where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
            raise ConfigError(f"{source}: unknown or unsupported key '{dotted}'", f"remove it; supported {where}: {', '.join(sorted(schema))}")
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be an object, got {value!r}", f'write it as "{key}": {{ ... }}')
            out[key] = _validated(value, kind, source, prefix=f"{dotted}.")
        elif value == "auto":
            if dotted not in AUTO_FROM_RECIPE + AUTO_FROM_MODEL:
                raise ConfigError(
                    f"{source}: '{dotted}' cannot be \"auto\"", f'give it a value; "auto" is understood for {", ".join(AUTO_FROM_RECIPE + AUTO_FROM_MODEL)}'
                )
            out[key] = value
        else:
            out[key] = _typed(value, kind, dotted, source)
    return out


def _typed(value: Any, kind: str, dotted: str, source: str) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{dotted}' must be true or false, got {value!r}", f"set {dotted} to true or false")
    if kind == "device":
        if value in ("cpu", "none"):
            return value
        raise ConfigError(
            f'{source}: \'{dotted}\' is {value!r}; only "cpu" and "none" are supported',
            'NVMe offload needs the async_io op, which the appliance does not build: offload to "cpu"',
        )
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if kind == "num" and numeric:
        return value
    # JSON templates write sizes as 1e9, which Python reads as a float.
    if kind == "int" and numeric and float(value).is_integer():
        return int(value)
    noun = "a whole number" if kind == "int" else "a number"
    raise ConfigError(f"{source}: '{dotted}' must be {noun} >= 0, got {value!r}", f"set {dotted} to {noun}")


def _fill_from_recipe(cfg: dict[str, Any], train: TrainConfig, world: int, source: str) -> None:
    wanted = {
        "train_micro_batch_size_per_gpu": (train.batch_size, f"train.batch_size = {train.batch_size}"),
        "gradient_accumulation_steps": (train.grad_accum, f"train.grad_accum = {train.grad_accum}"),
        "train_batch_size": (
            train.batch_size * train.grad_accum * world,
            f"train.batch_size × train.grad_accum × ranks = {train.batch_size} × {train.grad_accum} × {world} = {train.batch_size * train.grad_accum * world}",
        ),
        "gradient_clipping": (train.grad_clip, f"train.grad_clip = {train.grad_clip}"),
    }
    for key, (value, recipe) in wanted.items():
        given = cfg.get(key, "auto")
        if given != "auto" and not math.isclose(given, value, rel_tol=1e-9, abs_tol=1e-12):
            raise ConfigError(
                f"{source}: {key} = {given} but the recipe has {recipe}", f'make them agree, or write "{key}": "auto" to take the recipe\'s value'
            )
        cfg[key] = value


def _resolve_precision(cfg: dict[str, Any], train: TrainConfig, device_type: str, source: str, notes: list[str]) -> None:
    # DeepSpeed owns precision here (it casts the module and keeps fp32 master weights), so the
    # engine adds no autocast of its own; the recipe's train.precision only fills "auto" and
    # must not contradict an explicit choice in the JSON.
    fp16 = cfg.setdefault("fp16", {})
    bf16 = cfg.setdefault("bf16", {})
    recipe_bf16 = train.precision == "bf16" or (train.precision == "auto" and device_type == "cuda")
    # The recipe has no fp16 setting, so "auto" there means off (as HF resolves it without --fp16).
    fp16_on = fp16.get("enabled", False) is True
    bf16_given = bf16.get("enabled", "auto")
    bf16_on = recipe_bf16 if bf16_given == "auto" and not fp16_on else bf16_given is True
    if fp16_on and bf16_on:
        raise ConfigError(f"{source}: fp16.enabled and bf16.enabled are both true", "enable at most one of them")
    if train.precision == "fp32" and (fp16_on or bf16_on):
        raise ConfigError(
            f'{source}: {"fp16" if fp16_on else "bf16"}.enabled = true but the recipe has train.precision = "fp32"',
            'make them agree: set train.precision = "bf16"/"auto", or disable it in the JSON',
        )
    if train.precision == "bf16" and not bf16_on:
        raise ConfigError(
            f'{source}: the JSON {"enables fp16" if fp16_on else "sets bf16.enabled = false"} but the recipe has train.precision = "bf16"',
            'make them agree: set bf16.enabled to true or "auto", or change train.precision',
        )
    if fp16_on and device_type == "cpu":
        # DeepSpeed's CPU accelerator has no fp16 kernels on most CPUs (it asks oneDNN, which says no
        # on this class of machine), and fp16 exists to halve GPU memory, which a CPU run does not
        # need. fp32 rather than bf16: bf16 would change the numerics more than the user asked for.
        fp16_on = False
        notes.append(f"{source}: fp16 is not supported by DeepSpeed on a CPU; training in fp32 instead (weights and optimizer state are fp32 either way)")
    fp16["enabled"] = fp16_on
    bf16["enabled"] = bf16_on
    if not fp16_on:
        # Loss-scale settings only mean something with fp16 on; keep the section minimal.
        cfg["fp16"] = {"enabled": False}


def _resolve_offload(zero: dict[str, Any], device_type: str, source: str, notes: list[str], cfg: dict[str, Any]) -> None:
    if zero.get("offload_param", {}).get("device", "none") != "none" and zero["stage"] != 3:
        raise ConfigError(
            f"{source}: zero_optimization.offload_param needs stage 3, got stage {zero['stage']}",
            "use stage 3, or offload only the optimizer (offload_optimizer)",
        )
    offloaded = [k for k in ("offload_optimizer", "offload_param") if zero.get(k, {}).get("device", "none") != "none"]
    if device_type == "cpu":
        # Offloading to the CPU from the CPU moves nothing; DeepSpeed would still demand its
        # compiled CPU Adam and pinned buffers, so the sections are dropped instead.
        for key in ("offload_optimizer", "offload_param"):
            zero.pop(key, None)
        if offloaded:
            notes.append(f"{source}: {' and '.join(offloaded)} to cpu is a no-op when training on the CPU; ignored")
        return
    if "offload_optimizer" in offloaded:
        # The torch AdamW then steps on the CPU copies; DeepSpeed refuses that unless told, to
        # steer users to its compiled CPU Adam, which the appliance does not build.
        cfg["zero_force_ds_cpu_optimizer"] = False
        notes.append(f"{source}: offload_optimizer runs the appliance's torch AdamW on the CPU (slower than DeepSpeed's compiled CPU Adam, which is not built)")
