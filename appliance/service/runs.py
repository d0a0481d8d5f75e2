"""Runs: accepted, queued, driven stage by stage as jobs, cancelled, followed, recovered.

A run is recorded (``run.started``) as soon as it is accepted; it then waits in a queue until
one of ``max_jobs`` worker threads drives it. Each stage runs as a child process (`Job`);
the run holds its `RunLock` for as long as it is driven and hands it to its jobs, so no run
ever has two jobs. Followers (the CLI, the console) read a run's `RunFeed`: stage starts,
progress, stage ends, and the final outcome.

When a service starts, runs the ledger shows as running belong to a service that died: they
are recorded as ``interrupted`` and, under `appliance serve`, resumed from their last
recorded stage or verified checkpoint.
"""

from __future__ import annotations

import queue
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from airgap.attest import environment_attestation
from appliance.jobs.launch import LaunchOptions, failure_message
from appliance.jobs.runner import Job, RunLock
from appliance.recipe import LoadedRecipe, load_recipe, parse_recipe
from appliance.recipe_checks import Machine
from appliance.service.caller import Caller
from appliance.service.datakeys import SEALED_OUTPUTS
from appliance.service.feed import ActiveRun, RunFeed
from appliance.service.reads import verify_stored
from appliance.service.record import Recorder, RunState, failure_text, jsonable
from appliance.service.resolve import (
    checkpoint_saved,
    finished_stages,
    resolve_digest,
    resolve_run,
    run_event,
    run_events,
    run_rows,
    run_started,
    run_status,
    stage_artifacts,
)
from appliance.service.stage_table import DATA_STAGES, Stage, stages_for
from appliance.service.training import StageContext, TrainingStopped, finetune_stage, precheck, train_stage
from keys import sealed
from keys.errors import ApplianceError
from pipeline.config import to_mapping
from pipeline.errors import TrainingError
from pipeline.result import StageResult
from registry.store import StoredArtifact

# How long a restarted service waits for a dead service's job to die before giving up on a run.
LOCK_WAIT_S = 15.0
JOB_MODULE = "appliance.jobs.stage_job"
# Who cancels the runs of a service that is stopping (SIGTERM, systemctl stop): such runs are
# recorded as interrupted, not stopped, and the next service start resumes them.
SHUTDOWN = "the service stopping"


class RunStopped(ApplianceError):
    """The run was cancelled; what it finished is recorded and `appliance resume RUN` continues it."""

    exit_code = 130


def new_run_id() -> str:
    return time.strftime("run-%Y%m%dT%H%M%SZ-", time.gmtime()) + secrets.token_hex(3)


class RunManager:
    """Starts, queues, drives, cancels and recovers the runs of one service."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc
        self.recorder = Recorder(svc)
        self.active: dict[str, ActiveRun] = {}
        self.finished_feeds: dict[str, RunFeed] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closing = False
        self.purging: str | None = None  # the purge in progress (no run starts meanwhile)
        # (run, stage) -> the scratch key of its last attempt that did not finish. Held in memory
        # only, so the relaunch reads the task journal that attempt sealed (`pipeline.task_journal`)
        # and recomputes only unfinished batches; a service restart or a purge forgets it, and
        # the journal is noise the relaunch recomputes.
        self._scratch: dict[tuple[str, str], str] = {}
        self._workers = [threading.Thread(target=self._work, name=f"run-worker-{i}", daemon=True) for i in range(svc.config.max_jobs)]
        for w in self._workers:
            w.start()

    # -- requests -----------------------------------------------------------------------

    def require_no_purge(self) -> None:
        """A run does not start while a purge destroys keys and files it might read."""
        if self.purging is not None:
            raise ApplianceError(f"purge {self.purging} is in progress", "start the run again when it has finished (`appliance purges list`)")

    def begin_purge(self, purge_id: str) -> None:
        """Mark a purge in progress; refused while any run is queued or running."""
        with self._lock:
            if self.active:
                raise ApplianceError(
                    f"a purge waits for a quiet appliance: run(s) {', '.join(sorted(self.active))} are queued or running",
                    "wait for them to finish, or cancel them with `appliance cancel RUN`, then purge",
                )
            self.purging = purge_id
            # A journal of an unfinished stage holds text derived from what may be purged.
            for key_id in self._scratch.values():
                self.svc.datakeys.discard(key_id)
            self._scratch.clear()

    def end_purge(self) -> None:
        self.purging = None

    def start(
        self,
        caller: Caller,
        *,
        recipe: str,
        source: str | None = None,
        data_from: str | None = None,
        launch: dict[str, Any] | None = None,
        job_file: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Accept a run of the recipe at ``recipe`` (a path the caller can read) and queue it."""
        svc = self.svc
        svc.authorize(caller, "run.start", f"recipe {recipe}")
        self.require_no_purge()
        recipe_path = caller.require_readable(Path(recipe), what="recipe")
        # Every value, across tables and against this machine, before anything is recorded.
        loaded = load_recipe(recipe_path, machine=Machine.here())
        opts = _launch_options(launch, loaded)
        if data_from is not None:
            from_run = resolve_run(svc.ledger, data_from)
            source_dir = Path(self._started(from_run)["source"])
        elif loaded.recipe.finetune is not None:
            from pipeline.finetune.stages import require_libraries

            require_libraries()
            # Fine-tuning reads its base and data sets from paths relative to the recipe.
            source_dir = loaded.path.parent
            if loaded.recipe.finetune.base.startswith("model:"):
                self._stored_base(loaded.recipe.finetune.base)  # one the service holds: found and verified now
            else:
                caller.require_readable(source_dir / loaded.recipe.finetune.base, what="base model", tree=True)
                # Now that the caller may read it: the base's shape against the recipe and this
                # machine (its config.json only), before anything is recorded.
                parse_recipe(loaded.text, source=str(loaded.path), machine=Machine.here(), recipe_dir=source_dir)
            from_run = None
        else:
            source_dir = loaded.source_dir(Path(source) if source else None)
            caller.require_readable(source_dir, what="corpus folder", tree=True)
            from_run = None
        if loaded.recipe.distributed.engine == "deepspeed":
            caller.require_readable((loaded.path.parent / loaded.recipe.distributed.deepspeed_config).resolve(), what="DeepSpeed config")
        precheck(loaded.recipe, loaded.path.parent, opts)
        run_id = new_run_id()
        state = RunState(
            run_id=run_id,
            work=svc.home.work_dir / run_id,
            actor=caller.user,
            recipe_text=loaded.text,
            recipe_source=str(loaded.path),
            recipe_dir=loaded.path.parent,
            source=source_dir,
            recipe_name=loaded.recipe.recipe.name,
            recipe_digest=loaded.digest,
            context=context or {},
            reuse={s: from_run for s in DATA_STAGES} if from_run else {},
            launch=opts,
            job_file=Path(job_file) if job_file else None,
        )
        state.work.mkdir(parents=True)
        recipe_art = svc.store.import_path(loaded.path, kind="recipe", name=loaded.path.name, signer=svc.key, move=False)
        state.artifacts["recipe"] = recipe_art
        svc.ledger.append_many(
            [
                (
                    "run.started",
                    caller.user,
                    {
                        "run_id": run_id,
                        "recipe_name": state.recipe_name,
                        "recipe_digest": loaded.digest,
                        "recipe": jsonable(to_mapping(loaded.recipe)),
                        "recipe_path": str(loaded.path),
                        "source": str(source_dir),
                        "data_from": from_run,
                        "launch": jsonable(to_mapping(opts)),
                        "job_file": job_file,
                        "environment": environment_attestation(recipe_digest=loaded.digest),
                        "context": context or {},
                        "caller": caller.as_record(),
                    },
                ),
                self.recorder.artifact_event(state, "recipe", recipe_art, kind="recipe", stage=None, parents=[]),
            ]
        )
        state.recorded = 1
        return self._enqueue(state, caller)

    def resume(self, caller: Caller, *, run: str, launch: dict[str, Any] | None = None, job_file: str | None = None) -> dict[str, Any]:
        """Queue a stopped, failed or interrupted run again: finished stages are reused, training
        resumes from its newest checkpoint that verifies against the ledger."""
        self.svc.authorize(caller, "run.resume", run)
        self.require_no_purge()
        run_id = resolve_run(self.svc.ledger, run)
        return self._resume(run_id, caller, launch=launch, job_file=job_file)

    def cancel(self, caller: Caller, *, run: str) -> dict[str, Any]:
        """Ask a queued or running run to stop: a training job checkpoints first."""
        self.svc.authorize(caller, "run.cancel", run)
        run_id = resolve_run(self.svc.ledger, run)
        with self._lock:
            active = self.active.get(run_id)
        if active is None:
            raise ApplianceError(f"run {run_id} is not running (it is {run_status(self.svc.ledger, run_id)})", "list runs with `appliance runs list`")
        active.cancel(caller.user)
        return {"run_id": run_id, "cancelling": True}

    def list(self, caller: Caller) -> list[dict[str, Any]]:
        """Every run: id, recipe, status, who started it, when."""
        self.svc.authorize(caller, "run.list", "runs")
        return self._rows()

    def show(self, caller: Caller, *, run: str) -> dict[str, Any]:
        """One run: its status and its stages."""
        self.svc.authorize(caller, "run.show", run)
        run_id = resolve_run(self.svc.ledger, run)
        row = next(r for r in self._rows() if r["run_id"] == run_id)
        stages: dict[str, str] = {}
        stage_ts: dict[str, str] = {}  # when each stage last changed state (its end, for a finished one)
        # The ledger records a stage's end, not its start: a stage began when the one before it
        # ended, or when the run was started or resumed, whichever came last.
        stage_began: dict[str, str] = {}
        mark: str | None = None
        for e in run_events(self.svc.ledger, run_id):
            if e.kind in ("run.started", "run.resumed"):
                mark = e.ts
            elif e.kind.startswith("stage."):
                name = e.data["stage"]
                stages[name] = f"reused from {e.data['from_run']}" if e.kind == "stage.reused" else e.kind.split(".", 1)[1]
                stage_ts[name] = e.ts
                if mark is not None:
                    stage_began[name] = mark
                mark = e.ts
        return {**row, "stages": stages, "stage_ts": stage_ts, "stage_began": stage_began}

    def follow(self, caller: Caller, *, run: str, since: int = 0) -> Iterator[dict[str, Any]]:
        """The run's events as they happen, ending with ``run_finished``."""
        self.svc.authorize(caller, "run.show", run)
        run_id = resolve_run(self.svc.ledger, run)
        with self._lock:
            active = self.active.get(run_id)
            feed = active.feed if active else self.finished_feeds.get(run_id)
        if feed is None:
            # Driven by an earlier service: what the ledger knows is all there is.
            status = run_status(self.svc.ledger, run_id)
            return iter([{"event": "run_finished", "run_id": run_id, "status": status, "error": None, "summary": None}])
        return feed.follow(since)

    # -- recovery and shutdown -------------------------------------------------------------

    def recover(self, *, resume: bool) -> list[str]:
        """Record the runs a dead service left running as ``interrupted``; with ``resume``, queue
        every interrupted run again (those too that a stopping service checkpointed and left)."""
        interrupted = []
        for row in self._rows():
            run_id = row["run_id"]
            if row["status"] == "running":
                lock = RunLock(self.svc.home.work_dir / run_id)
                try:
                    lock.acquire(wait_s=LOCK_WAIT_S)
                except TrainingError as exc:
                    print(f"appliance: cannot recover run {run_id}: {exc.message}", file=sys.stderr)
                    continue
                lock.release()
                self.svc.ledger.append(
                    "run.finished",
                    "service",
                    {
                        "run_id": run_id,
                        "status": "interrupted",
                        "error": "the process that drove this run ended before the run did (killed, or the machine stopped)",
                        "summary": {},
                    },
                )
            elif row["status"] != "interrupted":
                continue
            interrupted.append(run_id)
            if resume:
                try:
                    self._resume(run_id, None)
                except ApplianceError as exc:  # one run that cannot go on must not keep the service down
                    print(f"appliance: cannot resume run {run_id}: {exc.diagnostics()}", file=sys.stderr)
        return interrupted

    def shutdown(self) -> None:
        """Cancel every active run (jobs checkpoint and stop) and wait for the workers."""
        self._closing = True
        with self._lock:
            actives = list(self.active.values())
        for active in actives:
            active.cancel(SHUTDOWN)
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join(timeout=600)

    def wait(self, run_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the run finishes here; its final event (for tests and local mode)."""
        last: dict[str, Any] = {}
        with self._lock:
            active = self.active.get(run_id)
            feed = active.feed if active else self.finished_feeds.get(run_id)
        if feed is None:
            return {"event": "run_finished", "run_id": run_id, "status": run_status(self.svc.ledger, run_id)}
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in feed.follow(0):
            last = event
            if deadline is not None and time.monotonic() > deadline:
                break
        return last

    # -- internals ----------------------------------------------------------------------

    def _rows(self) -> list[dict[str, Any]]:
        return run_rows(self.svc.ledger)

    def _started(self, run_id: str) -> dict[str, Any]:
        return run_started(self.svc.ledger, run_id)

    def _resume(self, run_id: str, caller: Caller | None, *, launch: dict[str, Any] | None = None, job_file: str | None = None) -> dict[str, Any]:
        svc = self.svc
        status = run_status(svc.ledger, run_id)
        with self._lock:
            if run_id in self.active:
                raise ApplianceError(f"run {run_id} is already running", "follow it with `appliance runs follow RUN`, or cancel it with `appliance cancel RUN`")
        if status == "succeeded":
            raise ApplianceError(f"run {run_id} already succeeded", "start a new run with `appliance run` or `appliance train`")
        started = self._started(run_id)
        recipe_event = next((e for e in run_events(svc.ledger, run_id) if e.kind == "artifact.recorded" and e.data["kind"] == "recipe"), None)
        if recipe_event is None:
            raise ApplianceError(f"run {run_id} recorded no recipe artifact, so it cannot be resumed", "start a new run with the recipe")
        digest = recipe_event.data["digest"]
        svc.store.verify(digest, svc.trusted)
        stored = svc.store.path_of(digest)
        text = stored.read_text(encoding="utf-8")
        recipe_path = Path(started.get("recipe_path") or stored)
        loaded = LoadedRecipe(recipe=parse_recipe(text, source=str(recipe_path)), path=recipe_path, digest=digest, text=text)
        finished = finished_stages(svc.ledger, run_id)
        reuse = {s: run_id for s in finished}
        if started.get("data_from"):
            reuse.update({s: started["data_from"] for s in DATA_STAGES})
        opts = LaunchOptions(**launch) if launch else LaunchOptions(**started.get("launch", {}))
        state = RunState(
            run_id=run_id,
            work=svc.home.work_dir / run_id,
            actor=caller.user if caller else "service",
            recipe_text=text,
            recipe_source=str(recipe_path),
            recipe_dir=recipe_path.parent,
            source=Path(started["source"]),
            recipe_name=loaded.recipe.recipe.name,
            recipe_digest=digest,
            context=started.get("context") or {},
            reuse=reuse,
            launch=opts,
            job_file=Path(job_file) if job_file else (Path(started["job_file"]) if started.get("job_file") else None),
        )
        state.work.mkdir(parents=True, exist_ok=True)
        state.artifacts["recipe"] = StoredArtifact(digest=digest, path=stored, size_bytes=recipe_event.data["size_bytes"], files=recipe_event.data["files"])
        svc.ledger.append(
            "run.resumed",
            state.actor,
            {"run_id": run_id, "previous_status": status, "reused_stages": sorted(finished), "by": "restart" if caller is None else "request"},
        )
        return self._enqueue(state, caller or Caller.current())

    def _enqueue(self, state: RunState, caller: Caller) -> dict[str, Any]:
        active = ActiveRun(state, caller)
        with self._lock:
            self.active[state.run_id] = active
        active.feed.push({"event": "queued", "run_id": state.run_id, "position": self._queue.qsize()})
        self._queue.put(state.run_id)
        return {"run_id": state.run_id, "status": "queued"}

    def _work(self) -> None:
        while True:
            run_id = self._queue.get()
            if run_id is None:
                return
            with self._lock:
                active = self.active.get(run_id)
            if active is None:
                continue
            try:
                self._drive(active)
            finally:
                with self._lock:
                    self.active.pop(run_id, None)
                    self.finished_feeds[run_id] = active.feed

    def _drive(self, active: ActiveRun) -> None:
        run, feed, svc = active.state, active.feed, self.svc
        started = time.monotonic()
        lock = RunLock(run.work)
        try:
            lock.acquire(wait_s=LOCK_WAIT_S)
            feed.push({"event": "run_started", "run_id": run.run_id})
            try:
                for stage in stages_for(parse_recipe(run.recipe_text, source=run.recipe_source)):
                    if active.cancel_requested or self._closing:
                        raise RunStopped(
                            f"run {run.run_id} was cancelled by {active.cancelled_by} before stage {stage.name}",
                            f"continue it with `appliance resume {run.run_id}`",
                        )
                    if stage.name in run.reuse:
                        self._reuse_stage(run, stage, run.reuse[stage.name], feed)
                    else:
                        self._run_stage(active, stage, lock)
            finally:
                lock.release()
        except BaseException as exc:  # noqa: BLE001 - every way a run ends is recorded; the service goes on
            message = failure_text(exc)
            status = "stopped" if isinstance(exc, (TrainingStopped, RunStopped, KeyboardInterrupt)) else "failed"
            if status == "stopped" and active.cancelled_by == SHUTDOWN:
                status = "interrupted"  # not the operator's choice: the next service start resumes it
            if not isinstance(exc, ApplianceError):
                traceback.print_exc()
            try:
                svc.ledger.append("run.finished", run.actor, {"run_id": run.run_id, "status": status, "error": message, "summary": {}})
            finally:
                feed.push({"event": "run_finished", "run_id": run.run_id, "status": status, "error": message, "exit_code": getattr(exc, "exit_code", 2)})
            return
        wall = time.monotonic() - started
        # A fine-tuning run whose model the gate did not promote ends with its adapter (or full weights).
        model = run.artifacts.get("model") or run.artifacts.get("adapter") or run.artifacts["tuned"]
        summary = {
            "run_id": run.run_id,
            "recipe_name": run.recipe_name,
            "recipe_digest": run.recipe_digest,
            "stats": run.stats,
            "artifacts": {k: a.digest for k, a in run.artifacts.items()},
            "artifacts_recorded": run.recorded,
            "model_digest": model.digest,
            "model_path": str(model.path),
            "wall_s": wall,
            "provenance_s": run.provenance_s,
            "context": run.context,
            "home": str(svc.home.root),
            "ledger_file": str(svc.home.ledger_file),
            "public_key_file": str(svc.home.public_key_file),
        }
        svc.ledger.append(
            "run.finished",
            run.actor,
            {"run_id": run.run_id, "status": "succeeded", "error": None, "summary": {"wall_s": round(wall, 3), "model": model.digest}},
        )
        feed.push({"event": "run_finished", "run_id": run.run_id, "status": "succeeded", "error": None, "summary": jsonable(summary)})

    def _reuse_stage(self, run: RunState, stage: Stage, from_run: str, feed: RunFeed) -> None:
        """Take a stage's recorded, verified outputs from ``from_run`` instead of running it."""
        svc = self.svc
        finished = run_event(svc.ledger, "stage.finished", from_run, stage=stage.name)
        if finished is None:
            raise ApplianceError(
                f"run {from_run} has no finished {stage.name} stage to reuse",
                "pick a run whose data stages finished (see `appliance runs show RUN`)",
            )
        feed.push({"event": "stage_started", "stage": stage.name, "title": f"{stage.title} (from {from_run})"})
        reused: dict[str, str] = {}
        clock = time.perf_counter()
        for d in stage_artifacts(svc.ledger, from_run, stage.name):
            if d.get("store_path") is None:
                # An input recorded where it lies (a corpus file, a base model's file), not copied.
                if d["kind"] == "source" and not d["meta"].get("skipped"):
                    run.sources.append((d["name"], d["digest"]))
                continue
            out_name = d["name"].split("/", 1)[1]
            svc.store.verify(d["digest"], svc.trusted)
            run.artifacts[out_name] = StoredArtifact(digest=d["digest"], path=svc.store.path_of(d["digest"]), size_bytes=d["size_bytes"], files=d["files"])
            reused[out_name] = d["digest"]
        run.stats[stage.name] = finished.data["stats"]
        if from_run != run.run_id:
            svc.ledger.append("stage.reused", run.actor, {"run_id": run.run_id, "stage": stage.name, "from_run": from_run, "artifacts": reused})
        run.provenance_s += time.perf_counter() - clock
        feed.push({"event": "stage_finished", "stage": stage.name, "stats": jsonable(run.stats[stage.name])})

    def _run_stage(self, active: ActiveRun, stage: Stage, lock: RunLock) -> None:
        run, feed, svc = active.state, active.feed, self.svc
        work = run.work / stage.name
        work.mkdir(parents=True, exist_ok=True)
        feed.push({"event": "stage_started", "stage": stage.name, "title": stage.title})

        def progress(done: int, total: int, fields: dict[str, Any]) -> None:
            feed.push({"event": "progress", "stage": stage.name, "done": done, "total": total, "fields": jsonable(fields)})

        # Each text- or token-holding output gets its own data key; the rest of the stage's
        # scratch files one more, forgotten when the stage finishes (so they become noise); an
        # attempt that did not finish leaves it to its relaunch, in memory (`_scratch`).
        seal = {name: svc.datakeys.new() for name in stage.kinds if name in SEALED_OUTPUTS}
        if seal:
            with self._lock:
                held = self._scratch.pop((run.run_id, stage.name), None)
            seal["*"] = held if held is not None and sealed.has_key(held) else svc.datakeys.new()
        finished = False
        try:
            if stage.name in ("train", "finetune"):
                # Training jobs are followed as they run: checkpoints recorded as they appear.
                trainer = train_stage if stage.name == "train" else finetune_stage
                result = trainer(
                    parse_recipe(run.recipe_text, source=run.recipe_source), self._paths(run), work, progress, self._train_context(active, lock, stage.name)
                )
            else:
                result = self._job_stage(active, stage, work, progress, lock, seal)
            clock = time.perf_counter()
            events = self.recorder.stage_events(run, stage, result, seal=seal)
            finished = True
        except BaseException as exc:
            message = failure_text(exc)
            # A stop on request (with a checkpoint to resume from) is not a failure: say which it was.
            kind = "stage.stopped" if isinstance(exc, (TrainingStopped, RunStopped, KeyboardInterrupt)) else "stage.failed"
            svc.ledger.append(kind, run.actor, {"run_id": run.run_id, "stage": stage.name, "error": message})
            feed.push({"event": "stage_failed", "stage": stage.name, "message": message, "stopped": kind == "stage.stopped"})
            raise
        finally:
            for name, key_id in seal.items():
                if name == "*" and not finished:
                    with self._lock:
                        self._scratch[(run.run_id, stage.name)] = key_id  # for the relaunch's task journal
                    continue
                svc.datakeys.discard(key_id)  # the bound ones stay
        svc.ledger.append_many(events)
        run.provenance_s += time.perf_counter() - clock
        run.recorded += sum(1 for kind, _, _ in events if kind == "artifact.recorded")
        run.stats[stage.name] = result.stats
        feed.push({"event": "stage_finished", "stage": stage.name, "stats": jsonable(result.stats)})

    def _job_context(self, run: RunState, stage: Stage) -> dict[str, Any]:
        """What a stage needs from the service beyond its inputs: the run's provenance for the
        model card; the keys it trusts for a base model (its own packaged models are valid bases)."""
        if stage.name == "package":
            return self.recorder.provenance(run)
        if stage.name == "base":
            recipe = parse_recipe(run.recipe_text, source=run.recipe_source)
            return {"trusted_keys": [str(self.svc.home.public_key_file)], "base_path": self._stored_base(recipe.finetune.base)}
        return {}

    def _stored_base(self, base: str) -> str | None:
        """The store path of a ``model:DIGEST`` base, after verifying the stored copy; else None."""
        if not base.startswith("model:"):
            return None
        digest = resolve_digest(self.svc.ledger, base.removeprefix("model:"), kind="model")
        verify_stored(self.svc, digest, self.svc.trusted)
        return str(self.svc.store.path_of(digest))

    def _paths(self, run: RunState) -> dict[str, Path]:
        return {k: a.path for k, a in run.artifacts.items()}

    def _job_stage(self, active: ActiveRun, stage: Stage, work: Path, progress: Any, lock: RunLock, seal: dict[str, str]) -> StageResult:
        """Run one data/evaluate/package stage as a child job and return what it reported."""
        run = active.state
        spec = {
            "op": "stage",
            "stage": stage.name,
            "recipe_text": run.recipe_text,
            "recipe_source": run.recipe_source,
            "artifacts": {k: str(v) for k, v in self._paths(run).items()},
            "source": str(run.source),
            "work": str(work / "out"),
            "provenance": self._job_context(run, stage),
            "seal": seal,  # key ids only: the keys travel in the job's environment
        }
        env = self.svc.datakeys.env_for([a.digest for a in run.artifacts.values()], list(seal.values()))
        job = Job(JOB_MODULE, spec, work / "job", lock=lock, env=env)
        result: dict[str, Any] = {}

        def on_event(event: dict[str, Any]) -> None:
            if event["event"] == "progress":
                progress(int(event["done"]), int(event["total"]), event.get("fields") or {})
            elif event["event"] == "result":
                result.update(event)

        active.set_job(job)
        try:
            outcome = job.run(on_event)
        finally:
            active.set_job(None)
            for refused in job.refusals():  # what the job's egress guard stopped, signed into the ledger
                self.svc.ledger.append("egress.refused", run.actor, {"run_id": run.run_id, "stage": stage.name, **refused})
        if outcome.last("stopped") is not None or (outcome.cancelled and outcome.returncode != 0):
            raise RunStopped(
                f"stage {stage.name} of run {run.run_id} was cancelled by {active.cancelled_by}", f"continue the run with `appliance resume {run.run_id}`"
            )
        error = outcome.last("error")
        if outcome.returncode != 0 or not result:
            message = error["message"] if error else failure_message(job.work, job.log_file, outcome.returncode)
            raise StageFailed(f"stage {stage.name} failed: {message}", failure_hint(run, (error or {}).get("type", ""), job.log_file, stage.name))
        return StageResult(
            outputs={k: Path(v) for k, v in result["outputs"].items()},
            stats=result.get("stats") or {},
            metrics=result.get("metrics") or [],
            inputs=result.get("inputs") or [],
            skipped=result.get("skipped") or [],
        )

    def _train_context(self, active: ActiveRun, lock: RunLock, stage: str = "train") -> StageContext:
        run, svc = active.state, self.svc

        def note(kind: str, data: dict[str, Any]) -> None:
            clock = time.perf_counter()
            body = jsonable({"run_id": run.run_id, "stage": stage, **data})
            if kind == "metrics.recorded":
                body["points"] = [p for p in body["points"] if isinstance(p.get("value"), (int, float))]
            svc.ledger.append(kind, run.actor, body)
            run.provenance_s += time.perf_counter() - clock

        def charge(seconds: float) -> None:
            run.provenance_s += seconds

        return StageContext(
            run_id=run.run_id,
            provenance={},
            recipe_dir=run.recipe_dir,
            note=note,
            checkpoint_record=lambda step: checkpoint_saved(svc.ledger, run.run_id, step),
            launch=run.launch,
            job_file=run.job_file,
            lock=lock,
            set_job=active.set_job,
            cancelled_by=lambda: active.cancelled_by,
            charge=charge,
            env=svc.datakeys.env_for([a.digest for a in run.artifacts.values()]),
        )


class StageFailed(ApplianceError):
    """A stage's job failed: its own message, and the log to read."""


# A run keeps the recipe it recorded and, past ingest, the data it read: resuming re-runs the
# failed stage on both, so a recipe error, or a data error after ingest, fails the same way again.
_RECIPE_ERRORS = frozenset({"ConfigError"})
_DATA_ERRORS = frozenset({"DataError"})


def failure_hint(run: RunState, error_type: str, log_file: Path, stage: str = "") -> str:
    """What to do after a stage failed: a new run when the recipe (or the data it was given) is at fault, else resume."""
    new_run = f"start a new run with `appliance run {run.recipe_source}`"
    if error_type in _RECIPE_ERRORS:
        return f"the recipe is at fault, and run {run.run_id} keeps the recipe it recorded, so resuming would fail the same way: fix {run.recipe_source} as the message says and {new_run}"
    if error_type in _DATA_ERRORS and stage != "ingest":
        return f"run {run.run_id} keeps the recipe and the data it recorded, so resuming would fail the same way: fix the recipe or the corpus as the message says and {new_run}"
    if error_type in _DATA_ERRORS:
        return f"fix the files the message names, then `appliance resume {run.run_id}` reads the corpus again"
    return f"see {log_file}; fix the cause (the machine, a full disk), then `appliance resume {run.run_id}` continues from this stage"


def _launch_options(launch: dict[str, Any] | None, loaded: LoadedRecipe) -> LaunchOptions:
    """Launch options from the request, falling back to the recipe's [distributed] table."""
    given = dict(launch or {})
    dist = loaded.recipe.distributed
    return LaunchOptions(
        nproc_per_node=int(given.get("nproc_per_node") or dist.nproc_per_node),
        nnodes=int(given.get("nnodes") or dist.nnodes),
        node_rank=int(given.get("node_rank") or 0),
        rdzv_endpoint=str(given.get("rdzv_endpoint") or ""),
    )


# The API table's entry points (`appliance.service.api`): the run manager's methods.
def op_start(svc: Any, caller: Caller, **kw: Any) -> dict[str, Any]:
    return svc.runs.start(caller, **kw)  # type: ignore[no-any-return]


def op_list(svc: Any, caller: Caller) -> list[dict[str, Any]]:
    return svc.runs.list(caller)  # type: ignore[no-any-return]


def op_show(svc: Any, caller: Caller, **kw: Any) -> dict[str, Any]:
    return svc.runs.show(caller, **kw)  # type: ignore[no-any-return]


def op_resume(svc: Any, caller: Caller, **kw: Any) -> dict[str, Any]:
    return svc.runs.resume(caller, **kw)  # type: ignore[no-any-return]


def op_cancel(svc: Any, caller: Caller, **kw: Any) -> dict[str, Any]:
    return svc.runs.cancel(caller, **kw)  # type: ignore[no-any-return]


def op_follow(svc: Any, caller: Caller, **kw: Any) -> Iterator[dict[str, Any]]:
    return svc.runs.follow(caller, **kw)  # type: ignore[no-any-return]
