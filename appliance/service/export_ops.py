"""`appliance export`: a model as a signed bundle for another site (registry/bundle.py), two-person by default.

The service checks the stored model end to end first (as `registry verify` does), builds the
provenance statement from the ledger, takes the ledger excerpt (the lineage's events whole,
every link from the first of them to a freshly signed head), signs with the release key, and
records ``model.exported`` (name, version, digest, the manifest's digest, the approval) before
the first byte leaves. The bundle is streamed as a tar; nothing of it stays in the home.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from appliance.service.caller import Caller
from appliance.service.reads import purge_notice, verify_stored
from appliance.service.registry_ops import resolve_model
from registry.bundle import stream_tar, write_bundle
from registry.provenance import build_statement

CHUNK = 1 << 20
_COLUMNS = ("seq", "ts", "kind", "actor", "body", "prev_hash", "hash", "key_id", "signature")


def _appliance_version() -> str:
    try:
        return metadata.version("sovereign-appliance")
    except metadata.PackageNotFoundError:
        return "unknown"


def _excerpt(svc: Any, digest: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The lineage's artifact events (first record of each digest), the chain from the first to the head, the head."""
    import json

    seqs = [
        int(s)
        for (s,) in svc.ledger.select(
            "SELECT a.seq FROM artifacts a WHERE a.digest = ? OR a.digest IN (SELECT digest FROM ancestors(?)) ORDER BY a.seq", [digest, digest]
        )
    ]
    head = svc.ledger.head()
    rows = svc.ledger.select(f"SELECT {', '.join(_COLUMNS)} FROM events WHERE seq BETWEEN ? AND ? ORDER BY seq", [seqs[0], head["seq"]])
    chain = [{"seq": r[0], "prev_hash": r[5], "hash": r[6], "key_id": r[7], "signature": r[8]} for r in rows]
    wanted = set(seqs)
    excerpt = []
    for r in rows:
        if r[0] in wanted:
            body = json.loads(r[4])
            excerpt.append(
                {
                    "seq": r[0],
                    "ts": body["ts"],
                    "kind": r[2],
                    "actor": r[3],
                    "data": body["data"],
                    "prev_hash": r[5],
                    "hash": r[6],
                    "key_id": r[7],
                    "signature": r[8],
                }
            )
    return excerpt, chain, head


def model_bundle(svc: Any, caller: Caller, *, model: str, approval: str | None = None) -> Iterator[bytes]:
    """The signed bundle of ``model`` (NAME:VERSION, NAME@TAG, NAME or a digest prefix) as a tar stream."""
    found: dict[str, Any] = {}

    def ready() -> None:
        # What must hold for the export to run, checked before an approval is used up on it.
        row = resolve_model(svc, model)
        event = verify_stored(svc, row["digest"], svc.trusted)
        svc.trust.require(event.key_id, "node", at=event.ts)
        found.update(row=row, release=svc.require_release_key())

    svc.authorize(caller, "model.export", model, approval=approval, ready=ready)
    if not found:  # no approval was needed: the same checks, after the decision
        ready()
    row, release = found["row"], found["release"]
    digest = row["digest"]
    statement = build_statement(
        svc.ledger, digest=digest, name=row["name"], version=int(row["version"]), node_key_id=svc.key.key_id, appliance_version=_appliance_version()
    )
    excerpt, chain, head = _excerpt(svc, digest)
    svc.home.work_dir.mkdir(mode=0o700, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="export-", dir=svc.home.work_dir))
    try:
        folder = write_bundle(
            work / "bundle",
            model_dir=svc.store.path_of(digest),
            model={"name": row["name"], "version": int(row["version"]), "kind": row["kind"], "digest": digest},
            release_key=release,
            trust_store_file=svc.home.trust_file,
            statement=statement,
            excerpt=excerpt,
            chain=chain,
            head=head,
            exporter={
                "node_key_id": svc.key.key_id,
                "release_key_id": release.key_id,
                "root_key_id": svc.trust.root_key_id,
                # The stored model card cannot change: a model trained on data purged since says so here.
                **({"notice": notice} if (notice := purge_notice(svc, row["run_id"]) if row.get("run_id") else None) else {}),
            },
            created_at=dt.datetime.now(dt.UTC).isoformat(),
        )
        manifest_digest = hashlib.sha256((folder / "bundle.json").read_bytes()).hexdigest()
        svc.ledger.append(
            "model.exported",
            caller.user,
            {
                "digest": digest,
                "name": row["name"],
                "version": int(row["version"]),
                "bundle_manifest_sha256": manifest_digest,
                "release_key_id": release.key_id,
                "head_seq": head["seq"],
                "destination": f"bundle to {caller.user} (uid {caller.uid})",
                "approval": approval,
            },
        )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return _streamed(folder, work)


def _streamed(folder: Path, work: Path) -> Iterator[bytes]:
    """The tar of the bundle; its folder is removed when the stream ends, whole or not."""
    try:
        yield from stream_tar(folder, CHUNK)
    finally:
        shutil.rmtree(work, ignore_errors=True)


__all__ = ["model_bundle"]
