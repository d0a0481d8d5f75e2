"""`appliance`: the command line. One function per subcommand; its docstring is the help.

Machine output (--json) goes to stdout, progress and diagnostics to stderr. Errors the
appliance raises on purpose become a short message and exit code 2; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import getpass
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from appliance.home import Home, default_home
from keys.errors import ApplianceError


def _identity() -> str:
    # The OS account running the command; the socket service will take it from the kernel.
    return getpass.getuser()


def _home(args: argparse.Namespace) -> Home:
    return Home(Path(args.home).expanduser().resolve() if args.home else default_home().resolve())


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if getattr(args, "json", False) else text)


def cmd_init(args: argparse.Namespace) -> int:
    """Create an appliance home: encrypted node key, ledger, store."""
    from appliance.service import Service
    from keys.keystore import read_passphrase

    home = _home(args)
    passphrase = read_passphrase(purpose=f"protect the new node key in {home.root}", confirm=True)
    with Service.initialise(home.root, passphrase, _identity()) as svc:
        _emit(
            args, {"home": str(home.root), "key_id": svc.key.key_id}, f"initialised {home.root}\nnode key {svc.key.key_id}\npublic key {home.public_key_file}"
        )
    return 0


def _open_service(home: Home, *, create: bool) -> Any:
    from appliance.service import Service
    from keys.keystore import read_passphrase

    if create and home.is_empty():
        return Service.initialise(home.root, read_passphrase(purpose=f"protect the new node key in {home.root}", confirm=True), _identity())
    home.require()
    return Service.open(home.root, read_passphrase(purpose=f"unlock the node key of {home.root}"), _identity())


def _run(args: argparse.Namespace, loaded: Any, source: Path | None, context: dict[str, Any], **options: Any) -> int:
    from appliance.reporting import RichReporter
    from appliance.summary import render_summary

    home = _home(args)
    reporter = RichReporter()
    try:
        with _open_service(home, create=args.command == "demo") as svc:
            if options.get("resume"):
                summary = svc.resume_run(options["resume"], reporter=reporter, launch=options.get("launch"), job_file=options.get("job_file"))
            else:
                summary = svc.run_recipe(loaded, source=source, reporter=reporter, context=context, **options)
    finally:
        reporter.close()
    payload, text = render_summary(summary, home, context)
    _emit(args, payload, text)
    return 0


def _launch(args: argparse.Namespace, dist: Any) -> Any:
    """Launch options from the flags, falling back to the recipe's [distributed] table."""
    from appliance.launcher import LaunchOptions

    return LaunchOptions(
        nproc_per_node=args.nproc_per_node or (dist.nproc_per_node if dist else 1),
        nnodes=args.nnodes or (dist.nnodes if dist else 1),
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint or "",
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train on the shards of an earlier run (--data) or from scratch, on this node or several.

    Node 0 runs the service and rank 0; every other node joins with `--join JOBFILE`, where
    JOBFILE is the --job-file node 0 writes on storage all nodes share.
    """
    if args.join:
        from appliance.launcher import join_job

        return join_job(Path(args.join), _launch(args, None), timeout_s=args.join_timeout)
    if not args.recipe:
        raise ApplianceError(
            "appliance train needs a RECIPE (or --join JOBFILE on nodes other than node 0)",
            "give the recipe file, e.g. `appliance train recipe.toml --data RUN`",
        )
    if args.node_rank:
        raise ApplianceError(
            f"--node-rank {args.node_rank} runs only with --join",
            "node 0 runs `appliance train RECIPE …`; the others `appliance train --join JOBFILE --node-rank N …`",
        )
    from appliance.recipe import load_recipe

    loaded = load_recipe(Path(args.recipe))
    launch = _launch(args, loaded.recipe.distributed)
    job_file = Path(args.job_file).resolve() if args.job_file else None
    if launch.nnodes > 1 and job_file is None:
        raise ApplianceError(
            "a multi-node run needs --job-file on storage every node can read",
            "add --job-file /shared/path/job.json and give the same path to --join on the other nodes",
        )
    if args.data and args.source:
        raise ApplianceError(
            "--data and --source both name where the data comes from", "give one: --data RUN reuses that run's shards, --source DIR ingests a corpus"
        )
    data_from = None
    if args.data:
        from appliance.datasets import resolve_run

        data_from = resolve_run(_home(args), args.data)
    source = Path(args.source).resolve() if args.source else None
    return _run(args, loaded, source, {}, data_from=data_from, launch=launch, job_file=job_file)


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a stopped or failed run: finished stages are reused, training resumes from its
    newest checkpoint that verifies against the ledger (a corrupt one is set aside and recorded)."""
    from appliance.datasets import resolve_run

    run_id = resolve_run(_home(args), args.run)
    launch = _launch(args, None) if (args.nproc_per_node or args.nnodes) else None
    job_file = Path(args.job_file).resolve() if args.job_file else None
    return _run(args, None, None, {}, resume=run_id, launch=launch, job_file=job_file)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a recipe (TOML) through every stage and record each artifact in the ledger."""
    from appliance.recipe import load_recipe

    loaded = load_recipe(Path(args.recipe))
    return _run(args, loaded, Path(args.source).resolve() if args.source else None, {})


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the standard-library corpus and run the packaged demo recipe on it."""
    from appliance.demo import build_stdlib_corpus
    from appliance.recipe import load_recipe, packaged_recipe

    home = _home(args)
    loaded = load_recipe(Path(args.recipe) if args.recipe else packaged_recipe("demo"))
    if home.is_empty():
        home.create_dirs()
    print(f"building the corpus from Python {sys.version.split()[0]}'s standard-library docs…", file=sys.stderr)
    corpus = build_stdlib_corpus(home.corpora_dir / f"python-{sys.version.split()[0]}-stdlib-docs")
    context = {"corpus": {"name": "python-stdlib-docs", "python": corpus.python, "sha256": corpus.digest, "documents": corpus.documents, "bytes": corpus.bytes}}
    return _run(args, loaded, corpus.path, context)


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    """Recompute the ledger's hash chain and signatures and check the signed head."""
    from appliance.audit import verify_ledger

    report = verify_ledger(_home(args), head=Path(args.head) if args.head else None, keys=[Path(k) for k in args.trusted_key])
    payload = {"ok": True, "events": report.events, "last_seq": report.last_seq, "last_hash": report.last_hash, "head_checked": report.head_checked}
    _emit(
        args,
        payload,
        f"ledger OK: {report.events} events, chain and signatures verified, head seq {report.last_seq} {report.last_hash[:16]}…"
        + ("" if report.head_checked else " (no signed head checked)"),
    )
    return 0


def cmd_ledger_query(args: argparse.Namespace) -> int:
    """Run one read-only SELECT over the ledger (views: events, artifacts, lineage, runs, …)."""
    from appliance.audit import query

    columns, rows = query(_home(args), args.sql)
    if args.json:
        print(json.dumps([dict(zip(columns, r)) for r in rows], indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    Console().print(table)
    return 0


def cmd_ledger_head(args: argparse.Namespace) -> int:
    """Print (or copy to --out) the signed ledger head, to keep outside the appliance."""
    home = _home(args)
    home.require()
    text = home.head_file.read_text()
    if args.out:
        Path(args.out).write_text(text)
        print(f"signed head written to {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_artifact_list(args: argparse.Namespace) -> int:
    """List recorded artifacts (optionally of one kind)."""
    from appliance.audit import query

    where = ""
    if args.kind:
        if not args.kind.replace("-", "").isalnum():
            raise ApplianceError(f"'{args.kind}' is not an artifact kind", "use e.g. model, dataset, checkpoint")
        where = f"WHERE kind = '{args.kind}'"
    columns, rows = query(_home(args), f"SELECT digest, kind, name, size_bytes, run_id FROM artifacts {where} ORDER BY seq")
    if args.json:
        print(json.dumps([dict(zip(columns, r)) for r in rows], indent=2))
    else:
        for digest, kind, name, size, _run in rows:
            print(f"{digest}  {kind:<15} {size:>12}  {name}")
    return 0


def cmd_artifact_verify(args: argparse.Namespace) -> int:
    """Check a stored artifact against its digest and signature."""
    from appliance.audit import resolve_digest, verify_artifact

    home = _home(args)
    digest = resolve_digest(home, args.digest)
    event = verify_artifact(home, digest, keys=[Path(k) for k in args.trusted_key])
    _emit(
        args,
        {"ok": True, "digest": digest, "kind": event.data["kind"], "name": event.data["name"], "seq": event.seq},
        f"artifact {digest} OK: content matches its digest, its signature file verifies, "
        f"and it is recorded at ledger seq {event.seq} ({event.data['kind']} {event.data['name']})",
    )
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    """List packaged, signed models."""
    args.kind = "model"
    return cmd_artifact_list(args)


def cmd_model_export(args: argparse.Namespace) -> int:
    """Export a signed model (with its public key) for another site."""
    from appliance.audit import resolve_digest

    home = _home(args)
    digest = resolve_digest(home, args.model, kind="model")
    with _open_service(home, create=False) as svc:
        out = svc.export_model(digest, Path(args.out))
    command = f"model_signing verify key {out}/model --signature {out}/model/model.sig --public_key {out}/signer.pub.pem"
    _emit(args, {"digest": digest, "path": str(out), "verify": command}, f"exported {digest} to {out}\nverify with:\n  {command}")
    return 0


def cmd_model_verify(args: argparse.Namespace) -> int:
    """Verify a model directory's model-signing signature; names the file that differs."""
    from registry.modelsig import verify_model_dir

    model_dir = Path(args.dir)
    beside = model_dir.parent / "signer.pub.pem"  # where `model export` puts it
    if args.public_key:
        key = Path(args.public_key)
    else:
        key = beside if beside.is_file() else _home(args).public_key_file
    verify_model_dir(model_dir, key)
    _emit(args, {"ok": True, "model": str(model_dir), "public_key": str(key)}, f"model {model_dir} OK: signature by {key} verifies every file")
    return 0


def cmd_data_card(args: argparse.Namespace) -> int:
    """Show a run's dataset card: sources, drops per filter, PII counts, duplicates, tokens."""
    from appliance.datasets import dataset_card

    card, markdown = dataset_card(_home(args), args.run, keys=[Path(k) for k in args.trusted_key])
    _emit(args, card, markdown)
    return 0


def cmd_data_dropped(args: argparse.Namespace) -> int:
    """List sample documents a curation filter dropped in a run (e.g. --filter c4)."""
    from appliance.datasets import dropped_documents

    if args.limit < 1:
        raise ApplianceError(f"--limit must be at least 1, got {args.limit}", "pass e.g. --limit 5")
    run_id, rows, totals = dropped_documents(
        _home(args), args.run, filter_name=args.filter, rule=args.rule, limit=args.limit, keys=[Path(k) for k in args.trusted_key]
    )
    if args.json:
        print(json.dumps({"run_id": run_id, "dropped": totals, "samples": rows}, indent=2, ensure_ascii=False))
        return 0
    lines = [f"run {run_id}: documents dropped by " + (args.filter or "every filter")]
    lines += [f"  {name:<36} {count:>8}" for name, count in totals.items()]
    if not rows:
        lines.append("no samples kept for that choice (clean.dropped_samples = 0, or the rule dropped nothing)")
    for row in rows:
        text = row["text"] if args.full else " ".join(row["text"].split())[:300]
        detail = f" ({row['detail']})" if row["detail"] else ""
        lines += ["", f"doc {row['doc_id']}  {row['source']}  {row['filter']}.{row['rule']}{detail}", f"  {text}"]
    print("\n".join(lines))
    return 0


def cmd_data_skipped(args: argparse.Namespace) -> int:
    """List the source files a run's ingest skipped (whole or in part), with the reasons."""
    from appliance.datasets import skipped_files

    run_id, rows = skipped_files(_home(args), args.run)
    if args.json:
        print(json.dumps({"run_id": run_id, "skipped": rows}, indent=2))
        return 0
    lines = [f"run {run_id}: {len(rows)} source files lost documents at ingest"]
    for row in rows:
        what = "whole file" if row["whole_file"] else f"{row['records_skipped']} records"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(row["reasons"].items()))
        lines.append(f"  {row['path']}: {what} ({reasons})")
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Sovereign LLM training appliance: dataset to signed model, proven in a ledger.")
    parser.add_argument("--home", help="appliance home (default: $APPLIANCE_HOME or ~/.local/share/appliance)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Any, parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=fn.__doc__, description=fn.__doc__)
        p.set_defaults(fn=fn)
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        # Accept --home after the subcommand too; SUPPRESS keeps a top-level --home intact.
        p.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return p

    add("init", cmd_init)
    p = add("demo", cmd_demo)
    p.add_argument("--recipe", help="run this recipe on the stdlib corpus instead of the packaged demo")
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

    ledger = sub.add_parser("ledger", help="verify and query the provenance ledger").add_subparsers(dest="ledger_command", required=True, metavar="COMMAND")
    p = add("verify", cmd_ledger_verify, ledger)
    p.add_argument("--head", help="signed head file kept outside the appliance (default: the home's)")
    p.add_argument("--trusted-key", action="append", default=[], help="public key PEM to trust (repeatable; default: the home's node key)")
    p = add("query", cmd_ledger_query, ledger)
    p.add_argument("sql", help="one SELECT statement")
    p = add("head", cmd_ledger_head, ledger)
    p.add_argument("--out", help="write the head to this file")

    art = sub.add_parser("artifact", help="list and verify stored artifacts").add_subparsers(dest="artifact_command", required=True, metavar="COMMAND")
    p = add("list", cmd_artifact_list, art)
    p.add_argument("--kind", help="only this kind (source, dataset, tokenizer, token-shards, checkpoint, model, …)")
    p = add("verify", cmd_artifact_verify, art)
    p.add_argument("digest", help="digest or unique prefix")
    p.add_argument("--trusted-key", action="append", default=[], help="public key PEM to trust")

    data = sub.add_parser("data", help="a run's dataset card, dropped documents and skipped files").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND"
    )
    p = add("card", cmd_data_card, data)
    p.add_argument("run", help="run id, unique prefix, or 'latest'")
    p.add_argument("--trusted-key", action="append", default=[], help="public key PEM to trust")
    p = add("dropped", cmd_data_dropped, data)
    p.add_argument("run", help="run id, unique prefix, or 'latest'")
    p.add_argument("--filter", help="only this filter (gopher_repetition, gopher_quality, c4, fineweb, pii, dedup, clean)")
    p.add_argument("--rule", help="only this rule of the filter (e.g. curly_bracket)")
    p.add_argument("--limit", type=int, default=10, help="at most this many samples (default 10)")
    p.add_argument("--full", action="store_true", help="print whole documents, not the first 300 characters")
    p.add_argument("--trusted-key", action="append", default=[], help="public key PEM to trust")
    p = add("skipped", cmd_data_skipped, data)
    p.add_argument("run", help="run id, unique prefix, or 'latest'")

    model = sub.add_parser("model", help="list, export and verify signed models").add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    add("list", cmd_model_list, model)
    p = add("export", cmd_model_export, model)
    p.add_argument("model", help="model digest or unique prefix")
    p.add_argument("--out", required=True, help="new folder for the bundle")
    p = add("verify", cmd_model_verify, model)
    p.add_argument("dir", help="model directory holding model.sig")
    p.add_argument("--public-key", help="signer's public key PEM (default: signer.pub.pem beside the dir, else the home's)")

    from appliance.cli_extra import register

    register(sub)
    return parser


def _cancel(signum: int, frame: Any) -> None:
    # SIGTERM is how operators and job managers cancel; unwind like Ctrl-C so the service
    # records the run as cancelled instead of leaving it "running" forever.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _cancel)
    try:
        return int(args.fn(args))
    except ApplianceError as exc:
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
