"""Models: list, export (as a tar stream the client unpacks), and generation as a job.

Whatever consumes a model directory verifies it first: a stored model against its digest,
its signature file and its ledger record; a model directory a caller names against its
``model.sig`` (model-signing) and the home's key; a checkpoint directory against its
``COMPLETE`` manifest and the digest the ledger recorded when it was saved. Only then does
the generation job load a byte of it — in a child process, so the service never imports torch.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.jobs.runner import Job
from appliance.service.caller import Caller
from appliance.service.reads import verify_stored
from appliance.service.resolve import resolve_digest
from pipeline.errors import ConfigError, TrainingError
from pipeline.training import ckpt_files as ckpt
from registry.errors import StoreError
from registry.modelsig import DEFAULT_SIG_NAME, verify_model_dir

JOB_MODULE = "appliance.jobs.stage_job"
# Bounds on one generation request: a service must not be tied up by one caller's prompt list.
MAX_PROMPTS = 64
MAX_NEW_TOKENS = 4096
EXPORT_CHUNK = 1 << 20
ADAPTER_CONFIG = "adapter_config.json"
_STORED_BASE = re.compile(r"base:([0-9a-f]{64})/")


def model_list(svc: Any, caller: Caller) -> list[dict[str, Any]]:
    """Packaged, signed models, oldest first."""
    from appliance.service.reads import artifact_list

    return artifact_list(svc, caller, kind="model")


def model_export(svc: Any, caller: Caller, *, model: str, approval: str | None = None) -> Iterator[bytes]:
    """A signed model and the key that verifies it, as a tar stream: ``model/…`` and ``signer.pub.pem``.

    Under a two-person rule on model.export, ``approval`` names the caller's approved request
    for this model (used once). The stored copy is verified (digest, signature file, ledger
    record, model-signing signature) before the first byte leaves; the export is recorded.
    """
    found: list[str] = []

    def ready() -> None:
        # What must hold for the export to run, checked before an approval is used up on it.
        digest = resolve_digest(svc.ledger, model, kind="model")
        verify_stored(svc, digest, svc.trusted)
        verify_model_dir(svc.store.path_of(digest), svc.home.public_key_file)
        found.append(digest)

    svc.authorize(caller, "model.export", model, approval=approval, ready=ready)
    if not found:  # no approval was needed: the same checks, after the decision
        ready()
    digest = found[0]
    src = svc.store.path_of(digest)
    svc.ledger.append("model.exported", caller.user, {"digest": digest, "destination": f"stream to {caller.user} (uid {caller.uid})", "approval": approval})
    return _tar_stream(src, svc.home.public_key_file)


def _tar_stream(model_dir: Path, public_key: Path) -> Iterator[bytes]:
    """Stream a tar of the model directory without holding it in memory (a pipe and a thread)."""
    read_fd, write_fd = os.pipe()

    def write() -> None:
        with os.fdopen(write_fd, "wb") as sink, tarfile.open(fileobj=sink, mode="w|") as tar:
            for path in sorted(model_dir.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=f"model/{path.relative_to(model_dir).as_posix()}", recursive=False, filter=_plain)
            tar.add(public_key, arcname="signer.pub.pem", filter=_plain)

    threading.Thread(target=write, name="export-tar", daemon=True).start()
    with os.fdopen(read_fd, "rb") as source:
        while chunk := source.read(EXPORT_CHUNK):
            yield chunk


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Ownership and the store's read-only modes are this appliance's business, not the receiver's.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def generate(
    svc: Any,
    caller: Caller,
    *,
    model: str,
    prompts: list[str],
    sample: dict[str, Any],
    tokenizer: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Continue prompts with a stored model (digest), a signed model directory, or a recorded checkpoint.

    A stored LoRA adapter whose base is a stored model (fine-tuned with ``base = "model:…"``)
    is sampled as base + adapter: both are verified, and the job folds one into the other.
    The prompts are not recorded (the ledger cannot be purged, prompts may be private); the
    decision to generate, and from which model, is.
    """
    svc.authorize(caller, "model.generate", model)
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise ConfigError(f"give 1 to {MAX_PROMPTS} prompts, got {len(prompts)}", "pass --prompt once per prompt")
    if not 1 <= int(sample.get("max_new_tokens", 1)) <= MAX_NEW_TOKENS:
        raise ConfigError(f"--max-new-tokens must be 1 to {MAX_NEW_TOKENS}, got {sample.get('max_new_tokens')}", f"pass a value up to {MAX_NEW_TOKENS}")
    model_dir, digest, what = _verified_model_dir(svc, caller, model)
    base_dir = None
    if (model_dir / ADAPTER_CONFIG).is_file():
        base_dir = _verified_adapter_base(svc, model_dir, digest)
        what += f"; its base, stored model {base_dir.name[:16]}…, the same"
    tok = None
    if tokenizer:
        tok = caller.require_readable(Path(tokenizer), what="tokenizer")
    work = svc.home.work_dir / "generate" / f"{caller.uid}-{os.getpid()}-{threading.get_ident()}"
    spec = {
        "op": "generate",
        "model_dir": str(model_dir),
        # A LoRA adapter is folded into its verified base in the job's scratch folder, then sampled.
        "base_dir": str(base_dir) if base_dir else None,
        "scratch": str(work / "merged"),
        "tokenizer": str(tok) if tok else None,
        "prompts": prompts,
        "sample": sample,
        "device": device,
    }
    job = Job(JOB_MODULE, spec, work)
    try:
        outcome = job.run(lambda event: None)
    finally:
        job.spec_file.unlink(missing_ok=True)  # it holds the prompts; the log stays for a failure
    generated, error = outcome.last("generated"), outcome.last("error")
    if outcome.returncode != 0 or generated is None:
        message = error["message"] if error else f"the generation job exited with code {outcome.returncode}"
        raise TrainingError(message, f"see {job.log_file}")
    shutil.rmtree(work, ignore_errors=True)  # nothing of a generation is kept: the prompts may be private
    return {"model": str(model_dir), "digest": digest, "verified": what, **{k: v for k, v in generated.items() if k != "event"}}


def _verified_model_dir(svc: Any, caller: Caller, model: str) -> tuple[Path, str | None, str]:
    """(directory, store digest or None, how it was verified), refusing anything unverified."""
    given = Path(model)
    if given.is_absolute():
        real = caller.require_readable(given, what="model directory", tree=True)
        if not real.is_dir():
            raise ConfigError(f"{model} is not a directory", "pass a packaged model or checkpoint directory, or a model digest")
        if (real / DEFAULT_SIG_NAME).is_file():
            verify_model_dir(real, svc.home.public_key_file)
            return real, None, f"{DEFAULT_SIG_NAME} verified with the node key {svc.key.key_id[:16]}…"
        if (real / ckpt.COMPLETE).is_file():
            info = ckpt.verify_checkpoint(real)
            record = _checkpoint_record(svc, ckpt.checkpoint_digest(info))
            if record is None:
                raise TrainingError(
                    f"checkpoint {real} matches its manifest but the ledger recorded no checkpoint with its digest",
                    "generate only from checkpoints this appliance recorded, or from a signed model",
                )
            return real, None, f"checkpoint recorded at ledger seq {record}"
        raise StoreError(
            f"{real} has neither a {DEFAULT_SIG_NAME} signature nor a checkpoint manifest, so it cannot be verified",
            "generate from a model packaged by the appliance (`appliance model list`) or a recorded checkpoint",
        )
    digest = resolve_digest(svc.ledger, model, kind="model")
    verify_stored(svc, digest, svc.trusted)
    path = svc.store.path_of(digest)
    verify_model_dir(path, svc.home.public_key_file)
    return path, digest, "stored model: digest, signature file, ledger record and model.sig"


def _verified_adapter_base(svc: Any, adapter_dir: Path, digest: str | None) -> Path:
    """The stored, verified base a packaged LoRA adapter was trained on, found through the ledger:
    its run's base stage recorded the base's files as ``base:<store dir>/<file>``."""
    if digest is None:
        raise ConfigError(
            f"{adapter_dir} is a LoRA adapter: sampling needs its base, which only its ledger record names",
            "generate from the adapter's digest (`appliance model list`), or fine-tune with finetune.merge = true for a whole model",
        )
    rows = svc.ledger.select(
        "SELECT DISTINCT b.name FROM artifacts m JOIN artifacts b ON b.run_id = m.run_id WHERE m.digest = ? AND b.kind = 'base-model-file'",
        [digest],
    )
    found = {m.group(1) for (name,) in rows if (m := _STORED_BASE.match(str(name)))}
    stored = [d for d in sorted(found) if svc.ledger.select("SELECT 1 FROM artifacts WHERE digest = ? AND kind = 'model'", [d])]
    if len(stored) != 1:
        names = sorted({str(name).split("/", 1)[0].removeprefix("base:") for (name,) in rows}) or ["none recorded"]
        raise ConfigError(
            f"model {digest[:16]}… is a LoRA adapter whose base ({', '.join(names)}) is not a model in this appliance's store,"
            " and only stored, verified models are sampled",
            "fine-tune with finetune.merge = true to package the whole model, or load the adapter with peft on its base",
        )
    base = stored[0]
    verify_stored(svc, base, svc.trusted)
    path = svc.store.path_of(base)
    verify_model_dir(path, svc.home.public_key_file)
    return path


def _checkpoint_record(svc: Any, digest: str) -> int | None:
    rows = svc.ledger.select(
        "SELECT seq FROM events WHERE kind = 'checkpoint.saved' AND body ->> '$.data.digest' = ? ORDER BY seq DESC LIMIT 1",
        [digest],
    )
    return int(rows[0][0]) if rows else None
