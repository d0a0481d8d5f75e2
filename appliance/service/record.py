"""Turning what a stage produced into provenance: store imports, signatures, ledger events.

The job reports paths; the service hashes what it imports into the store (so a job cannot
misreport its own output), signs each artifact and builds the events that record it, with
lineage edges to the artifacts it came from. A stage's events are appended in one
transaction: all of them are recorded, or none is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.jobs.launch import LaunchOptions
from appliance.service.stage_table import Stage
from keys import sealed
from keys.digest import sha256_bytes
from keys.errors import ApplianceError
from pipeline.result import StageResult
from registry.modelsig import sign_model_dir
from registry.store import StoredArtifact

Event = tuple[str, str, dict[str, Any]]
MAX_SOURCES_IN_CARD = 200


@dataclass
class RunState:
    """What one run has produced so far, and how it is being driven."""

    run_id: str
    work: Path
    actor: str
    recipe_text: str
    recipe_source: str
    recipe_dir: Path
    source: Path
    recipe_name: str
    recipe_digest: str
    artifacts: dict[str, StoredArtifact] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    recorded: int = 0
    # (relative path, sha256) of every source file read, for the model card.
    sources: list[tuple[str, str]] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)
    # Stage name -> the run whose recorded outputs this run reuses instead of running it.
    reuse: dict[str, str] = field(default_factory=dict)
    launch: LaunchOptions = field(default_factory=LaunchOptions)
    job_file: Path | None = None
    # Seconds the service spent proving the run (hashing, signing, storing, ledger writes):
    # the price of provenance, reported with the run.
    provenance_s: float = 0.0


def jsonable(obj: Any) -> Any:
    """Turn stats into JSON types the canonical encoder accepts (tuples → lists, floats rounded)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6) if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return jsonable(obj.item())
    return obj


def failure_text(exc: BaseException) -> str:
    """How a failure is written into the ledger: the user-facing text, never a traceback."""
    if isinstance(exc, ApplianceError):
        return exc.diagnostics()
    if isinstance(exc, KeyboardInterrupt):
        return "cancelled (interrupt or SIGTERM)"
    return f"{type(exc).__name__}: {exc}"


class Recorder:
    """Imports a stage's outputs into the store and builds the events that record them."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc

    def stage_events(self, run: RunState, stage: Stage, result: StageResult, *, seal: dict[str, str] | None = None) -> list[Event]:
        """Import a stage's outputs into the store and build its events (appended together)."""
        svc, actor = self.svc, run.actor
        events: list[Event] = []
        source_digests = []
        for src in result.inputs:
            digest = src["sha256"]
            if digest is None:
                continue  # unreadable, so it has no digest: its data.skipped event records it
            # A file skipped whole contributed nothing: it is recorded, but is no parent.
            if not src.get("skipped"):
                source_digests.append(digest)
                run.sources.append((src["path"], digest))
            events.append(
                (
                    "artifact.recorded",
                    actor,
                    {
                        "digest": digest,
                        "kind": src.get("kind", "source"),
                        "name": src["path"],
                        "size_bytes": src["bytes"],
                        "files": 1,
                        "store_path": None,
                        "run_id": run.run_id,
                        "stage": stage.name,
                        "parents": [],
                        "meta": jsonable({k: v for k, v in src.items() if k not in ("sha256", "path", "bytes", "kind")}),
                    },
                )
            )
        # Nothing is lost silently: every file that lost documents gets its own signed event.
        for item in result.skipped:
            events.append(("data.skipped", actor, {"run_id": run.run_id, "stage": stage.name, **jsonable(item)}))
        parents = sorted(set(source_digests) | {run.artifacts[p].digest for p in stage.parent_names(run.artifacts)})
        for out_name, path in result.outputs.items():
            kind = stage.kind_of(out_name)
            if kind in ("model", "adapter", "finetuned-model"):
                # model_signing's own format, so a third party verifies it with its CLI.
                sign_model_dir(path, svc.key)
            key_id = (seal or {}).get(out_name)
            if key_id is not None:
                require_sealed(path, key_id, f"stage {stage.name}'s output {out_name}")
            stored = svc.store.import_path(path, kind=kind, name=f"{run.run_id}/{out_name}", signer=svc.key, move=True)
            run.artifacts[out_name] = stored
            event = self.artifact_event(run, out_name, stored, kind=kind, stage=stage.name, parents=parents)
            if key_id is not None:
                event[2]["sealed"] = self._bind(key_id, stored, kind)
            events.append(event)
            if kind == "model":
                events.append(("model.signed", actor, {"digest": stored.digest, "key_id": svc.key.key_id, "signature_file": "model.sig"}))
        if result.metrics:
            events.append(("metrics.recorded", actor, {"run_id": run.run_id, "stage": stage.name, "points": jsonable(result.metrics)}))
        events.append(("stage.finished", actor, {"run_id": run.run_id, "stage": stage.name, "stats": jsonable(result.stats)}))
        return events

    def _bind(self, key_id: str, stored: StoredArtifact, kind: str) -> dict[str, Any] | None:
        """Bind the output's data key to the stored artifact; or name the key it is stored under
        already (the same content stored before), or None (stored before in the clear)."""
        found = sealed_key_ids(stored.path)
        if found == {key_id}:
            return self.svc.datakeys.bind(key_id, stored.digest, kind)
        if len(found) == 1 and None not in found:
            (other,) = found
            return {"key_id": other, "cipher": sealed.CIPHER, "wrap": sealed.WRAP}
        return None

    def artifact_event(self, run: RunState, name: str, art: StoredArtifact, *, kind: str, stage: str | None, parents: Iterable[str]) -> Event:
        return (
            "artifact.recorded",
            run.actor,
            {
                "digest": art.digest,
                "kind": kind,
                "name": name if kind == "recipe" else f"{run.run_id}/{name}",
                "size_bytes": art.size_bytes,
                "files": art.files,
                "store_path": str(art.path.relative_to(self.svc.home.store_dir)),
                "run_id": run.run_id,
                "stage": stage,
                "parents": sorted(parents),
                "meta": {},
            },
        )

    def provenance(self, run: RunState) -> dict[str, Any]:
        """What the model card states about where the model came from."""
        sources = sorted(run.sources)
        prov: dict[str, Any] = {
            "run": {"id": run.run_id, "recipe": run.recipe_name, "recipe_sha256": run.recipe_digest, "signed_by_key": self.svc.key.key_id},
            "context": run.context,
            # One digest over every input file, in sha256sum's format, so the list can be checked whole.
            "sources": {
                "files": len(sources),
                "manifest_sha256": sha256_bytes("".join(f"{d}  {p}\n" for p, d in sources).encode()),
            },
            "artifacts": {name: art.digest for name, art in run.artifacts.items()},
            "figures": {
                f"{stage}.{key}": stats[key]
                for stage, stats in run.stats.items()
                for key in ("documents_out", "train_tokens", "val_tokens", "steps", "final_loss", "val_loss", "perplexity")
                if key in stats
            },
        }
        # Name every input while the list stays readable; the ledger always holds all of them.
        if len(sources) <= MAX_SOURCES_IN_CARD:
            prov["sources"]["sha256"] = dict(sources)
        return jsonable(prov)


def sealed_key_ids(path: Path) -> set[str | None]:
    """The data key ids a file or folder's sealed files name (None for each plain data file).

    A folder's small plain files (a shard manifest: digests and counts, no text) do not count;
    a folder with no sealed file at all counts as plain.
    """
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    ids = {sealed.header_key_id(f) for f in files}
    if path.is_dir() and ids - {None}:
        ids.discard(None)
    return ids


def require_sealed(path: Path, key_id: str, what: str) -> None:
    """Refuse an output that should be sealed under ``key_id`` but was written otherwise."""
    found = sealed_key_ids(path)
    if found != {key_id}:
        raise ApplianceError(
            f"{what} ({path}) was not sealed under its data key {key_id} (found: {sorted(str(k) for k in found)})",
            "this is a bug in the stage's writer: report it; the run is not recorded with data in the clear",
        )
