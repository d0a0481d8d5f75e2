"""Importing a local base model: check its layout, read its shape, hash every file.

`inspect_base(path)` looks at a Hugging Face model directory *without* loading it (no torch,
no transformers: only JSON and the safetensors headers are read) and returns a `BaseModel`:

- the layout is one transformers builds offline from its own code: ``config.json`` with a
  ``model_type`` of llama, qwen2 or mistral (the appliance's own packaged models are Llama)
  and the matching ``*ForCausalLM`` architecture; weights as ``*.safetensors`` only; a
  tokenizer (``tokenizer.json`` or ``tokenizer.model``, with ``tokenizer_config.json``);
- nothing that runs code: pickle weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl``)
  and ``auto_map`` (custom modelling or tokenizer code) are refused, since loading either can
  execute arbitrary Python; ``trust_remote_code`` is never used;
- no symbolic link leads outside the directory, and no linked folder is followed;
- every file is hashed (sha256, streamed) into a manifest sorted by path, and the base's digest
  is the sha256 of that manifest in ``sha256sum``'s format (`keys.digest.manifest_text`), so
  a directory without hidden files or links has the same digest as `keys.digest.sha256_path`
  gives it, and anyone can recompute it with coreutils.

Hidden entries (any path part starting with ``.``: ``.git``, ``.cache``, ``.gitattributes``)
are ignored: they are not part of the model, are not hashed, and no loader reads them.

Every problem found is reported at once, in one `BaseModelError`. Signature checks live in
`pipeline.finetune.base_sig`; call `verify_base` before any file is handed to transformers.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keys.digest import manifest_text, sha256_bytes, sha256_file
from pipeline.errors import DataError

# model_type -> the causal-LM class transformers builds for it from its own code.
SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
# Formats that unpickle on load: opening one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Largest safetensors header read (the format's own reference limit is 100 MB).
_MAX_HEADER = 100_000_000
_CONVERT = (
    "convert the weights to safetensors on a trusted machine "
    "(`python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('SRC').save_pretrained('DST', safe_serialization=True)\"`, "
    "or download the repository's *.safetensors files only) and delete the pickle files"
)


class BaseModelError(DataError):
    """A base model directory cannot be used for fine-tuning (layout, unsafe files, bad config)."""


@dataclass(frozen=True, kw_only=True)
class ManifestEntry:
    """One hashed file of a base: posix path relative to the base, sha256 hex, size in bytes."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True, kw_only=True)
class BaseShape:
    """What config.json says about the network's size (enough to estimate parameters and memory)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    tie_word_embeddings: bool
    # Qwen2 has biases on the q, k and v projections; Llama and Mistral have none.
    qkv_bias: bool


@dataclass(frozen=True, kw_only=True)
class BaseModel:
    """A base model directory as inspected: layout, shape, and the digest of every file."""

    path: Path
    model_type: str
    architecture: str
    shape: BaseShape
    # Weight files (relative paths), and the parameters and bytes their safetensors headers declare.
    weight_files: tuple[str, ...]
    parameters: int
    weight_bytes: int
    tokenizer_files: tuple[str, ...]
    has_chat_template: bool
    # README front matter carries the appliance's tag: a model this appliance packaged.
    appliance_package: bool
    manifest: tuple[ManifestEntry, ...]
    digest: str

    def parameter_estimate(self) -> int:
        """Parameters implied by the shape alone (embeddings, attention, SwiGLU MLP, norms, head)."""
        s = self.shape
        q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        attention = s.hidden_size * q_out + 2 * s.hidden_size * kv_out + q_out * s.hidden_size
        if s.qkv_bias:
            attention += q_out + 2 * kv_out
        per_layer = attention + 3 * s.hidden_size * s.intermediate_size + 2 * s.hidden_size
        embeddings = s.vocab_size * s.hidden_size
        head = 0 if s.tie_word_embeddings else s.vocab_size * s.hidden_size
        return embeddings + s.num_layers * per_layer + s.hidden_size + head

    def memory_estimate(self, bytes_per_parameter: float) -> int:
        """Bytes the weights take at ``bytes_per_parameter`` (2 for bf16, 0.5 for NF4), before activations."""
        return math.ceil(self.parameter_estimate() * bytes_per_parameter)

    def manifest_dict(self) -> dict[str, dict[str, Any]]:
        """{relative path: {"sha256", "size"}}, sorted: the per-file digests the ledger records."""
        return {e.path: {"sha256": e.sha256, "size": e.size} for e in self.manifest}

    def manifest_text(self) -> str:
        """The manifest in ``sha256sum``'s format; `digest` is its sha256."""
        return manifest_text([(e.path, e.sha256, e.size) for e in self.manifest])


def is_hidden(rel: str) -> bool:
    """True for a relative path with a part starting with "." (.git, .cache): not part of the model."""
    return any(part.startswith(".") for part in rel.split("/"))


def _walk(root: Path, problems: list[str]) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every non-hidden file; escaping links and linked folders are problems."""
    real_root = root.resolve()
    found: list[tuple[str, Path]] = []
    for current, dirs, files in os.walk(root):  # followlinks=False: linked folders are listed, not entered
        here = Path(current)
        for name in sorted(dirs):
            rel = (here / name).relative_to(root).as_posix()
            if is_hidden(rel):
                dirs.remove(name)
            elif (here / name).is_symlink():
                dirs.remove(name)
                problems.append(f"{rel} is a link to a folder ({os.readlink(here / name)}); replace it with a real folder (`cp -rL`)")
        for name in sorted(files):
            full = here / name
            rel = full.relative_to(root).as_posix()
            if is_hidden(rel):
                continue
            if full.is_symlink():
                target = full.resolve()
                if not target.is_relative_to(real_root):
                    problems.append(
                        f"{rel} is a link to {target}, outside the model directory; copy the files in with `cp -rL SRC DST` "
                        "(a Hugging Face cache snapshot links into its blobs/ folder)"
                    )
                    continue
            if not full.is_file():
                problems.append(f"{rel} is not a regular file (or a link to one inside the directory)")
                continue
            found.append((rel, full))
    found.sort(key=lambda item: item[0].encode("utf-8"))
    return found


def _read_json(path: Path, rel: str, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{rel} is not readable JSON ({exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{rel} must hold a JSON object")
        return None
    return data


def _safetensors_header(path: Path, rel: str, problems: list[str]) -> tuple[int, int]:
    """(parameters, bytes) declared by a safetensors file's header; the tensors are not read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            (n,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (-1,)
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                problems.append(f"{rel} is not a safetensors file (bad header length)")
                return 0, 0
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{rel} is not a safetensors file ({exc})")
        return 0, 0
    if not isinstance(header, dict):
        problems.append(f"{rel} is not a safetensors file (header is not an object)")
        return 0, 0
    params = nbytes = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            params += math.prod(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
            nbytes += end - start
        except (KeyError, TypeError, ValueError):
            problems.append(f"{rel}: tensor {name!r} has no valid shape / data_offsets")
            return 0, 0
    return params, nbytes


def _positive(config: dict[str, Any], key: str, problems: list[str], default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        problems.append(f"config.json: {key} must be a positive whole number, got {value!r}")
        return 1
    return value


def _shape(config: dict[str, Any], model_type: str, problems: list[str]) -> BaseShape:
    hidden = _positive(config, "hidden_size", problems)
    heads = _positive(config, "num_attention_heads", problems)
    return BaseShape(
        hidden_size=hidden,
        intermediate_size=_positive(config, "intermediate_size", problems),
        num_layers=_positive(config, "num_hidden_layers", problems),
        num_heads=heads,
        num_kv_heads=_positive(config, "num_key_value_heads", problems, default=heads),
        head_dim=_positive(config, "head_dim", problems, default=max(hidden // heads, 1)),
        vocab_size=_positive(config, "vocab_size", problems),
        max_positions=_positive(config, "max_position_embeddings", problems),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
    )


def _check_config(config: dict[str, Any], problems: list[str]) -> tuple[str, str]:
    if "auto_map" in config:
        problems.append(
            "config.json has auto_map: the model needs its own Python code (trust_remote_code), which the appliance never runs; "
            f"use a base whose model_type transformers supports itself ({', '.join(SUPPORTED)})"
        )
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        problems.append(f"config.json: model_type {model_type!r} is not one the appliance fine-tunes; supported: {', '.join(SUPPORTED)}")
        return str(model_type), ""
    architectures = config.get("architectures")
    expected = SUPPORTED[model_type]
    if not isinstance(architectures, list) or expected not in architectures:
        problems.append(f"config.json: architectures must list {expected} for model_type {model_type!r}, got {architectures!r}")
    return model_type, expected


def _has_chat_template(tokenizer_config: dict[str, Any] | None, names: set[str]) -> bool:
    template = (tokenizer_config or {}).get("chat_template")
    if isinstance(template, str) and template.strip():
        return True
    if isinstance(template, list) and template:  # named templates: [{"name": ..., "template": ...}]
        return True
    return "chat_template.jinja" in names or "chat_template.json" in names


def _appliance_package(readme: Path) -> bool:
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    front = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    return "- sovereign-appliance" in front.splitlines()


def inspect_base(path: Path) -> BaseModel:
    """Check a base model directory and hash it; raise BaseModelError listing every problem.

    Nothing is loaded: config.json, tokenizer_config.json and the safetensors headers are read
    as JSON. Hidden files and folders (``.git``, ``.cache``, anything starting with ``.``) are
    ignored and not hashed. Links to files inside the directory are hashed as their target;
    links leading outside it, and links to folders, are refused.
    """
    root = Path(path)
    if not root.is_dir():
        raise BaseModelError(
            f"base model {root} is not a directory",
            "set [finetune] base to a local folder in Hugging Face layout (config.json, *.safetensors, tokenizer files)",
        )
    problems: list[str] = []
    files = _walk(root, problems)
    names = {rel for rel, _ in files}

    pickles = sorted(rel for rel in names if rel.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        problems.append(f"pickle files {', '.join(pickles)}: loading them can run arbitrary code; {_CONVERT}")
    weights = tuple(rel for rel, _ in files if rel.endswith(".safetensors"))
    if not weights:
        problems.append(f"no *.safetensors weights in {root}; {_CONVERT}" if pickles else f"no *.safetensors weights in {root}")

    config = _read_json(root / "config.json", "config.json", problems) if "config.json" in names else None
    if "config.json" not in names:
        problems.append("config.json is missing; a Hugging Face model directory starts with it")
    model_type, architecture = _check_config(config, problems) if config is not None else ("", "")
    shape = _shape(config if config is not None else {}, model_type, problems) if config is not None else None

    tokenizer_config = None
    if "tokenizer_config.json" in names:
        tokenizer_config = _read_json(root / "tokenizer_config.json", "tokenizer_config.json", problems)
        if tokenizer_config is not None and "auto_map" in tokenizer_config:
            problems.append("tokenizer_config.json has auto_map: the tokenizer needs its own Python code, which the appliance never runs")
    tokenizer_files = tuple(n for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json") if n in names)
    if not ({"tokenizer.json", "tokenizer.model"} & names) or "tokenizer_config.json" not in names:
        problems.append(
            "the tokenizer is incomplete: the base needs tokenizer.json or tokenizer.model, and tokenizer_config.json "
            f"(found: {', '.join(tokenizer_files) or 'none'}); copy them from the model's release"
        )

    index = "model.safetensors.index.json"
    if index in names:
        body = _read_json(root / index, index, problems)
        shards = set((body or {}).get("weight_map", {}).values()) if isinstance((body or {}).get("weight_map"), dict) else set()
        missing = sorted(s for s in shards if str(s) not in names)
        if missing:
            problems.append(f"{index} names shards that are not there: {', '.join(missing)}")

    parameters = weight_bytes = 0
    for rel in weights:
        p, b = _safetensors_header(root / rel, rel, problems)
        parameters, weight_bytes = parameters + p, weight_bytes + b

    if problems or shape is None:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise BaseModelError(
            f"base model {root} cannot be used ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n{lines}",
            "fix each problem named above in the base model directory, or point [finetune] base at another model",
        )

    manifest = tuple(ManifestEntry(path=rel, sha256=sha256_file(full), size=full.stat().st_size) for rel, full in files)
    digest = sha256_bytes(manifest_text([(e.path, e.sha256, e.size) for e in manifest]).encode("utf-8"))
    return BaseModel(
        path=root,
        model_type=model_type,
        architecture=architecture,
        shape=shape,
        weight_files=weights,
        parameters=parameters,
        weight_bytes=weight_bytes,
        tokenizer_files=tokenizer_files,
        has_chat_template=_has_chat_template(tokenizer_config, names),
        appliance_package="README.md" in names and _appliance_package(root / "README.md"),
        manifest=manifest,
        digest=digest,
    )
