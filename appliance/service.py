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
from appliance.launcher import LaunchOptions
from appliance.recipe import LoadedRecipe, parse_recipe
from appliance.reporting import NullReporter, Reporter
from appliance.training import StageContext, TrainingStopped, precheck
from keys.digest import sha256_bytes
from keys.errors import ApplianceError
from keys.keystore import NodeKey, create_key, load_key
from pipeline.config import to_mapping
from pipeline.result import ProgressFn, StageResult
from policies.decision import OwnerPolicy
from policies.errors import PolicyError
from registry.errors import StoreError
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
    # Stage name -> the run whose recorded outputs this run reuses instead of running it.
    reuse: dict[str, str] = field(default_factory=dict)
    launch: LaunchOptions = field(default_factory=LaunchOptions)
    job_file: Path | None = None
    recipe_dir: Path = Path(".")


# Stages `appliance train --data RUN` takes from an earlier run: everything before training.
DATA_STAGES = ("ingest", "curate", "tokenizer", "shard", "card")


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
        data_from: str | None = None,
        launch: LaunchOptions | None = None,
        job_file: Path | None = None,
    ) -> RunSummary:
        """Run every stage of a recipe, recording each stage's artifacts as it finishes.

        ``data_from`` reuses the verified data stages (ingest … card) of an earlier run, so
        only training, evaluation and packaging run; ``launch`` sets the process layout of
        the train stage (ranks per node, nodes, rendezvous).
        """
        reporter = reporter or NullReporter()
        source_dir = loaded.source_dir(source) if data_from is None else Path(self._started(data_from)["source"])
        precheck(loaded.recipe, loaded.path.parent, launch or LaunchOptions())
        self.authorize("run.start", f"recipe {loaded.path.name} ({loaded.digest[:12]})")
        force_offline()
        run_id = new_run_id()
        run = RunState(
            run_id=run_id,
            work=self.home.work_dir / run_id,
            context=context or {},
            reuse={s: data_from for s in DATA_STAGES} if data_from else {},
            launch=launch or LaunchOptions(),
            job_file=job_file,
            recipe_dir=loaded.path.parent,
        )
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
                        "recipe_path": str(loaded.path),
                        "source": str(source_dir),
                        "data_from": data_from,
                        "launch": _jsonable(to_mapping(run.launch)),
                        "environment": environment_attestation(),
                        "context": context or {},
                    },
                ),
                self._artifact_event(run, "recipe", recipe_art, kind="recipe", stage=None, parents=[]),
            ]
        )
        run.recorded = 1
        return self._drive(run, loaded, source_dir, reporter)

    def resume_run(self, run_ref: str, *, reporter: Reporter | None = None, launch: LaunchOptions | None = None, job_file: Path | None = None) -> RunSummary:
        """Continue a stopped or failed run: finished stages are reused, training resumes from
        its last checkpoint that verifies against the ledger."""
        reporter = reporter or NullReporter()
        run_id = self._resolve_run(run_ref)
        self.authorize("run.resume", run_id)
        started = self._started(run_id)
        status = self._status(run_id)
        if status == "succeeded":
            raise ApplianceError(f"run {run_id} already succeeded", "start a new run with `appliance run` or `appliance train`")
        recipe_event = next((e for e in self.ledger.events("artifact.recorded") if e.data["run_id"] == run_id and e.data["kind"] == "recipe"), None)
        if recipe_event is None:
            raise ApplianceError(f"run {run_id} recorded no recipe artifact, so it cannot be resumed", "start a new run with the recipe")
        digest = recipe_event.data["digest"]
        self.store.verify(digest, {self.key.key_id: self.key.public_key})
        stored = self.store.path_of(digest)
        text = stored.read_text(encoding="utf-8")
        recipe_path = Path(started.get("recipe_path") or stored)
        loaded = LoadedRecipe(recipe=parse_recipe(text, source=str(recipe_path)), path=recipe_path, digest=digest, text=text)
        force_offline()
        finished = {e.data["stage"] for e in self.ledger.events("stage.finished") if e.data["run_id"] == run_id}
        reuse = {s: run_id for s in finished}
        if started.get("data_from"):
            reuse.update({s: started["data_from"] for s in DATA_STAGES})
        run = RunState(
            run_id=run_id,
            work=self.home.work_dir / run_id,
            context=started.get("context") or {},
            reuse=reuse,
            launch=launch or LaunchOptions(**started.get("launch", {})),
            job_file=job_file,
            recipe_dir=recipe_path.parent,
        )
        run.work.mkdir(parents=True, exist_ok=True)
        run.artifacts["recipe"] = StoredArtifact(digest=digest, path=stored, size_bytes=recipe_event.data["size_bytes"], files=recipe_event.data["files"])
        self.ledger.append("run.resumed", self.identity, {"run_id": run_id, "previous_status": status, "reused_stages": sorted(finished)})
        return self._drive(run, loaded, Path(started["source"]), reporter)

    def _drive(self, run: RunState, loaded: LoadedRecipe, source_dir: Path, reporter: Reporter) -> RunSummary:
        from appliance.stages import STAGES  # the stage table needs torch; import it only to run

        started = time.monotonic()
        try:
            for stage in STAGES:
                if stage.name in run.reuse:
                    self._reuse_stage(run, stage, run.reuse[stage.name], reporter)
                else:
                    self._run_stage(run, stage, loaded, source_dir, reporter)
        except BaseException as exc:
            message = _failure(exc)
            status = "stopped" if isinstance(exc, (TrainingStopped, KeyboardInterrupt)) else "failed"
            self.ledger.append("run.finished", self.identity, {"run_id": run.run_id, "status": status, "error": message, "summary": {}})
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

    # -- reuse and resume -------------------------------------------------------------------

    def _resolve_run(self, ref: str) -> str:
        ids = sorted({e.data["run_id"] for e in self.ledger.events("run.started")})
        if ref == "latest" and ids:
            return max(self.ledger.events("run.started"), key=lambda e: e.seq).data["run_id"]
        matches = [i for i in ids if i.startswith(ref)]
        if not matches:
            raise ApplianceError(f"no run with id {ref}", 'list runs with `appliance ledger query "SELECT run_id, status FROM runs"`')
        if len(matches) > 1:
            raise ApplianceError(f"{len(matches)} runs start with {ref}", "give more of the id")
        return matches[0]

    def _started(self, run_ref: str) -> dict[str, Any]:
        run_id = self._resolve_run(run_ref)
        return next(e.data for e in self.ledger.events("run.started") if e.data["run_id"] == run_id)

    def _status(self, run_id: str) -> str:
        ends = [e for e in self.ledger.events("run.finished") if e.data["run_id"] == run_id]
        return ends[-1].data["status"] if ends else "running"

    def _reuse_stage(self, run: RunState, stage: Any, from_run: str, reporter: Reporter) -> None:
        """Take a stage's recorded, verified outputs from ``from_run`` instead of running it."""
        from_run = self._resolve_run(from_run)
        finished = [e for e in self.ledger.events("stage.finished") if e.data["run_id"] == from_run and e.data["stage"] == stage.name]
        if not finished:
            raise ApplianceError(
                f"run {from_run} has no finished {stage.name} stage to reuse",
                f"pick a run whose data stages finished (`appliance ledger query \"SELECT * FROM stages WHERE run_id = '{from_run}'\"`)",
            )
        reporter.stage_started(stage.name, f"{stage.title} (from {from_run})")
        trusted = {self.key.key_id: self.key.public_key}
        reused: dict[str, str] = {}
        for e in self.ledger.events("artifact.recorded"):
            d = e.data
            if d["run_id"] != from_run or d["stage"] != stage.name:
                continue
            if d["kind"] == "source":
                if not d["meta"].get("skipped"):
                    run.sources.append((d["name"], d["digest"]))
                continue
            out_name = d["name"].split("/", 1)[1]
            self.store.verify(d["digest"], trusted)
            run.artifacts[out_name] = StoredArtifact(digest=d["digest"], path=self.store.path_of(d["digest"]), size_bytes=d["size_bytes"], files=d["files"])
            reused[out_name] = d["digest"]
        run.stats[stage.name] = finished[-1].data["stats"]
        if from_run != run.run_id:
            self.ledger.append("stage.reused", self.identity, {"run_id": run.run_id, "stage": stage.name, "from_run": from_run, "artifacts": reused})
        reporter.stage_finished(stage.name, run.stats[stage.name])

    def _checkpoint_record(self, run_id: str, step: int) -> dict[str, Any] | None:
        saved = [e.data for e in self.ledger.events("checkpoint.saved") if e.data["run_id"] == run_id and e.data["step"] == step]
        return saved[-1] if saved else None

    def _stage_context(self, run: RunState, stage: Any, loaded: LoadedRecipe) -> StageContext:
        def note(kind: str, data: dict[str, Any]) -> None:
            body = _jsonable({"run_id": run.run_id, "stage": stage.name, **data})
            if kind == "metrics.recorded":
                body["points"] = [p for p in body["points"] if isinstance(p.get("value"), (int, float))]
            self.ledger.append(kind, self.identity, body)

        return StageContext(
            run_id=run.run_id,
            provenance=self._provenance(run, loaded),
            recipe_dir=run.recipe_dir,
            note=note,
            checkpoint_record=lambda step: self._checkpoint_record(run.run_id, step),
            launch=run.launch,
            job_file=run.job_file,
        )

    def _run_stage(self, run: RunState, stage: Any, loaded: LoadedRecipe, source_dir: Path, reporter: Reporter) -> None:
        work = run.work / stage.name
        work.mkdir(parents=True, exist_ok=True)
        reporter.stage_started(stage.name, stage.title)
        progress: ProgressFn = reporter.progress
        try:
            ctx = self._stage_context(run, stage, loaded)
            result: StageResult = stage.run(loaded.recipe, {k: a.path for k, a in run.artifacts.items()}, source_dir, work, progress, ctx)
            events = self._record_stage(run, stage, result)
        except BaseException as exc:
            message = _failure(exc)
            # A stop on request (with a checkpoint to resume from) is not a failure: say which it was.
            kind = "stage.stopped" if isinstance(exc, (TrainingStopped, KeyboardInterrupt)) else "stage.failed"
            self.ledger.append(kind, self.identity, {"run_id": run.run_id, "stage": stage.name, "error": message})
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
                        "digest": digest,
                        "kind": "source",
                        "name": src["path"],
                        "size_bytes": src["bytes"],
                        "files": 1,
                        "store_path": None,
                        "run_id": run.run_id,
                        "stage": stage.name,
                        "parents": [],
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
                "digest": art.digest,
                "kind": kind,
                "name": name if kind == "recipe" else f"{run.run_id}/{name}",
                "size_bytes": art.size_bytes,
                "files": art.files,
                "store_path": str(art.path.relative_to(self.home.store_dir)),
                "run_id": run.run_id,
                "stage": stage,
                "parents": sorted(parents),
                "meta": {},
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
