"""Runs: init, demo, run, train, resume, cancel, and `runs list|show|follow`.

Starting a run asks the service to queue it, then follows its events and draws them: a
progress bar per stage on stderr, the summary (or the error) at the end. Ctrl-C or SIGTERM
while following asks the service to cancel the run (training checkpoints first) and keeps
following until it has stopped; a second one stops following and leaves the run to the
service (`appliance runs follow RUN` picks it up again).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.cli.common import connect, emit, home_of, local_mode, note
from keys.errors import ApplianceError
from pipeline.errors import ConfigError


def cmd_init(args: argparse.Namespace) -> int:
    """Create an appliance home: encrypted node key, ledger, store (local; as the service user)."""
    from appliance.service import Caller, Service
    from keys.passphrase import read_passphrase

    home = home_of(args)
    owner = Caller.current()
    if args.owner:
        import pwd

        try:
            owner = Caller.from_uid(pwd.getpwnam(args.owner).pw_uid)
        except KeyError:
            raise ConfigError(f"--owner {args.owner} is not a user on this machine", "give an existing user name (see `getent passwd`)") from None
    passphrase = read_passphrase(purpose=f"protect the new node key in {home.root}", confirm=True)
    with Service.initialise(home.root, passphrase, owner, two_person=not args.single_operator) as svc:
        emit(
            args,
            {"home": str(home.root), "key_id": svc.key.key_id, "root_key_id": svc.trust.root_key_id, "owner": owner.user},
            f"initialised {home.root}\nnode key {svc.key.key_id}\npublic key {home.public_key_file}\n"
            f"root key {svc.trust.root_key_id}\n  {home.root_key_file} signs the trust store {home.trust_file}; it is needed only to change it:"
            f" move it offline, and install {home.root_public_key_file} as /etc/appliance/root.pub.pem (root-owned) so verification is anchored outside the home\n"
            f"owner {owner.user}"
            + (
                "\nsingle operator: the policy has no two-person rules"
                if args.single_operator
                else "\ntwo-person rules: model.export, data.purge, keys.rotate, keys.revoke and policy.update need a second person's approval"
            ),
        )
    return 0


def _launch(args: argparse.Namespace) -> dict[str, Any]:
    launch = {k: getattr(args, k) for k in ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint") if getattr(args, k, None)}
    return launch


def _abs(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def start_and_follow(args: argparse.Namespace, *, create: bool = False, **request: Any) -> int:
    """Ask the service to run (or resume) and follow the run to its end."""
    with connect(args, create=create) as client:
        resume = request.pop("resume", None)
        accepted = client.call("run.resume", run=resume, **request) if resume else client.call("run.start", **request)
        return follow(args, client, accepted["run_id"])


def follow(args: argparse.Namespace, client: Any, run_id: str) -> int:
    """Draw a run's events until it finishes; Ctrl-C cancels it, a second one detaches."""
    from appliance.cli.reporting import RichReporter

    reporter = RichReporter()
    final: dict[str, Any] | None = None
    cancelled = False
    since = 0
    try:
        while final is None:
            try:
                for event in client.stream("run.events", run=run_id, since=since):
                    if "seq" in event:  # resume from here if this stream is cut
                        since = event["seq"] + 1
                    final = _draw(reporter, event)
                    if final is not None:
                        break
            except KeyboardInterrupt:
                if cancelled:
                    reporter.close()
                    note(f"stopped following run {run_id}; the service goes on with the cancel (`appliance runs follow {run_id}`)")
                    return 130
                cancelled = True
                note(f"cancelling run {run_id} (training saves a checkpoint first; Ctrl-C again to stop following)…")
                client.call("run.cancel", run=run_id)
    finally:
        reporter.close()
    return _finish(args, final, run_id)


def _draw(reporter: Any, event: dict[str, Any]) -> dict[str, Any] | None:
    kind = event["event"]
    if kind == "stage_started":
        reporter.stage_started(event["stage"], event["title"])
    elif kind == "progress":
        reporter.progress(int(event["done"]), int(event["total"]), event.get("fields") or {})
    elif kind == "stage_finished":
        reporter.stage_finished(event["stage"], event.get("stats") or {})
    elif kind == "stage_failed":
        reporter.stage_failed(event["stage"], event["message"])
    elif kind == "queued" and event.get("position"):
        note(f"run {event['run_id']} queued behind {event['position']} other run(s)")
    elif kind == "run_finished":
        return event
    return None


def _finish(args: argparse.Namespace, final: dict[str, Any], run_id: str) -> int:
    from appliance.cli.summary import render_summary

    status = final.get("status")
    if status == "succeeded" and final.get("summary"):
        payload, text = render_summary(final["summary"], local=local_mode(args))
        emit(args, payload, text)
        return 0
    if status == "succeeded":
        emit(args, {"run_id": run_id, "status": status}, f"run {run_id} succeeded")
        return 0
    error = final.get("error") or status
    if args.json:
        print(json.dumps({"run_id": run_id, "status": status, "error": error}, indent=2))
    print(f"error: run {run_id} {status}: {error}", file=sys.stderr)
    return 130 if status == "stopped" else int(final.get("exit_code") or 2)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a recipe (TOML) through every stage and record each artifact in the ledger."""
    return start_and_follow(args, recipe=_abs(args.recipe), source=_abs(args.source))


def cmd_train(args: argparse.Namespace) -> int:
    """Train on the shards of an earlier run (--data) or from scratch, on this node or several.

    Node 0 runs the service and rank 0; every other node joins with `--join JOBFILE`, where
    JOBFILE is the --job-file node 0 writes on storage all nodes share.
    """
    if args.join:
        from appliance.jobs.launch import LaunchOptions
        from appliance.jobs.runner import join_job

        opts = LaunchOptions(nproc_per_node=args.nproc_per_node or 1, nnodes=args.nnodes or 1, node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint or "")
        return join_job(Path(args.join), opts, timeout_s=args.join_timeout)
    if not args.recipe:
        raise ConfigError(
            "appliance train needs a RECIPE (or --join JOBFILE on nodes other than node 0)",
            "give the recipe file, e.g. `appliance train recipe.toml --data RUN`",
        )
    if args.node_rank:
        raise ConfigError(
            f"--node-rank {args.node_rank} runs only with --join",
            "node 0 runs `appliance train RECIPE …`; the others `appliance train --join JOBFILE --node-rank N …`",
        )
    from appliance.jobs.launch import LaunchOptions

    # The flags' own checks first (they name the flag); the recipe fills what is not given.
    LaunchOptions(nproc_per_node=args.nproc_per_node or 1, nnodes=args.nnodes or 1, rdzv_endpoint=args.rdzv_endpoint or "")
    if (args.nnodes or 1) > 1 and not args.job_file:
        raise ConfigError(
            "a multi-node run needs --job-file on storage every node can read",
            "add --job-file /shared/path/job.json and give the same path to --join on the other nodes",
        )
    if args.data and args.source:
        raise ConfigError(
            "--data and --source both name where the data comes from", "give one: --data RUN reuses that run's shards, --source DIR ingests a corpus"
        )
    return start_and_follow(
        args, recipe=_abs(args.recipe), source=_abs(args.source), data_from=args.data, launch=_launch(args) or None, job_file=_abs(args.job_file)
    )


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a stopped, failed or interrupted run: finished stages are reused, training resumes
    from its newest checkpoint that verifies against the ledger (a corrupt one is set aside and recorded)."""
    return start_and_follow(args, resume=args.run, launch=_launch(args) or None, job_file=_abs(args.job_file))


def cmd_cancel(args: argparse.Namespace) -> int:
    """Stop a queued or running run (training saves a checkpoint first); `appliance resume RUN` continues it."""
    with connect(args) as client:
        result = client.call("run.cancel", run=args.run)
    emit(args, result, f"cancelling run {result['run_id']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the standard-library corpus and run the packaged demo recipe on it (--finetune: then adapt its model with LoRA)."""
    if getattr(args, "finetune", False):
        return _demo_finetune(args)
    from appliance.demo import demo_request

    if local_mode(args):
        home = home_of(args)
        if home.is_empty():
            home.create_dirs()
        where = home.corpora_dir
    else:
        # The service reads the corpus as the caller could: build it where the caller writes.
        where = Path.cwd() / ".appliance-demo"
    note(f"building the corpus from Python {sys.version.split()[0]}'s standard-library docs…")
    request = demo_request(where)
    if args.recipe:
        request["recipe"] = str(Path(args.recipe).resolve())
    return start_and_follow(args, create=True, **request)


def _demo_model(args: argparse.Namespace) -> str | None:
    """The digest of the newest model a succeeded demo run packaged, if any."""
    from appliance.recipe import load_recipe, packaged_recipe

    name = load_recipe(packaged_recipe("demo")).recipe.recipe.name
    with connect(args, create=True) as client:
        runs = [r["run_id"] for r in client.call("run.list") if r["recipe_name"] == name and r["status"] == "succeeded"]
        models = {m["name"]: m["digest"] for m in client.call("model.list")}
    return next((models[f"{run}/model"] for run in reversed(runs) if f"{run}/model" in models), None)


def _demo_finetune(args: argparse.Namespace) -> int:
    """Adapt the demo's pre-trained model with LoRA on an instruction set built from the standard library."""
    from appliance.demo_finetune import build_instruction_set, write_recipe

    digest = _demo_model(args)
    if digest is None:
        note("no pre-trained demo model in this home yet: running the demo first…")
        args.finetune = False
        code = cmd_demo(args)
        if code != 0:
            return code
        digest = _demo_model(args)
        if digest is None:
            raise ApplianceError("the demo run left no packaged model", "see `appliance runs list` and `appliance runs show latest`")
    where = (home_of(args).corpora_dir if local_mode(args) else Path.cwd() / ".appliance-demo") / "finetune-demo"
    note(f"building the instruction set from Python {sys.version.split()[0]}'s standard library…")
    built = build_instruction_set(where)
    note(f"{built.pairs} training pairs, {built.held_out} held out as tasks; base model sha256:{digest[:16]}…")
    recipe = write_recipe(where, digest)
    context = {"instructions": {"name": "python-stdlib-signatures", "python": sys.version.split()[0], "sha256": built.digest, "pairs": built.pairs}}
    return start_and_follow(args, recipe=str(recipe), context=context)


def cmd_runs_list(args: argparse.Namespace) -> int:
    """Every run: id, recipe, status, who started it."""
    with connect(args) as client:
        rows = client.call("run.list")
    lines = [f"{r['run_id']}  {r['status']:<11} {r['recipe_name']:<20} {r['actor']:<12} {r['started_ts']}" for r in rows] or ["no runs yet"]
    emit(args, rows, "\n".join(lines))
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    """One run: status, error, and each stage's state."""
    with connect(args) as client:
        row = client.call("run.show", run=args.run)
    lines = [f"run {row['run_id']} ({row['recipe_name']}): {row['status']}"]
    if row.get("error"):
        lines.append(f"  error: {row['error']}")
    lines += [f"  {stage:<10} {state}" for stage, state in row["stages"].items()]
    emit(args, row, "\n".join(lines))
    return 0


def cmd_runs_follow(args: argparse.Namespace) -> int:
    """Follow a run's progress until it ends (Ctrl-C cancels it)."""
    with connect(args) as client:
        return follow(args, client, args.run)


def register(sub: Any, add: Any) -> None:
    p = add("init", cmd_init)
    p.add_argument("--owner", help="the user who owns the home (default: you); in serve mode the people who act through the socket")
    p.add_argument("--single-operator", action="store_true", help="a home one person runs alone: the policy leaves out its two-person rules (recorded)")
    p = add("demo", cmd_demo)
    p.add_argument("--recipe", help="run this recipe on the stdlib corpus instead of the packaged demo")
    p.add_argument("--finetune", action="store_true", help="adapt the demo's pre-trained model with LoRA (running the demo first if needed)")
    p = add("run", cmd_run)
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--source", help="corpus folder (overrides [recipe] source)")

    def launch_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nproc-per-node", type=int, default=0, help="processes per node, one per GPU (default: the recipe's distributed.nproc_per_node)")
        p.add_argument("--nnodes", type=int, default=0, help="nodes in the job (default: the recipe's distributed.nnodes)")
        p.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0 to nnodes-1 (node 0 runs the service)")
        p.add_argument("--rdzv-endpoint", help="HOST:PORT of node 0 for a multi-node rendezvous")
        p.add_argument("--job-file", help="where node 0 writes the job spec (shared storage, for --join)")

    p = add("train", cmd_train)
    p.add_argument("recipe", nargs="?", help="recipe TOML file (not with --join)")
    p.add_argument("--data", help="reuse the data stages (ingest … shards) of this run: id, prefix or 'latest'")
    p.add_argument("--source", help="corpus folder (overrides [recipe] source; not with --data)")
    p.add_argument("--join", help="on nodes other than 0: join the job described by this job file")
    p.add_argument("--join-timeout", type=float, default=600.0, help="seconds to wait for the job file (default 600)")
    launch_flags(p)
    p = add("resume", cmd_resume)
    p.add_argument("run", help="run id, unique prefix, or 'latest'")
    launch_flags(p)
    p = add("cancel", cmd_cancel)
    p.add_argument("run", help="run id, unique prefix, or 'latest'")

    runs = sub.add_parser("runs", help="list, show and follow runs").add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    add("list", cmd_runs_list, runs)
    p = add("show", cmd_runs_show, runs)
    p.add_argument("run", help="run id, unique prefix, or 'latest'")
    p = add("follow", cmd_runs_follow, runs)
    p.add_argument("run", help="run id, unique prefix, or 'latest'")
