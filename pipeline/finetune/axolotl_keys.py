"""What each Axolotl setting becomes: the tables and wording that ``pipeline.finetune.axolotl`` reads.

Data only; the converter holds the logic. A key found in none of these tables and not handled by
the converter itself is noted "ignored: unknown to this converter".

A refusal in ``REFUSALS`` is a ``(message, fix)`` pair of ``str.format`` templates: ``{key}`` is
the Axolotl key the problem is filed under, ``{source}`` the YAML file, and the other fields are
the values the converter passes (already shortened where they come from the config).
"""

from __future__ import annotations

from typing import Any

# Axolotl's dataset ``type`` -> the recipe's dataset ``format``.
FORMATS = {"completion": "completion", "alpaca": "alpaca", "chat_template": "chat", "input_output": "input_output"}

# Axolotl's chatml template (src/axolotl/utils/chat_templates), in its plain form.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The words for a wrong type, in "KEY must be ..., got VALUE".
TYPE_WORDS: dict[type, str] = {int: "a whole number", float: "a finite number", bool: "true or false", str: "text", list: "a list of names", dict: "a mapping"}

# -- the model and the adapter ------------------------------------------------------------------

# Keys naming a class, and the endings a causal LM's class (or its tokenizer's) has.
CAUSAL_CLASSES = (("model_type", ("ForCausalLM",)), ("tokenizer_type", ("Tokenizer", "TokenizerFast")))
UNSIGNED_WHY = "it has no model.sig, and the run refuses an unsigned base unless finetune.allow_unsigned_base = true"
METHOD_WHY = {"qlora": "LoRA on a 4-bit NF4 base", "lora": "LoRA on the base as stored", "full": "no adapter: every weight trains"}
# bnb_config_kwargs the recipe holds (for QLoRA); llm_int8_has_fp16_weight is accepted and unused.
BNB_KWARGS = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear")

# -- the optimizer and the schedule ---------------------------------------------------------------

# The same AdamW update with fp32 states in torch's implementation.
OPTIMIZERS_ADAMW = {"adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw", "adamw_apex_fused", "optimi_adamw"}
# AdamW with compressed or paged states: the appliance keeps fp32 states (see the converter's docstring).
OPTIMIZERS_COMPACT = {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch_4bit", "ao_adamw_8bit", "adamw_anyprecision"}
COMPACT_WHY = (
    "the appliance uses torch AdamW with fp32 states, which a checkpoint holds exactly so a resumed run "
    "continues bit for bit; an adapter's states are small anyway (LoRA trains well under 1 % of the weights)"
)
# Values Axolotl leaves to the Hugging Face Trainer: (train key, Axolotl key, the Trainer's default).
TRAINER_DEFAULTS = (("weight_decay", "weight_decay", 0.0), ("beta1", "adam_beta1", 0.9), ("beta2", "adam_beta2", 0.999), ("grad_clip", "max_grad_norm", 1.0))
# Axolotl's step counts -> the train keys; a value below 1 is a fraction of the run's steps.
STEP_KEYS = (("save_steps", "checkpoint_every"), ("eval_steps", "eval_every"), ("logging_steps", "log_every"))
# Axolotl's *_strategy keys: accepted when "steps", else ignored for this reason.
STRATEGIES = {
    "save_strategy": "a checkpoint is saved every train.checkpoint_every steps, so a run can resume",
    "eval_strategy": "validation loss is measured every train.eval_every steps and at the end",
    "evaluation_strategy": "validation loss is measured every train.eval_every steps and at the end",
}
VAL_WHY = "a validation loss is always measured here, so 5 % of the training examples are held out; Axolotl held out none"

# -- remote services: noted, never honoured -------------------------------------------------------

LOG_WHY = "nothing leaves the appliance; training metrics go to TensorBoard event files in the run"
HUB_WHY = "nothing leaves the appliance; the tuned model is packaged and signed in its home (`appliance model export` copies it out)"
REMOTE_PREFIXES = ("wandb_", "mlflow_", "comet_")
# Besides every key starting with one of REMOTE_PREFIXES.
REMOTE = {
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

# -- ignored whatever their value -----------------------------------------------------------------

# Machinery, or a choice the appliance makes itself; training learns the same.
IGNORED = {
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
    **dict.fromkeys(
        "resume_from_checkpoint auto_resume_from_checkpoints".split(),
        "a new run starts from the base; continue a stopped appliance run with `appliance resume RUN`",
    ),
    **dict.fromkeys("saves_per_epoch evals_per_epoch".split(), "the appliance counts steps: train.checkpoint_every and train.eval_every"),
    **dict.fromkeys("loss_watchdog_threshold loss_watchdog_patience".split(), "the appliance stops a run whose loss diverges by itself"),
    **dict.fromkeys(
        "eval_table_size eval_causal_lm_metrics do_causal_lm_eval do_bench_eval bench_dataset bench_split".split(),
        "the appliance scores exact match, BLEU and chrF on the prompts of [finetune.gate] task_file",
    ),
    **dict.fromkeys(
        "eval_sample_packing sample_packing_eff_est total_num_tokens sample_packing_group_size sample_packing_bin_size sample_pack_sequentially "
        "batch_flattening".split(),
        "packing details; finetune.packing decides",
    ),
    **dict.fromkeys(
        "flash_attention sdp_attention xformers_attention flash_attn_cross_entropy flash_attn_rms_norm flash_attn_fuse_qkv flash_attn_fuse_mlp "
        "flash_optimum lora_mlp_kernel lora_qkv_kernel lora_o_kernel liger_rope liger_rms_norm liger_glu_activation liger_layer_norm "
        "liger_fused_linear_cross_entropy cut_cross_entropy torch_compile torch_compile_backend".split(),
        "a kernel choice: the appliance picks its kernels, and the maths is the same",
    ),
    "fsdp_version": "the appliance runs FSDP2 (fully_shard) whenever fsdp or fsdp_config is set",
    "plugins": "no plugin code runs; Axolotl's plugins swap kernels, which the appliance picks itself",
    **dict.fromkeys(
        "device_map max_memory gpu_memory_limit low_cpu_mem_usage lora_on_cpu ddp_timeout ddp_bucket_cap_mb "
        "ddp_broadcast_buffers ddp_find_unused_parameters sequence_parallel_degree heads_k_stride ring_attn_func tensor_parallel_size "
        "context_parallel_size local_rank world_size".split(),
        "the appliance places the run on its devices ([distributed])",
    ),
    **dict.fromkeys(
        "dataset_processes dataset_num_proc dataset_keep_in_memory dataloader_num_workers dataloader_pin_memory dataloader_prefetch_factor "
        "dataloader_drop_last remove_unused_columns skip_prepare_dataset torchdistx_path include_tokens_per_second profiler_steps gc_steps".split(),
        "loading and profiling machinery",
    ),
    **dict.fromkeys("shuffle_merged_datasets shuffle_before_merging_datasets".split(), "the appliance shuffles the training examples with train.seed"),
    **dict.fromkeys(
        "is_llama_derived_model is_mistral_derived_model is_qwen_derived_model is_falcon_derived_model".split(), "the base's config.json names its architecture"
    ),
    **dict.fromkeys("revision_of_model base_model_ignore_patterns".split(), "a local directory holds one version of one model"),
    **dict.fromkeys("tokenizer_use_fast tokenizer_legacy".split(), "the base's tokenizer is loaded as its files describe"),
    **dict.fromkeys(
        "resize_token_embeddings_to_32x shrink_embeddings mean_resizing_embeddings embeddings_skip_upcast".split(),
        "no tokens are added, so embeddings keep their size",
    ),
    **dict.fromkeys("strict debug debug_num_examples".split(), "Axolotl's own checks and logging"),
}

# -- where a full fine-tune runs: [distributed] --------------------------------------------------

# The keys that choose an engine (DeepSpeed ZeRO from a JSON, or FSDP2), in the order they are read.
ENGINE_KEYS = ("deepspeed", "fsdp", "fsdp_config")
FSDP_WHY = "the appliance shards one group per decoder layer (FSDP2 fully_shard)"
ACTIVATION_WHY = "FSDP's activation checkpointing recomputes each layer in backward"
# Axolotl takes the process count from its launcher (accelerate launch, torchrun), never from the YAML.
NPROC_WHY = "one process until [distributed] nproc_per_node is set to the GPUs per node"
NPROC_COMMENT = "# nproc_per_node = 8  # one process per GPU: Axolotl took the count from its launcher (accelerate launch, torchrun)"
_FULL_SHARD = "the appliance always shards fully (FULL_SHARD: parameters, gradients and optimizer state)"
_OFFLOAD = "offload is not supported under FSDP here; to offload, use DeepSpeed ZeRO-3 with offload (deepspeed: a ZeRO-3 JSON with offload_param)"
_BY_LAYER = "the appliance wraps each decoder layer, not by size"
# The options of Axolotl's fsdp list and the keys of its fsdp_config (read without their fsdp_
# prefix: Axolotl takes both spellings): the values that are what the appliance does, and why
# another value is not honoured. None: noted as ignored whatever the value (it changes neither
# what trains nor how it is sharded). An fsdp option counts as the value true.
FSDP_SETTINGS: dict[str, tuple[tuple[Any, ...] | None, str]] = {
    "full_shard": ((True,), ""),
    "auto_wrap": ((True,), ""),
    "offload": ((), _OFFLOAD),
    **dict.fromkeys("shard_grad_op hybrid_shard hybrid_shard_zero2 no_shard".split(), ((), _FULL_SHARD)),
    "version": ((2, "2"), "the appliance runs FSDP2 (fully_shard)"),
    "offload_params": ((False,), _OFFLOAD),
    "sharding_strategy": (("FULL_SHARD", "1"), _FULL_SHARD),
    "reshard_after_forward": ((True,), "parameters are resharded after each forward (FULL_SHARD)"),
    "auto_wrap_policy": (("TRANSFORMER_BASED_WRAP",), _BY_LAYER),
    "min_num_params": ((), _BY_LAYER),
    # true: mapped to finetune.gradient_checkpointing by the converter.
    "activation_checkpointing": ((False,), "give true or false (true recomputes each layer in backward: finetune.gradient_checkpointing)"),
    "transformer_layer_cls_to_wrap": (None, "the appliance finds the decoder layers itself"),
    "state_dict_type": (None, "checkpoints are the engine's sharded files, and the finished model is gathered into full weights"),
    **dict.fromkeys(
        "use_orig_params sync_module_states cpu_ram_efficient_loading limit_all_gathers backward_prefetch forward_prefetch".split(),
        (None, "FSDP1 machinery, which FSDP2 does without"),
    ),
}

# -- refused when set -----------------------------------------------------------------------------

_NOT_LORA = ("is not offered: the appliance trains plain LoRA", "remove it")
_NOT_SFT = ("is not offered: the appliance fine-tunes with next-token loss on examples (no preference or reward training)", "remove it")
# Unset, false or empty: accepted. Set: the conversion fails (it would change what is trained). (why, fix)
REFUSED = {
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

# -- the keys of one dataset entry ----------------------------------------------------------------

# Read by the converter itself when it builds the entry's table.
DATASET_HANDLED = ("path", "type", "data_files", "field", "field_messages", "field_tools", "roles_to_train", "chat_template", "chat_template_jinja")
DEFAULT_ROLES = {"user": ["human", "user"], "assistant": ["gpt", "assistant"], "system": ["system"], "tool": ["tool"]}
# Accepted with these values only.
DATASET_ACCEPTED: dict[str, tuple[Any, ...]] = {
    "split": ("train",),
    "ds_type": ("json", "jsonl", "parquet", "csv"),
    "message_property_mappings": ({"role": "role", "content": "content"},),
    "message_field_role": ("role",),
    "message_field_content": ("content",),
    "field_system": ("system",),
    "roles": (DEFAULT_ROLES,),
    "trust_remote_code": (False,),
}
DATASET_IGNORED = {
    "train_on_eos": "each trained turn's end-of-turn token is trained (Axolotl's turn)",
    "train_on_eot": "each trained turn's end-of-turn token is trained (Axolotl's turn)",
    "preprocess_shards": "loading machinery",
}
# Accepted when unset, false or empty; refused when set, for this reason.
DATASET_REFUSED = {
    "name": "a Hugging Face dataset configuration; the appliance reads local files",
    "revision": "a Hugging Face dataset revision; the appliance reads local files",
    "shards": "training on a shard of the data is not offered",
    "shards_idx": "training on a shard of the data is not offered",
    "message_field_training": "per-turn training flags are not offered (roles_to_train is)",
    "message_field_training_detail": "per-token training spans are not offered (roles_to_train is)",
    "drop_system_message": "dropping system turns is not offered",
    "split_thinking": "splitting reasoning traces is not offered",
}

# -- what the converter refuses, by reason: (message, fix) templates (see the module docstring) -------

REFUSALS: dict[str, tuple[str, str]] = {
    "type": ("{key} must be {words}, got {value}", "fix {key} in {source}"),
    # the model
    "base_model.missing": ("base_model is missing", "set base_model to the local directory of the model to fine-tune"),
    "base_model.remote": (
        "base_model {text!r} is not a local directory{looked}: the appliance never downloads",
        "copy the model's folder (config.json, *.safetensors, tokenizer files) onto this machine and point base_model at that directory",
    ),
    "base_model.layout": ("base_model {text!r} has no config.json: not a model in Hugging Face layout", "point base_model at the folder holding config.json"),
    "other_config": (
        "{key} {other!r} differs from base_model: the appliance uses the base directory's own config and tokenizer",
        "copy those files into the base directory and remove {key}",
    ),
    "model_class": (
        "{key}: {value} is not a causal language model's class: the appliance fine-tunes causal LMs",
        "remove {key} (the base's config.json names its class)",
    ),
    "trust_remote_code": (
        "trust_remote_code: true would run Python code shipped in the model directory; no code from a model directory runs here",
        "remove it, and use a base whose architecture transformers implements (Llama, Qwen2, Mistral, ...)",
    ),
    # the adapter
    "load_in_8bit": ("load_in_8bit: true (LoRA on an 8-bit base) is not offered", "use load_in_4bit: true (QLoRA), or remove it for LoRA on a bf16 base"),
    "adapter": ("adapter: {value} is not offered: the appliance trains lora, qlora, or (no adapter) every weight", "set adapter: lora or qlora"),
    "load_in_4bit": ("load_in_4bit: true with no adapter would train every weight of a 4-bit model", "set adapter: qlora, or remove load_in_4bit"),
    "bitsandbytes": (
        "{key}: {value} needs bitsandbytes (the 4-bit NF4 base), which is not installed here",
        'pip install bitsandbytes (or the fine-tuning extra: pip install -e ".[finetune]"), or set load_in_4bit: false and adapter: lora',
    ),
    "bnb_config_kwargs": ("bnb_config_kwargs.{name} is not offered", "keep only bnb_4bit_quant_type, bnb_4bit_use_double_quant and bnb_4bit_compute_dtype"),
    "lora_target_modules.pattern": (
        "lora_target_modules as a pattern is not offered",
        "list the module names, e.g. [q_proj, v_proj], or set lora_target_linear: true",
    ),
    "lora_target_modules.missing": ("no LoRA target modules", "add lora_target_linear: true, or lora_target_modules: [q_proj, v_proj]"),
    # the data
    "datasets.missing": ("datasets is missing", "list the training files: datasets: [{{path: train.jsonl, type: completion}}]"),
    "datasets.shape": ("{key} must be a list of mappings (- path: ..., type: ...)", "fix {key} in {source}"),
    "datasets.roles": ("the datasets train different roles_to_train: one set of roles is trained", "give every dataset the same roles_to_train"),
    "dataset.type": ("{key}: {value} is not offered", "use one of: " + ", ".join(FORMATS)),
    "dataset.path": ("{key} must name a local file, got {value}", "set {key} to a JSONL, Parquet or CSV file"),
    "dataset.remote": (
        "{key} {text!r} is not a local file (looked for {looked}): the appliance never downloads",
        "copy the data onto this machine and give its path",
    ),
    "dataset.value": ("{key}: {value} is not offered", "remove {key}"),
    "dataset.refused": ("{key}: {why}", "remove {key}"),
    "val_set_size": (
        "val_set_size = {value:g} is a count of examples; the appliance holds out a fraction",
        "set val_set_size to a fraction below 1, e.g. 0.05",
    ),
    "chat_template.differ": ("the datasets name different chat templates ({names}); one template renders them all", "use one chat_template"),
    "chat_template.base": (
        "chat_template: {name}, but the base {base} has no chat template",
        "set chat_template: chatml, or give a template as chat_template_jinja",
    ),
    "chat_template.unknown": (
        "chat_template: {name} is not built in here (chatml and tokenizer_default are)",
        "copy the template's Jinja text into chat_template_jinja",
    ),
    "special_tokens": (
        "special_tokens other than pad_token change the tokenizer; the appliance uses the base's tokens unchanged",
        "remove them, or set them in the base's tokenizer files",
    ),
    # the schedule and the optimizer
    "batch_size": ("batch_size {total} is not a multiple of micro_batch_size {batch}", "set gradient_accumulation_steps instead"),
    "learning_rate": ("learning_rate is missing (Axolotl requires it too)", "set learning_rate, e.g. 0.0002 for LoRA"),
    "lr_scheduler": (
        "lr_scheduler: {value} is not offered (cosine, cosine_with_min_lr, constant and constant_with_warmup are)",
        "set lr_scheduler: cosine",
    ),
    "num_epochs": (
        "num_epochs without max_steps: the appliance trains a fixed number of steps, and {why}",
        "set max_steps = ceil(num_epochs x examples / (micro_batch_size x gradient_accumulation_steps)); with sample_packing, tokens / sequence_len for examples",
    ),
    "fp16": (
        "fp16: true is not offered: the appliance trains in bf16 (no loss scaling to get wrong) or fp32",
        "set bf16: true (Ampere or newer GPUs), or fp16: false for fp32",
    ),
    "bf16": ("bf16 must be true, false, auto or full, got {value}", "set bf16: true"),
    "optimizer": (
        "optimizer: {value} is not offered: the appliance trains with AdamW",
        "set optimizer: adamw_torch (and re-tune learning_rate if it was set for another optimizer)",
    ),
    "steps": ("{key} must be a whole number of steps or a fraction of them, got {value:g}", "set {key} to a whole number"),
    # where the run is placed ([distributed])
    "engine.adapter": (
        "{key} is set, but an adapter (adapter: {adapter}) trains on one process here; DeepSpeed and FSDP are for full fine-tuning",
        "remove {key}, or remove adapter (and load_in_4bit) to train every weight",
    ),
    "engine.both": ("deepspeed and {key} are both set: a run has one engine", "keep one: deepspeed (ZeRO, from its JSON) or fsdp (FSDP2)"),
    "deepspeed.path": ("deepspeed must name a DeepSpeed JSON file, got {value}", "write the settings to a JSON file and set deepspeed: path/to/zero2.json"),
    "deepspeed.missing": (
        "deepspeed {text!r} is not a file (looked for {looked})",
        "copy the JSON onto this machine (Axolotl's own are in its repository's deepspeed_configs/) and point deepspeed at it, or remove deepspeed",
    ),
}
