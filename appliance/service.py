"""The service: the one authority over the appliance home.

Every request goes identify → authorize → record the decision → act. Only the service
writes the ledger and the store. For now it runs in-process with an explicit identity;
the socket server (later) is a thin adapter over this same object.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airgap.attest import environment_attestation, force_offline
from appliance.home import Home
from appliance.recipe import LoadedRecipe
from appliance.reporting import NullReporter, Reporter
from keys.digest import sha256_bytes
from keys.errors import ApplianceError, PolicyError, StoreError
from keys.keystore import NodeKey, create_key, load_key
from pipeline.config import to_mapping
from pipeline.result import ProgressFn, StageResult
from policies.decision import OwnerPolicy
from registry.ledger import Ledger
from registry.modelsig import sign_model_dir, verify_model_dir
from registry.store import Store, StoredArtifact

Event = tuple[str, str, dict[str, Any]]
MAX_SOURCES_IN_CARD = 200


@dataclass
class RunState:
    """What one run has produced so far: stage outputs by name, events to come."""

    run_id: str
    work: Path
    artifacts: dict[str, StoredArtifact] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    recorded: int = 0
    # (relative path, sha256) of every source file read, for the model card.
    sources: list[tuple[str, str]] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    run_id: str
    recipe_name: str
    recipe_digest: str
    stats: dict[str, dict[str, Any]]
    artifacts: dict[str, str]
    artifacts_recorded: int
    model_digest: str
    model_path: Path
    wall_s: float


def new_run_id() -> str:
    return time.strftime("run-%Y%m%dT%H%M%SZ-", time.gmtime()) + secrets.token_hex(3)


class Service:
    """Owns the ledger, the store and the unlocked node key of one home."""

    def __init__(self, home: Home, key: NodeKey, identity: str) -> None:
        self.home = home
        self.key = key
        self.identity = identity
        self.store = Store(home.store_dir)
        self.ledger = Ledger.open(home.ledger_file, key, head_path=home.head_file)
        self.policy = OwnerPolicy(owner=self._owner())

    # -- life cycle ---------------------------------------------------------------------

    @classmethod
    def initialise(cls, root: Path, passphrase: bytes, identity: str) -> Service:
        """Create a home: folders, the encrypted node key, the ledger and its first events."""
        home = Home(Path(root))
        if home.key_file.exists() or home.ledger_file.exists():
            raise ApplianceError(
                f"{home.root} is already an appliance home",
                "use it as it is, or choose another --home for a new one",
            )
        home.create_dirs()
        key = create_key(home.key_file, passphrase)
        with Ledger.open(home.ledger_file, key, head_path=home.head_file) as ledger:
            ledger.append_many(
                [
                    ("key.registered", identity, {"key_id": key.key_id, "public_key_pem": key.public_pem().decode(), "role": "node"}),
                    ("home.initialised", identity, {"owner": identity, "home": str(home.root)}),
                ]
            )
        return cls(home, key, identity)

    @classmethod
    def open(cls, root: Path, passphrase: bytes, identity: str) -> Service:
        """Unlock the node key of an existing home and take the ledger."""
        home = Home(Path(root))
        home.require()
        return cls(home, load_key(home.key_file, passphrase), identity)

    def close(self) -> None:
        self.ledger.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _owner(self) -> str:
        events = self.ledger.events("home.initialised")
        if not events:
            raise ApplianceError(f"ledger {self.home.ledger_file} has no home.initialised event", "initialise the home with `appliance init`")
        return events[0].data["owner"]

    # -- authorization --------------------------------------------------------------------

    def authorize(self, action: str, subject: str) -> None:
        """Decide, record the decision (allowed or denied), and raise PolicyError if denied."""
        decision = self.policy.decide(self.identity, action, subject)
        self.ledger.append(
            "authz.decision",
            self.identity,
            {"identity": self.identity, "action": action, "subject": subject, "allowed": decision.allowed, "reason": decision.reason},
        )
        if not decision.allowed:
            raise PolicyError(f"'{self.identity}' may not {action} {subject}: {decision.reason}", "ask the appliance owner for a role that grants it")

    # -- runs -----------------------------------------------------------------------------

    def run_recipe(
        self,
        loaded: LoadedRecipe,
        *,
        source: Path | None = None,
        reporter: Reporter | None = None,
        context: dict[str, Any] | None = None,
    ) -> RunSummary:
        """Run every stage of a recipe, recording each stage's artifacts as it finishes."""
        from appliance.stages import STAGES  # the stage table needs torch; import it only to run

        reporter = reporter or NullReporter()
        source_dir = loaded.source_dir(source)
        self.authorize("run.start", f"recipe {loaded.path.name} ({loaded.digest[:12]})")
        force_offline()
        started = time.monotonic()
        run_id = new_run_id()
        run = RunState(run_id=run_id, work=self.home.work_dir / run_id, context=context or {})
        run.work.mkdir(parents=True)
        recipe_art = self.store.import_path(loaded.path, kind="recipe", name=loaded.path.name, signer=self.key, move=False)
        run.artifacts["recipe"] = recipe_art
        self.ledger.append_many(
            [
                (
                    "run.started",
                    self.identity,
                    {
                        "run_id": run.run_id,
                        "recipe_name": loaded.recipe.recipe.name,
                        "recipe_digest": loaded.digest,
                        "recipe": _jsonable(to_mapping(loaded.recipe)),
                        "source": str(source_dir),
                        "environment": environment_attestation(),
                        "context": context or {},
                    },
                ),
                self._artifact_event(run, "recipe", recipe_art, kind="recipe", stage=None, parents=[]),
            ]
        )
        run.recorded = 1
        try:
            for stage in STAGES:
                self._run_stage(run, stage, loaded, source_dir, reporter)
        except BaseException as exc:
            message = _failure(exc)
            self.ledger.append("run.finished", self.identity, {"run_id": run.run_id, "status": "failed", "error": message, "summary": {}})
            raise
        wall = time.monotonic() - started
        model = run.artifacts["model"]
        summary = RunSummary(
            run_id=run.run_id,
            recipe_name=loaded.recipe.recipe.name,
            recipe_digest=loaded.digest,
            stats=run.stats,
            artifacts={k: a.digest for k, a in run.artifacts.items()},
            artifacts_recorded=run.recorded,
            model_digest=model.digest,
            model_path=model.path,
            wall_s=wall,
        )
        self.ledger.append(
            "run.finished",
            self.identity,
            {"run_id": run.run_id, "status": "succeeded", "error": None, "summary": {"wall_s": round(wall, 3), "model": model.digest}},
        )
        return summary

    def _run_stage(self, run: RunState, stage: Any, loaded: LoadedRecipe, source_dir: Path, reporter: Reporter) -> None:
        work = run.work / stage.name
        work.mkdir(parents=True, exist_ok=True)
        reporter.stage_started(stage.name, stage.title)
        progress: ProgressFn = reporter.progress
        try:
            result: StageResult = stage.run(loaded.recipe, {k: a.path for k, a in run.artifacts.items()}, source_dir, work, progress, self._provenance(run, loaded))
            events = self._record_stage(run, stage, result)
        except BaseException as exc:
            message = _failure(exc)
            self.ledger.append("stage.failed", self.identity, {"run_id": run.run_id, "stage": stage.name, "error": message})
            reporter.stage_failed(stage.name, message)
            raise
        self.ledger.append_many(events)
        run.recorded += sum(1 for kind, _, _ in events if kind == "artifact.recorded")
        run.stats[stage.name] = result.stats
        reporter.stage_finished(stage.name, result.stats)

    def _record_stage(self, run: RunState, stage: Any, result: StageResult) -> list[Event]:
        """Import a stage's outputs into the store and build its events (appended together)."""
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
                    self.identity,
                    {
                        "digest": digest, "kind": "source", "name": src["path"], "size_bytes": src["bytes"], "files": 1,
                        "store_path": None, "run_id": run.run_id, "stage": stage.name, "parents": [],
                        "meta": {k: v for k, v in src.items() if k not in ("sha256", "path", "bytes")},
                    },
                )
            )
        # Nothing is lost silently: every file that lost documents gets its own signed event.
        for item in result.skipped:
            events.append(("data.skipped", self.identity, {"run_id": run.run_id, "stage": stage.name, **_jsonable(item)}))
        parents = sorted(set(source_digests) | {run.artifacts[p].digest for p in stage.parents})
        for out_name, path in result.outputs.items():
            kind = stage.kind_of(out_name)
            if kind == "model":
                sign_model_dir(path, self.key)
            stored = self.store.import_path(path, kind=kind, name=f"{run.run_id}/{out_name}", signer=self.key, move=True)
            run.artifacts[out_name] = stored
            events.append(self._artifact_event(run, out_name, stored, kind=kind, stage=stage.name, parents=parents))
            if kind == "model":
                events.append(("model.signed", self.identity, {"digest": stored.digest, "key_id": self.key.key_id, "signature_file": "model.sig"}))
        if result.metrics:
            events.append(("metrics.recorded", self.identity, {"run_id": run.run_id, "stage": stage.name, "points": _jsonable(result.metrics)}))
        events.append(("stage.finished", self.identity, {"run_id": run.run_id, "stage": stage.name, "stats": _jsonable(result.stats)}))
        return events

    def _artifact_event(self, run: RunState, name: str, art: StoredArtifact, *, kind: str, stage: str | None, parents: Iterable[str]) -> Event:
        return (
            "artifact.recorded",
            self.identity,
            {
                "digest": art.digest, "kind": kind, "name": name if kind == "recipe" else f"{run.run_id}/{name}",
                "size_bytes": art.size_bytes, "files": art.files,
                "store_path": str(art.path.relative_to(self.home.store_dir)), "run_id": run.run_id, "stage": stage,
                "parents": sorted(parents), "meta": {},
            },
        )

    def _provenance(self, run: RunState, loaded: LoadedRecipe) -> dict[str, Any]:
        """What the model card states about where the model came from."""
        sources = sorted(run.sources)
        prov: dict[str, Any] = {
            "run": {"id": run.run_id, "recipe": loaded.recipe.recipe.name, "recipe_sha256": loaded.digest, "signed_by_key": self.key.key_id},
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
        return _jsonable(prov)

    # -- models ---------------------------------------------------------------------------

    def export_model(self, digest: str, out: Path) -> Path:
        """Copy a signed model out of the store as a bundle another site can verify."""
        self.authorize("model.export", digest)
        src = self.store.path_of(digest)
        trusted = {self.key.key_id: self.key.public_key}
        if self.ledger.recorded(digest, trusted).data["kind"] != "model":
            raise StoreError(f"artifact {digest[:16]}… is not a packaged model", "list models with `appliance model list`")
        self.store.verify(digest, trusted)
        out = Path(out)
        if out.exists():
            raise ApplianceError(f"export target {out} already exists", "choose a new --out folder")
        out.mkdir(parents=True)
        shutil.copytree(src, out / "model")
        for p in (out / "model").rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        (out / "model").chmod(0o755)
        shutil.copyfile(self.home.public_key_file, out / "signer.pub.pem")
        verify_model_dir(out / "model", out / "signer.pub.pem")
        self.ledger.append("model.exported", self.identity, {"digest": digest, "destination": str(out.resolve())})
        return out


def _failure(exc: BaseException) -> str:
    """How a failure is written into the ledger: the user-facing text, never a traceback."""
    if isinstance(exc, ApplianceError):
        return exc.diagnostics()
    if isinstance(exc, KeyboardInterrupt):
        return "cancelled (interrupt or SIGTERM)"
    return f"{type(exc).__name__}: {exc}"


def _jsonable(obj: Any) -> Any:
    """Turn stats into JSON types the canonical encoder accepts (tuples → lists, floats rounded)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6) if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return _jsonable(obj.item())
    return obj


__all__ = ["RunSummary", "Service"]
