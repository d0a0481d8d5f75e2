"""Full fine-tuning: every weight of a local Hugging Face base trains, through the pre-training engines.

``FullSpec`` (a ``spec.ModelSpec``) loads the base in float32 (the optimizer's master weights;
bf16 compute comes from the engine's autocast or FSDP's mixed-precision policy, never from
bf16 weights that AdamW would round away), makes every parameter trainable and turns on
transformers' gradient checkpointing when asked. The trainer (``train.train_adapter``) wraps
it in one of ``pipeline.training``'s engines (one process, DDP, FSDP2 or DeepSpeed ZeRO), which
own gradient sync, sharding and the checkpoint format, as they do for pre-training.

``write_model_dir`` writes the result as an ordinary model directory: the gathered full
weights as safetensors, the base's config (in float32) and its tokenizer files byte for byte,
so ``AutoModelForCausalLM.from_pretrained`` loads it like the base.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import TrainingError
from pipeline.finetune.lora import TOKENIZER_FILES, _require_base
from pipeline.finetune.spec import ModelSpec
from pipeline.settings.finetune import FinetuneConfig

__all__ = ["FullSpec", "write_model_dir", "WEIGHTS_FILE"]

WEIGHTS_FILE = "model.safetensors"


class FullSpec(ModelSpec):
    """Every parameter of the base at ``base_dir`` trains (``finetune.method = "full"``)."""

    def __init__(self, base_dir: Path, fcfg: FinetuneConfig) -> None:
        self.base_dir = Path(base_dir)
        self.fcfg = fcfg
        self.model: nn.Module | None = None

    def describe(self) -> dict[str, Any]:
        return {"method": "full", "gradient_checkpointing": self.fcfg.gradient_checkpointing}

    def build(self, device: torch.device) -> nn.Module:
        from transformers import AutoModelForCausalLM

        _require_base(self.base_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(self.base_dir, local_files_only=True, dtype=torch.float32)
        model.config.use_cache = False  # a KV cache is for generation; training only wastes memory on it
        if self.fcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for p in model.parameters():
            p.requires_grad_(True)
        model = model.to(device)
        model.train()
        self.model = model
        return model

    def _built(self) -> nn.Module:
        if self.model is None:
            raise TrainingError("the model is used before build()", "call spec.build(device) first")
        return self.model

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        # named_parameters yields a tied lm_head once (as the embedding), as safetensors needs.
        return list(self._built().named_parameters())

    def state_dict_trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.trainable_parameters()}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.trainable_parameters())
        if set(params) != set(state):
            raise TrainingError("the saved weights are not this model's", "resume with the base model that wrote the checkpoint")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(p.device, p.dtype))

    def export(self, out_dir: Path) -> list[Path]:
        return write_model_dir(Path(out_dir), self.state_dict_trainable(), self._built(), self.base_dir)


def write_model_dir(out_dir: Path, weights: dict[str, torch.Tensor] | None, model: nn.Module, base_dir: Path) -> list[Path]:
    """The fine-tuned model as a Hugging Face directory: weights, config, the base's tokenizer files."""
    from safetensors.torch import save_file

    if weights is None:
        raise TrainingError("rank 0 has no full weights to write", "report this: the engine did not gather its weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    config: Any = getattr(model, "config", None)
    if config is None:
        raise TrainingError(f"{type(model).__name__} has no transformers config to save", "report this: full fine-tuning needs a transformers model")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    body = {k: v.detach().float().cpu().contiguous() for k, v in weights.items() if not (tied and k == "lm_head.weight")}
    # "format": "pt" is what transformers looks for in the safetensors metadata.
    save_file(body, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    config.dtype = torch.float32
    config.use_cache = True  # the saved model is for generation
    config.save_pretrained(out_dir)
    config.use_cache = False
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out_dir / name)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())
