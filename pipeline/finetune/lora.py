"""LoRA and QLoRA over a local Hugging Face base, through peft; and merging an adapter into its base.

``LoraSpec`` (a ``spec.ModelSpec``) loads the base with transformers (never downloading:
``local_files_only=True``), for QLoRA as 4-bit NF4/FP4 ``Linear4bit`` layers (bitsandbytes,
which runs on CPU too), freezes it and wraps it with peft LoRA adapters on
``finetune.target_modules``. Only the adapters train; ``export`` writes them as a peft adapter
directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained(base, dir)`` loads. ``merge_and_export`` folds an adapter into
the full-precision base and writes an ordinary model directory with the base's tokenizer.

QLoRA and merging: the adapters were trained against the 4-bit base, but are merged into the
original full-precision weights (as the QLoRA authors and peft do), so the merged model's
logits are those of base + adapter, close to but not equal to the quantised model's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keys.files import publish_dir
from pipeline.errors import ConfigError, TrainingError
from pipeline.finetune.spec import ModelSpec, qlora_available
from pipeline.settings.finetune import FinetuneConfig

__all__ = ["LoraSpec", "TOKENIZER_FILES", "merge_and_export"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The files that make up a Hugging Face tokenizer (and its chat template and generation
# defaults), copied byte for byte from the base into a merged model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {', '.join(_DTYPES)}", "use float32 on CPU, bfloat16 on a GPU")
    return _DTYPES[name]


class LoraSpec(ModelSpec):
    """LoRA (``fcfg.method = "lora"``) or QLoRA (``"qlora"``) adapters on the base at ``base_dir``."""

    def __init__(self, base_dir: Path, fcfg: FinetuneConfig, *, dtype: str = "float32") -> None:
        if fcfg.method not in ("lora", "qlora"):
            raise ConfigError(f'LoraSpec trains method "lora" or "qlora", not {fcfg.method!r}', 'set finetune.method = "lora" or "qlora"')
        self.base_dir = Path(base_dir)
        self.fcfg = fcfg
        self.dtype = _dtype(dtype)
        self.model: nn.Module | None = None

    def describe(self) -> dict[str, Any]:
        f = self.fcfg
        return {
            "method": f.method,
            "lora_r": f.lora_r,
            "lora_alpha": f.lora_alpha,
            "target_modules": list(f.target_modules),
            "bnb_4bit_quant_type": f.bnb_4bit_quant_type if f.method == "qlora" else None,
        }

    def build(self, device: torch.device) -> nn.Module:
        import peft  # ~5 s: only a fine-tuning job pays for it
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        device = torch.device(device)
        f = self.fcfg
        qlora = f.method == "qlora"
        if qlora:
            qlora_available(str(device))  # a clear ConfigError before the base is loaded
        _require_base(self.base_dir)
        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": self.dtype}
        if qlora:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=f.bnb_4bit_quant_type,
                bnb_4bit_use_double_quant=f.bnb_4bit_use_double_quant,
                bnb_4bit_compute_dtype=_dtype(f.bnb_4bit_compute_dtype),
            )
            # Quantisation happens while loading, on the device the layers land on.
            kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
        model: Any = AutoModelForCausalLM.from_pretrained(self.base_dir, **kwargs)
        if not qlora:
            model = model.to(device)
        model.config.use_cache = False  # a KV cache is for generation; training only wastes memory on it
        gc_kwargs = {"use_reentrant": False}
        if qlora:
            # Freezes the base, upcasts the norms to fp32 and makes the inputs require grad. It runs
            # no forward pass, so it does not set off the no_grad trap (LIBRARY-NOTES); the trainer
            # still checks after its first backward that every adapter got a gradient.
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=f.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs)
        elif f.gradient_checkpointing:
            # Non-reentrant checkpointing: the reentrant kind gives no grads to the adapters of a
            # frozen base unless the inputs are made to require grad.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
        targets: str | list[str] = "all-linear" if list(f.target_modules) == ["all-linear"] else list(f.target_modules)
        lora_cfg = peft.LoraConfig(r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
        try:
            model = peft.get_peft_model(model, lora_cfg)
        except ValueError as exc:  # peft's "Target modules {...} not found in the base model"
            raise ConfigError(
                f"finetune.target_modules {f.target_modules} do not match the base at {self.base_dir}: {exc}",
                'name modules of this architecture (e.g. ["q_proj", "v_proj"]) or use ["all-linear"]',
            ) from None
        model.train()
        self.model = model
        return model

    def _built(self) -> nn.Module:
        if self.model is None:
            raise TrainingError("the LoRA model is used before build()", "call spec.build(device) first")
        return self.model

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self._built().named_parameters() if p.requires_grad]

    def state_dict_trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.trainable_parameters()}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.trainable_parameters())
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model does not train"
            raise TrainingError(
                f"the saved adapter weights do not fit this model: the state {what}",
                "resume with the finetune settings (method, lora_r, target_modules) that wrote the checkpoint, or start in a fresh output directory",
            )
        with torch.no_grad():
            for name, p in params.items():
                if state[name].shape != p.shape:
                    raise TrainingError(
                        f"saved adapter weight {name} has shape {tuple(state[name].shape)}, the model's is {tuple(p.shape)}",
                        "resume with the lora_r the checkpoint was trained with, or start in a fresh output directory",
                    )
                p.copy_(state[name].to(p.device, p.dtype))

    def export(self, out_dir: Path) -> list[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._built().save_pretrained(out_dir, safe_serialization=True)  # type: ignore[operator]
        return sorted(p for p in out_dir.rglob("*") if p.is_file())


def _require_base(base_dir: Path) -> None:
    if not (base_dir / "config.json").is_file():
        raise ConfigError(
            f"{base_dir} is not a Hugging Face model directory (no config.json)", "point finetune.base at the directory holding config.json and *.safetensors"
        )


def merge_and_export(base_dir: Path, adapter_dir: Path, out_dir: Path) -> list[Path]:
    """Fold the peft adapter at ``adapter_dir`` into the base at ``base_dir`` and write the merged model to ``out_dir``.

    Merged in float32 and saved in the base's own dtype, as safetensors, with the base's
    tokenizer files copied unchanged; written beside ``out_dir`` and renamed into place, so
    ``out_dir`` is either absent or complete. Returns the files written.
    """
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    _require_base(base_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir} is not a peft adapter directory (no adapter_config.json)", "point at the adapter a fine-tuning run exported")
    saved_dtype = getattr(AutoConfig.from_pretrained(base_dir, local_files_only=True), "dtype", None) or torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).merge_and_unload()
    if isinstance(saved_dtype, torch.dtype) and saved_dtype != torch.float32:
        merged = merged.to(saved_dtype)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, tmp / name)
    publish_dir(tmp, out_dir, replace=True)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())
