"""The recipe checks of ``appliance.recipe_checks`` for a fine-tuning recipe: against its base.

A ``[finetune]`` recipe's model is its base's, so what pre-training reads from ``[model]`` is
read here from the base's ``config.json`` — only that file: no weight is opened and nothing is
hashed (the base stage does that, and verifies the signature, when the run reaches it). The
parsing is ``pipeline.finetune.base``'s own, so the shape and the parameter count are the ones
the base stage will find. A base named ``model:DIGEST`` lives in the service's store, out of a
recipe's reach: the run's base stage checks it, and the summary says so.

The estimates are rough on purpose (the caching allocator, fragmentation and the libraries'
own buffers are not counted): they exist to refuse what cannot fit, and to say what would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.recipe_checks import (
    TRAIN_BYTES_PER_PARAM,
    Machine,
    _count,
    _gib,
    _on_gpu,
    _ranks,
    machine_summary,
    memory_budget,
    steps_problem,
)
from pipeline.errors import Problem

# NF4 packs a weight in 4 bits (0.5 byte); its block constants, double-quantised, add about
# 0.13 bit; rounded up for bitsandbytes' quantisation state. Only the linear layers are
# quantised: embeddings, norms and the output head stay in the base's dtype.
QLORA_BYTES_PER_PARAM = 0.55
# Values autograd keeps per token per layer for the backward pass, in units of hidden_size and
# intermediate_size: the norms' inputs and outputs, q/k/v and the attention output (SDPA keeps no
# score matrix), the projections' inputs, SwiGLU's gate, up and product, the LoRA branches' inputs.
ACT_HIDDEN_VALUES = 12
ACT_INTERMEDIATE_VALUES = 5
# The logits, upcast to fp32 for the loss, and their gradient: 8 bytes per token per vocabulary entry.
LOGIT_BYTES = 8
# Forward (2) and backward (2, the input gradients only) through frozen weights; the adapters'
# own work is a rounding error next to it. Training every weight adds the weight gradients: 6.
FROZEN_FLOPS_PER_PARAM = 4.0
FULL_FLOPS_PER_PARAM = 6.0
# The linear layers of a Llama/Qwen2/Mistral decoder layer, as finetune.target_modules names them.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class _Base:
    """A local base as its config.json describes it."""

    path: Path
    model_type: str
    model: Any  # pipeline.finetune.base.BaseModel of config.json alone: its shape and parameter_estimate()

    @property
    def config(self) -> str:
        return str(self.path / "config.json")


def _stored(recipe: Any) -> bool:
    from pipeline.finetune.stages import MODEL_REF

    return str(recipe.finetune.base).startswith(MODEL_REF)


def read_base(recipe: Any, recipe_dir: Path) -> tuple[_Base | None, list[Problem]]:
    """The recipe's local base from its config.json alone, or the problems that stop reading it."""
    from pipeline.finetune.base import BaseModel, _check_config, _read_json, _shape

    path = Path(recipe_dir) / recipe.finetune.base
    fix = "set finetune.base to a local folder in Hugging Face layout (config.json, *.safetensors, tokenizer files), relative to the recipe"
    try:
        # A recipe's string may hold what no path can (a NUL, a name too long): not a folder either.
        is_dir = path.is_dir()
        path = path.resolve() if is_dir else path
        has_config = is_dir and (path / "config.json").is_file()
    except (OSError, ValueError):
        is_dir = has_config = False
    if not is_dir:
        return None, [Problem("finetune.base", f"finetune.base = {recipe.finetune.base!r}: {path} does not exist or is not a folder", fix)]
    if not has_config:
        return None, [Problem("finetune.base", f"finetune.base: {path} has no config.json, so it is not a Hugging Face model folder", fix)]
    said: list[str] = []
    config = _read_json(path / "config.json", "config.json", said)
    model_type, architecture = _check_config(config, said) if config is not None else ("", "")
    shape = _shape(config, model_type, said) if config is not None else None
    if said or shape is None:
        return None, [
            Problem("finetune.base", f"finetune.base: {path}/{m}" if m.startswith("config.json") else f"finetune.base: {path}: {m}", fix) for m in said
        ]
    # Nothing is hashed here: the manifest and the weights' own count come from the base stage.
    model = BaseModel(
        path=path,
        model_type=model_type,
        architecture=architecture,
        shape=shape,
        weight_files=(),
        parameters=0,
        weight_bytes=0,
        tokenizer_files=(),
        has_chat_template=False,
        appliance_package=False,
        manifest=(),
        digest="",
    )
    return _Base(path=path, model_type=model_type, model=model), []


def trainable_parameters(fcfg: Any, base: _Base, method: str | None = None) -> int:
    """Parameters ``method`` (``fcfg``'s, unless given) trains: every one (full), or for LoRA ``(in + out) × r`` per targeted linear per layer."""
    s = base.model.shape
    if (method or fcfg.method) == "full":
        return int(base.model.parameter_estimate())
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    sizes = {
        "q_proj": s.hidden_size + q,
        "k_proj": s.hidden_size + kv,
        "v_proj": s.hidden_size + kv,
        "o_proj": q + s.hidden_size,
        "gate_proj": s.hidden_size + s.intermediate_size,
        "up_proj": s.hidden_size + s.intermediate_size,
        "down_proj": s.intermediate_size + s.hidden_size,
    }
    # peft matches a list of names by the module name's last part(s); "all-linear" is every linear but the head.
    names = set(LINEARS) if "all-linear" in fcfg.target_modules else {m.rsplit(".", 1)[-1] for m in fcfg.target_modules}
    return s.num_layers * fcfg.lora_r * sum(size for name, size in sizes.items() if name in names)


def _linear_parameters(base: _Base) -> int:
    s = base.model.shape
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    return s.num_layers * (s.hidden_size * (2 * q + 2 * kv) + 3 * s.hidden_size * s.intermediate_size)


def _dtype_bytes(recipe: Any, machine: Machine) -> int:
    """Bytes of the frozen base's (and the activations') dtype, as ``pipeline.finetune.train.base_dtype`` picks it."""
    precision = recipe.train.precision
    return 2 if precision == "bf16" or (precision == "auto" and _on_gpu(recipe, machine)) else 4


@dataclass(frozen=True)
class Estimate:
    """Bytes one training process holds, by what holds them."""

    weights: int
    trainable_state: int
    activations: int
    dtype: str
    processes: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable_state + self.activations


def estimate(recipe: Any, machine: Machine, base: _Base, method: str | None = None) -> Estimate:
    """Per-process memory of fine-tuning ``base`` with ``method`` (the recipe's, unless given)."""
    fcfg, train, s = recipe.finetune, recipe.train, base.model.shape
    method = method or fcfg.method
    size = _dtype_bytes(recipe, machine)
    params = int(base.model.parameter_estimate())
    act_size = size
    if method == "full":
        ranks = _ranks(recipe)
        shard = ranks if recipe.distributed.engine in ("fsdp", "deepspeed") else 1
        # As pre-training: fp32 weights, gradients and Adam's two moments, sharded or not.
        weights, state, processes, dtype = 0, math.ceil(TRAIN_BYTES_PER_PARAM * params / shard), ranks, "fp32"
    else:
        trainable = trainable_parameters(fcfg, base, method)
        if method == "qlora":
            linear = _linear_parameters(base)
            weights = math.ceil(linear * QLORA_BYTES_PER_PARAM + (params - linear) * size)
            act_size = {"float32": 4}.get(fcfg.bnb_4bit_compute_dtype, 2)
            dtype = f"NF4 ({fcfg.bnb_4bit_compute_dtype} compute)"
        else:
            weights, dtype = params * size, "bf16" if size == 2 else "fp32"
        # Adapters train in fp32 with AdamW: weights, gradients and two moments.
        state, processes = TRAIN_BYTES_PER_PARAM * trainable, 1
    tokens = int(train.batch_size) * int(train.seq_len)  # one micro-batch lives at a time
    per_layer = ACT_HIDDEN_VALUES * s.hidden_size + ACT_INTERMEDIATE_VALUES * s.intermediate_size
    # Recomputed in backward: only each layer's input is kept, and one layer's values at a time.
    kept = s.num_layers * s.hidden_size + per_layer if fcfg.gradient_checkpointing else s.num_layers * per_layer
    activations = tokens * (kept * act_size + s.vocab_size * LOGIT_BYTES)
    return Estimate(weights=weights, trainable_state=state, activations=activations, dtype=dtype, processes=processes)


def finetune_problems(recipe: Any, machine: Machine | None, recipe_dir: Path | None) -> list[Problem]:
    """Problems of a fine-tuning recipe against its local base (read from ``recipe_dir``) and ``machine``."""
    if recipe_dir is None or _stored(recipe):
        # Without the recipe's folder there is no base to read; a stored base is checked at run start.
        return []
    base, problems = read_base(recipe, recipe_dir)
    if base is None:
        return problems
    train, context = recipe.train, base.model.shape.max_positions
    if train.seq_len > context:
        problems.append(
            Problem(
                "train.seq_len",
                f"train.seq_len = {train.seq_len} is longer than the base model's context ({context} positions, {base.config})",
                f"set train.seq_len = {context} or less",
            )
        )
    if machine is not None:
        problems.extend(_machine_problems(recipe, machine, base))
    return problems


def _machine_problems(recipe: Any, machine: Machine, base: _Base) -> list[Problem]:
    fcfg, train, dist = recipe.finetune, recipe.train, recipe.distributed
    params = int(base.model.parameter_estimate())
    est = estimate(recipe, machine, base)
    full = fcfg.method == "full"
    have, what = memory_budget(recipe, machine, dist.nproc_per_node if full else 1)
    if est.total > have:
        if full:
            held = f"{_gib(est.trainable_state)} for fp32 weights, gradients and Adam state"
            sharded = dist.engine in ("fsdp", "deepspeed")
            more = "more GPUs (distributed.nproc_per_node)" if sharded else 'shard it over more GPUs with distributed.engine = "fsdp"'
            lora = estimate(recipe, machine, base, "lora").total
            fix = f'set finetune.method = "lora" (adapters on the frozen base: about {_gib(lora)}) or "qlora", choose a smaller base, or {more}'
        else:
            trainable = trainable_parameters(fcfg, base)
            held = f"{_gib(est.weights)} for the frozen base in {est.dtype}, {_gib(est.trainable_state)} for {_count(trainable)} adapter parameters with their Adam state"
            changes = []
            if fcfg.method == "lora":
                changes.append(f'set finetune.method = "qlora" (a 4-bit base: about {_gib(estimate(recipe, machine, base, "qlora").total)})')
            if not fcfg.gradient_checkpointing and est.activations > est.weights:
                changes.append("set finetune.gradient_checkpointing = true")
            changes.append("lower train.batch_size or train.seq_len (raise train.grad_accum to keep the batch)")
            changes.append("choose a smaller base")
            fix = ", ".join(changes[:-1]) + ", or " + changes[-1]
        return [
            Problem(
                "finetune.method",
                f'finetune.method = "{fcfg.method}" on the base {base.path} ({_count(params)} parameters, {base.config}) needs about {_gib(est.total)} per process: '
                f"{held}, {_gib(est.activations)} for activations at train.batch_size = {train.batch_size} × train.seq_len = {train.seq_len}; "
                f"more than the {_gib(have)} {what}",
                fix,
            )
        ]
    if full:
        slow = steps_problem(recipe, machine, params, FULL_FLOPS_PER_PARAM, _ranks(recipe), int(dist.nnodes))
    else:
        slow = steps_problem(recipe, machine, params, FROZEN_FLOPS_PER_PARAM, 1, 1)
    return [slow] if slow else []


def finetune_summary(recipe: Any, machine: Machine, recipe_dir: Path | None) -> dict[str, Any]:
    """``recipe_summary`` of a fine-tuning recipe: its base, method, trainable parameters and memory."""
    fcfg, train = recipe.finetune, recipe.train
    full = fcfg.method == "full"
    ranks = _ranks(recipe) if full else 1
    per_step = int(train.batch_size) * int(train.grad_accum) * int(train.seq_len) * ranks
    base = None
    if recipe_dir is not None and not _stored(recipe):
        base, _ = read_base(recipe, recipe_dir)
    ft: dict[str, Any] = {"base": fcfg.base, "base_dir": str(base.path) if base else None, "method": fcfg.method}
    if base is None:
        ft["not_read"] = (
            "held in the service's store: its shape is checked by the run's base stage"
            if _stored(recipe)
            else "not read (the recipe's folder was not given)"
            if recipe_dir is None
            else "not readable"
        )
    est = estimate(recipe, machine, base) if base else None
    params = int(base.model.parameter_estimate()) if base else None
    flops = (FULL_FLOPS_PER_PARAM if full else FROZEN_FLOPS_PER_PARAM) * params * per_step * int(train.steps) if params else None
    return {
        "finetune": ft,
        "parameters": params,
        "context": base.model.shape.max_positions if base else None,
        "vocab_size": base.model.shape.vocab_size if base else None,
        "model_type": base.model_type if base else None,
        "trainable_parameters": trainable_parameters(fcfg, base) if base else None,
        "memory_bytes_per_process": est.total if est else None,
        "processes": ranks,
        "tokens_per_step": per_step,
        "train_tokens": per_step * int(train.steps),
        "train_flops": int(flops) if flops is not None else None,
        "device": "gpu" if _on_gpu(recipe, machine) else "cpu",
        "machine": machine_summary(machine),
    }


def finetune_summary_text(s: dict[str, Any]) -> str:
    """One line of ``finetune_summary``'s dict."""
    ft = s["finetune"]
    tokens = f"{_count(s['tokens_per_step'])} tokens per step, {_count(s['train_tokens'])} in all"
    if s["parameters"] is None:
        return f"fine-tune base {ft['base']} ({ft['not_read']}) with {ft['method']}; {tokens}"
    return (
        f"fine-tune base {ft['base_dir']} ({s['model_type']}, {_count(s['parameters'])} parameters, vocabulary {s['vocab_size']}, context {s['context']}) "
        f"with {ft['method']}: about {_count(s['trainable_parameters'])} trainable parameters, about {_gib(s['memory_bytes_per_process'])} per process on {s['device']}, "
        f"{s['processes']} process(es); {tokens} ({s['train_flops']:.2g} FLOPs)"
    )
