"""The ``[finetune]`` recipe table: adapt a local base model (LoRA, QLoRA or full) to examples.

A recipe with ``[finetune]`` does not pre-train: it imports and verifies a base model held on
disk in Hugging Face layout, renders its example files with the base's own tokenizer (and chat
template), trains with the ``[train]`` table's steps, batch and schedule, and packages the
adapter (and, with ``merge``, the merged model). Torch-, transformers- and peft-free, so a
recipe is checked before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import check

Method = Literal["lora", "qlora", "full"]
Format = Literal["completion", "alpaca", "chat", "tools", "input_output"]
OnError = Literal["fail", "skip"]

# The attention and MLP projections of Llama/Qwen/Mistral-style models: what the QLoRA paper
# found worth adapting ("all linear layers" matched full fine-tuning quality).
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(kw_only=True)
class DatasetConfig:
    # A JSONL (.jsonl, .jsonl.gz), Parquet or CSV file, relative to the recipe.
    path: str
    # completion: one text per record (field). alpaca: instruction / input / output.
    # chat: a list of {role, content} messages (field_messages), rendered with the base's chat
    # template. tools: chat with tool definitions (field_tools), assistant tool_calls and "tool"
    # results, as in the OpenAI and LLaMA-Factory formats. input_output: Axolotl's segments
    # ({"segments": [{"text", "label"}]}), each trained on or not by its label.
    format: Format = "completion"
    # completion: the text column.
    field: str = "text"
    # chat / tools: the messages column, and the tool definitions column (tools only).
    field_messages: str = "messages"
    field_tools: str = "tools"
    # alpaca: the three columns.
    field_instruction: str = "instruction"
    field_input: str = "input"
    field_output: str = "output"
    # train: examples to learn from. val: held out for validation loss (a run needs one, or a
    # val_fraction below, so that a loss on unseen examples is always measured).
    split: Literal["train", "val"] = "train"

    def __post_init__(self) -> None:
        check(bool(self.path.strip()), "path must name a JSONL, Parquet or CSV file")
        for name in ("field", "field_messages", "field_tools", "field_instruction", "field_input", "field_output"):
            check(bool(getattr(self, name)), f"{name} must not be empty")


@dataclass(kw_only=True)
class GateConfig:
    # A JSONL file of {"prompt": ..., "reference": ...} pairs, relative to the recipe; "" = no
    # task scores (loss and perplexity are measured either way).
    task_file: str = ""
    # Minimum scores for the tuned model to be promoted (packaged); 0 = no minimum. Exact match
    # is a fraction in [0, 1]; BLEU and chrF are sacrebleu's 0-100 scores.
    min_exact_match: float = 0.0
    min_bleu: float = 0.0
    min_chrf: float = 0.0
    # Largest validation loss a promoted model may have; 0 = no maximum.
    max_val_loss: float = 0.0
    # Tokens generated per task prompt, greedy, for the scores and the base-vs-tuned report.
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        check(0.0 <= self.min_exact_match <= 1.0, f"min_exact_match must be in [0, 1] (a fraction), got {self.min_exact_match}")
        check(0.0 <= self.min_bleu <= 100.0, f"min_bleu must be in [0, 100] (sacrebleu's scale), got {self.min_bleu}")
        check(0.0 <= self.min_chrf <= 100.0, f"min_chrf must be in [0, 100] (sacrebleu's scale), got {self.min_chrf}")
        check(self.max_val_loss >= 0.0, f"max_val_loss must be >= 0 (0 = no maximum), got {self.max_val_loss}")
        check(0 < self.max_new_tokens <= 4096, f"max_new_tokens must be between 1 and 4096, got {self.max_new_tokens}")


@dataclass(kw_only=True)
class FinetuneConfig:
    # The base model: a local directory in Hugging Face layout (config.json, *.safetensors,
    # tokenizer files), relative to the recipe, or "model:DIGEST" (a prefix will do) for a model
    # this appliance packaged and holds in its store. Never a hub id.
    base: str
    # A base is verified before use: a model-signing bundle (base_signature, default
    # <base>/model.sig) by key (base_public_key, a PEM) or keyless (a sigstore bundle checked
    # offline against the trust root inside sigstore, for base_identity / base_issuer).
    base_signature: str = ""
    base_public_key: str = ""
    base_identity: str = ""
    base_issuer: str = ""
    # An unsigned or unverifiable base is refused unless this says otherwise; the choice is
    # recorded in the ledger with the base's digests.
    allow_unsigned_base: bool = False
    # lora: adapters on a frozen base (peft). qlora: the same on a 4-bit NF4 base (bitsandbytes).
    # full: every weight, through the pre-training loop's engines (DDP, FSDP2, DeepSpeed).
    method: Method = "lora"
    # LoRA rank and scale (alpha / r); 8 / 16 as in the QLoRA paper's small settings.
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # Module names to adapt, or ["all-linear"] for every linear layer but the output head.
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # QLoRA: NF4 with double quantisation and bf16 compute (the QLoRA paper's recipe).
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Recompute activations in backward: long sequences on a small device.
    gradient_checkpointing: bool = False
    # Loss on the responses only (prompt tokens weigh 0); true trains on the whole example.
    train_on_inputs: bool = False
    # chat / tools: whose turns carry loss.
    roles_to_train: list[str] = field(default_factory=lambda: ["assistant"])
    # Pack short examples into train.seq_len windows, with position ids restarting per example
    # and no attention across examples; false pads each example to its own length.
    packing: bool = True
    # A chat template (Jinja) for a base without one; "" = the base tokenizer's own, else the
    # appliance's documented default.
    chat_template: str = ""
    # Examples to learn from and (split = "val") to validate on.
    datasets: list[DatasetConfig] = field(default_factory=list)
    # With no split = "val" dataset: hold out this share of the training examples (by hash).
    val_fraction: float = 0.05
    # A malformed example: stop naming file, line and field (fail) or skip it, counted and recorded.
    on_error: OnError = "fail"
    # Also write the merged model (base + adapter), packaged and signed like a pre-trained one.
    merge: bool = False
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        check(bool(self.base.strip()), "base must name a local model directory (Hugging Face layout)")
        check("://" not in self.base, f"base {self.base!r} is a URL: the appliance never downloads; give a local directory")
        check(self.lora_r > 0, f"lora_r must be positive, got {self.lora_r}")
        check(self.lora_alpha > 0, f"lora_alpha must be positive, got {self.lora_alpha}")
        check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(len(self.target_modules) > 0, 'target_modules must name modules, e.g. ["q_proj", "v_proj"], or ["all-linear"]')
        check(all(m.strip() for m in self.target_modules), "target_modules must not contain empty names")
        check(len(self.roles_to_train) > 0, 'roles_to_train must name at least one role, e.g. ["assistant"]')
        check(len(self.datasets) > 0, 'datasets must list at least one [[finetune.datasets]] table with path = "train.jsonl"')
        check(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}")
