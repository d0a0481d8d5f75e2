"""`appliance purge`: erase data from the home by cryptographic erase, verify it, certify it.

A target is an artifact (digest or prefix), ``source:PATH|DIGEST`` (a source file that runs
ingested) or ``run:RUN`` (a run's intermediates: its text and token artifacts). Its *impact*
comes from the lineage: every artifact derived from it. Artifacts that hold the data itself
(raw documents, rejects, dataset, dropped samples, shards, fine-tune examples) are always
purged with it; every other descendant (tokenizer, checkpoints, models, reports, cards) is
kept and marked "derived from purged data" unless the operator names it with ``also`` (or
``also=all``). A model trained on the data cannot be un-trained: keeping it keeps what it
learned.

The purge, in an order that a kill -9 can interrupt anywhere:

1. ``purge.started`` is recorded (the plan: artifacts, digests, sizes, data key ids) —
   before any key is touched, so keys are never destroyed with the ledger unaware;
2. known markers are taken from the plaintext (byte windows of each file, text windows of each
   document, the operator's own strings), kept in memory only;
3. the data keys are destroyed (table entry overwritten, fsynced, unlinked; dropped from memory);
4. the store objects, their signatures, the stage work folders that made them and any file in
   the home still sealed under a destroyed key are overwritten, fsynced and unlinked;
5. verification: no table entry or in-memory copy of any destroyed key; no file in the home
   sealed under one opens; no marker is found in any file of the home;
6. the certificate is signed by the node key, written to ``purge/<id>.json`` and recorded with
   ``purge.completed``. The purged artifacts' rows stay; their status becomes ``purged``.

A service that starts with a ``purge.started`` and no end finishes steps 3-6 (markers are gone
with the process: the certificate says so) before it serves anything.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from appliance.service.caller import Caller
from appliance.service.datakeys import SEALED_KINDS
from appliance.service.resolve import resolve_digest, resolve_run
from keys import sealed
from keys.errors import ApplianceError
from keys.files import atomic_write_json, overwrite_and_unlink
from registry.errors import StoreError
from registry.purge_cert import sign_certificate

ACTION = "data.purge"
MARKER_BYTES = 24
MARKERS_PER_FILE = 8
TEXT_MARKER_CHARS = 40
TEXT_MARKERS_PER_ARTIFACT = 16


class PurgeError(ApplianceError):
    """A purge cannot be planned or carried out."""


class ArtifactPurged(StoreError):
    """The artifact was purged: its bytes are gone by design."""


# -- the plan ------------------------------------------------------------------------------


@dataclass
class Plan:
    target: str
    label: str
    purge: list[dict[str, Any]] = field(default_factory=list)
    keep: list[dict[str, Any]] = field(default_factory=list)
    exports: list[dict[str, Any]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "label": self.label,
            "purge": self.purge,
            "keep": self.keep,
            "exports": self.exports,
            "runs": self.runs,
            "sources": self.sources,
            "crypto_erasable": all(a["sealed"] for a in self.purge if a["stored"]),
            "warnings": self.warnings(),
        }

    def warnings(self) -> list[str]:
        out = []
        plain = [a for a in self.purge if a["stored"] and not a["sealed"]]
        if plain:
            out.append(
                f"{len(plain)} artifact(s) were stored before encryption at rest and are not crypto-erasable: "
                "they are overwritten and unlinked, which flash and copy-on-write file systems may not honour"
            )
        models = [a for a in self.keep if a["kind"] in ("model", "finetuned-model", "adapter", "checkpoint")]
        if models:
            out.append(
                f"{len(models)} model(s)/checkpoint(s) trained on this data are kept: a model cannot be un-trained; "
                "they stay marked 'derived from purged data' (purge them too with --also DIGEST or --also all)"
            )
        if self.exports:
            out.append(f"{len(self.exports)} export(s) of derived models left this site: purge cannot reach them; tell their recipients")
        return out


def split_subject(raw: str) -> tuple[str, list[str]]:
    """``TARGET [also=D1,D2|all]`` -> (target, also)."""
    parts = str(raw).split()
    if not parts:
        raise PurgeError("no purge target given", "name an artifact digest, source:PATH or run:RUN")
    also: list[str] = []
    for extra in parts[1:]:
        if not extra.startswith("also="):
            raise PurgeError(f"purge subject {raw!r}: unknown part {extra!r}", "the subject is TARGET or 'TARGET also=DIGEST,…|all'")
        also += [a for a in extra.removeprefix("also=").split(",") if a]
    return parts[0], also


def subject_of(target: str, also: list[str] | None) -> str:
    """The purge as one subject string (what an approval names)."""
    also = sorted(set(also or []))
    return target + (f" also={','.join(also)}" if also else "")


def _row(svc: Any, digest: str) -> dict[str, Any] | None:
    rows = svc.ledger.select("SELECT digest, kind, name, size_bytes, files, store_path, run_id, stage FROM artifacts WHERE digest = ?", [digest])
    if not rows:
        return None
    d, kind, name, size, files, store_path, run_id, stage = rows[0]
    key_id = svc.datakeys.key_of(d)
    return {
        "digest": d,
        "kind": kind,
        "name": name,
        "size_bytes": size,
        "files": files,
        "stored": store_path is not None,
        "run_id": run_id,
        "stage": stage,
        "sealed": key_id is not None,
        "key_id": key_id,
    }


def _roots(svc: Any, target: str) -> tuple[str, list[str], list[dict[str, Any]]]:
    """(label, root digests, source files) of a target."""
    if target.startswith("run:"):
        run_id = resolve_run(svc.ledger, target.removeprefix("run:"))
        kinds = ", ".join(f"'{k}'" for k in SEALED_KINDS)
        rows = svc.ledger.select(
            f"SELECT DISTINCT data ->> '$.digest' FROM signed_events WHERE kind = 'artifact.recorded' "
            f"AND data ->> '$.run_id' = ? AND data ->> '$.kind' IN ({kinds})",
            [run_id],
        )
        reused = svc.ledger.select(
            "SELECT DISTINCT unnest(json_extract_string(data, '$.artifacts[*]')) FROM signed_events WHERE kind = 'stage.reused' AND data ->> '$.run_id' = ?",
            [run_id],
        )
        digests = sorted({r[0] for r in rows} | {r[0] for r in reused if r[0] and (_row(svc, r[0]) or {}).get("kind") in SEALED_KINDS})
        if not digests:
            raise PurgeError(f"run {run_id} recorded no text or token artifacts", "see `appliance runs show RUN`")
        return f"the intermediates of run {run_id}", digests, []
    if target.startswith("source:"):
        ref = target.removeprefix("source:")
        # Sources are recorded by their path under the run's source folder; an absolute path
        # names the file through that folder.
        rows = svc.ledger.select(
            "SELECT DISTINCT e.data ->> '$.digest', e.data ->> '$.name', s.data ->> '$.source' FROM signed_events e "
            "JOIN signed_events s ON s.kind = 'run.started' AND s.data ->> '$.run_id' = e.data ->> '$.run_id' "
            "WHERE e.kind = 'artifact.recorded' AND e.data ->> '$.store_path' IS NULL "
            "AND (e.data ->> '$.name' = ? OR concat(s.data ->> '$.source', '/', e.data ->> '$.name') = ? OR starts_with(e.data ->> '$.digest', ?))",
            [ref, ref, ref.lower() if len(ref) >= 8 else "\x00"],
        )
        if not rows:
            raise PurgeError(
                f"no recorded source file is {ref!r}", "give the path as ingest recorded it, its full path, or its sha256 (see `appliance audit derived`)"
            )
        digests = sorted({r[0] for r in rows})
        paths = sorted({(r[0], str(Path(r[2]) / r[1])) for r in rows})
        sources = [{"digest": d, "path": p, "in_home": _in_home(svc, p)} for d, p in paths]
        return f"source file {ref}", digests, sources
    digest = resolve_digest(svc.ledger, target)
    return f"artifact {digest[:16]}…", [digest], []


def _in_home(svc: Any, path: str) -> bool:
    try:
        return Path(path).resolve().is_relative_to(svc.home.root.resolve())
    except OSError:
        return False


def plan(svc: Any, target: str, also: list[str]) -> Plan:
    label, roots, sources = _roots(svc, target)
    found: dict[str, dict[str, Any]] = {}
    for root in roots:
        for (digest,) in svc.ledger.select("SELECT digest FROM descendants(?)", [root]):
            found.setdefault(digest, {})
        if (_row(svc, root) or {}).get("stored"):
            found.setdefault(root, {"root": True})
    purged_now = purged_digests(svc)
    everything = "all" in also
    wanted = {resolve_digest(svc.ledger, a) for a in also if a != "all"}
    out = Plan(target=target, label=label, sources=sources)
    for digest in sorted(found):
        row = _row(svc, digest)
        if row is None or digest in purged_now:
            continue
        if row["kind"] in SEALED_KINDS or found[digest].get("root") or everything or digest in wanted:
            out.purge.append(row)
        else:
            out.keep.append(row)
    stray = wanted - {a["digest"] for a in out.purge}
    if stray:
        raise PurgeError(f"--also names {', '.join(d[:16] + '…' for d in sorted(stray))}, which does not derive from {label}", "see the impact list")
    if not out.purge:
        raise PurgeError(f"nothing of {label} is left in the home to purge (already purged, or never stored)", "see `appliance purges list`")
    digests = [a["digest"] for a in out.purge + out.keep]
    if digests:
        marks = ",".join("?" * len(digests))
        out.exports = [
            {"seq": s, "ts": ts, "digest": d, "destination": dest}
            for s, ts, d, dest in svc.ledger.select(
                f"SELECT seq, ts, data ->> '$.digest', data ->> '$.destination' FROM signed_events WHERE kind = 'model.exported' AND data ->> '$.digest' IN ({marks})",
                digests,
            )
        ]
    out.runs = sorted({a["run_id"] for a in out.purge + out.keep if a["run_id"]})
    return out


# -- reads ---------------------------------------------------------------------------------


def purged_digests(svc: Any) -> dict[str, dict[str, Any]]:
    """digest -> {purge_id, ts, certificate_sha256} of every purged artifact."""
    rows = svc.ledger.select("SELECT digest, purge_id, ts, certificate_sha256 FROM purged_artifacts")
    return {d: {"purge_id": p, "ts": ts, "certificate_sha256": c} for d, p, ts, c in rows}


def purged_message(svc: Any, digest: str) -> str | None:
    """``purged on … by certificate …`` for a purged artifact, else None."""
    rows = svc.ledger.select("SELECT purge_id, ts FROM purged_artifacts WHERE digest = ?", [digest])
    if not rows:
        return None
    purge_id, ts = rows[0]
    return f"artifact {digest[:16]}… was purged on {ts} by certificate {purge_id}"


def require_not_purged(svc: Any, digest: str) -> None:
    message = purged_message(svc, digest)
    if message is not None:
        raise ArtifactPurged(message, f"its bytes are erased by design; read the certificate with `appliance purges show {message.rsplit(' ', 1)[-1]}`")


def op_impact(svc: Any, caller: Caller, *, target: str, also: list[str] | None = None) -> dict[str, Any]:
    """What a purge of ``target`` would erase and what it would leave marked (nothing is changed)."""
    svc.authorize(caller, "purge.impact", subject_of(target, also))
    p = plan(svc, target, list(also or []))
    return {**p.as_dict(), "subject": subject_of(target, also), "two_person": svc.policy.two_person(ACTION) is not None}


def op_list(svc: Any, caller: Caller) -> list[dict[str, Any]]:
    svc.authorize(caller, "purge.list", "purges")
    rows = svc.ledger.select(
        "SELECT purge_id, target, status, requester, approver, started_ts, finished_ts, artifacts, certificate_sha256 FROM purges ORDER BY started_seq"
    )
    cols = ("purge_id", "target", "status", "requester", "approver", "started", "finished", "artifacts", "certificate_sha256")
    return [dict(zip(cols, r, strict=True)) for r in rows]


def op_show(svc: Any, caller: Caller, *, id: str) -> dict[str, Any]:  # noqa: A002 (the path's name)
    svc.authorize(caller, "purge.show", id)
    rows = svc.ledger.select("SELECT data FROM signed_events WHERE kind = 'purge.completed' AND data ->> '$.purge_id' = ?", [id])
    if not rows:
        raise PurgeError(f"no completed purge {id!r}", "list purges with `appliance purge list`")
    data = json.loads(rows[0][0])
    return {"purge_id": id, "certificate": data["certificate"], "signature": data["signature"], "key_id": data["key_id"], "file": data.get("file")}


# -- the purge -----------------------------------------------------------------------------


def op_purge(
    svc: Any, caller: Caller, *, target: str, also: list[str] | None = None, markers: list[str] | None = None, approval: str | None = None
) -> dict[str, Any]:
    """Purge ``target`` (and ``also``) after the approvals the policy requires; return the certificate."""
    subject = subject_of(target, also)
    svc.authorize(caller, ACTION, subject, approval=approval)
    p = plan(svc, target, list(also or []))
    if approval is not None:
        from appliance.service.approvals import state

        req = state(svc, approval)
        if "purge" in req and (req["purge"] != sorted(a["digest"] for a in p.purge) or req.get("keep") != sorted(a["digest"] for a in p.keep)):
            raise PurgeError(
                f"the impact of {subject!r} changed since request {approval} was approved (artifacts were recorded or purged since)",
                f"request it again: `appliance request data.purge '{subject}'`, and have the new impact approved",
            )
    purge_id = "pg-" + dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)
    approver = _approver(svc, approval)
    svc.runs.begin_purge(purge_id)
    try:
        known, control = _markers(svc, p, markers or [])
        _record_start(svc, caller, purge_id, target, subject, p, approval, approver, markers or [])
        try:
            return _carry_out(svc, purge_id, known, control, resumed=False)
        except (OSError, ApplianceError) as exc:
            # Recorded as started: the keys may be half destroyed, so it must finish, not roll back.
            raise PurgeError(
                f"purge {purge_id} stopped part-way: {exc}",
                "it stays recorded as started and the service finishes it when it next starts: fix the cause, then restart the service",
            ) from exc
    finally:
        svc.runs.end_purge()


def _record_start(svc: Any, caller: Caller, purge_id: str, target: str, subject: str, p: Plan, approval: str | None, approver: Any, markers: list[str]) -> None:
    svc.ledger.append(
        "purge.started",
        caller.user,
        {
            "purge_id": purge_id,
            "target": target,
            "subject": subject,
            "label": p.label,
            "artifacts": p.purge,
            "kept": p.keep,
            "sources": p.sources,
            "runs": p.runs,
            "exports": p.exports,
            "approval": approval,
            "approver": approver,
            "requester": {"user": caller.user, "uid": caller.uid},
            "operator_markers": len(markers),
        },
    )


def _approver(svc: Any, approval: str | None) -> dict[str, Any] | None:
    if approval is None:
        return None
    from appliance.service.approvals import state

    req = state(svc, approval)
    return {"user": req.get("decided_by"), "request": approval, "decided_at": req.get("decided_at")}


def recover(svc: Any) -> list[str]:
    """Finish every purge a killed service left started (steps 3-6); returns their ids."""
    rows = svc.ledger.select("SELECT purge_id FROM purges WHERE status = 'started' ORDER BY started_seq")
    done = []
    for (purge_id,) in rows:
        _carry_out(svc, purge_id, [], {}, resumed=True)
        done.append(purge_id)
    return done


def _started(svc: Any, purge_id: str) -> tuple[str, str, dict[str, Any]]:
    (row,) = svc.ledger.select("SELECT actor, ts, data FROM signed_events WHERE kind = 'purge.started' AND data ->> '$.purge_id' = ?", [purge_id])
    return row[0], row[1], json.loads(row[2])


def _carry_out(svc: Any, purge_id: str, known: list[bytes], control: dict[str, Any], *, resumed: bool) -> dict[str, Any]:
    actor, started_ts, data = _started(svc, purge_id)
    arts = data["artifacts"]
    key_ids = sorted({a["key_id"] for a in arts if a.get("key_id")})
    destroyed = [k for k in key_ids if svc.datakeys.destroy(k)]
    overwritten = 0
    for a in arts:
        overwritten += _erase_object(svc, a["digest"])
    overwritten += _erase_work(svc, arts)
    for src in data.get("sources", []):
        if src.get("in_home") and Path(src["path"]).is_file():
            overwritten += overwrite_and_unlink(Path(src["path"]))
    overwritten += _erase_sealed_leftovers(svc, set(key_ids))
    verification = _verify(svc, key_ids, known, control, resumed=resumed)
    certificate = _certificate(svc, purge_id, actor, started_ts, data, destroyed, overwritten, verification)
    signed = sign_certificate(certificate, svc.key)
    svc.home.purge_dir.mkdir(mode=0o700, exist_ok=True)
    cert_file = svc.home.purge_dir / f"{purge_id}.json"
    atomic_write_json(cert_file, signed, mode=0o600)
    svc.ledger.append(
        "purge.completed",
        actor,
        {
            "purge_id": purge_id,
            "purged": [a["digest"] for a in arts],
            "kept": [a["digest"] for a in data.get("kept", [])],
            "keys_destroyed": key_ids,
            "verification": verification["result"],
            "certificate": certificate,
            "certificate_sha256": signed["certificate_sha256"],
            "signature": signed["signature"],
            "key_id": signed["key_id"],
            "file": str(cert_file),
            "resumed": resumed,
        },
    )
    return {"purge_id": purge_id, "certificate": certificate, "file": str(cert_file), "signature": signed["signature"], "key_id": signed["key_id"]}


def _erase_tree(path: Path) -> int:
    if not path.exists() and not path.is_symlink():
        return 0
    if path.is_file() or path.is_symlink():
        return overwrite_and_unlink(path)
    n = 0
    os.chmod(path, 0o700)
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o700)
        for d in dirs:
            os.chmod(Path(root) / d, 0o700)
        for f in files:
            n += overwrite_and_unlink(Path(root) / f)
    for root, dirs, _files in os.walk(path, topdown=False):
        for d in dirs:
            os.rmdir(Path(root) / d)
    os.rmdir(path)
    return n


def _erase_object(svc: Any, digest: str) -> int:
    obj = svc.store.path_of(digest)
    if obj.exists():
        os.chmod(obj.parent, 0o700)
    return _erase_tree(obj) + _erase_tree(svc.store.sig_path_of(digest))


def _erase_work(svc: Any, arts: list[dict[str, Any]]) -> int:
    """The work folders of the stages that made the purged artifacts (leftovers, scratch, logs)."""
    n = 0
    for run_id, stage in sorted({(a["run_id"], a["stage"]) for a in arts if a.get("run_id") and a.get("stage")}):
        n += _erase_tree(svc.home.work_dir / run_id / stage)
    return n


def _walk_home(svc: Any) -> list[Path]:
    out = []
    for root, _dirs, files in os.walk(svc.home.root):
        out += [Path(root) / f for f in files if not (Path(root) / f).is_symlink()]
    return out


def _erase_sealed_leftovers(svc: Any, key_ids: set[str]) -> int:
    n = 0
    for path in _walk_home(svc):
        try:
            if sealed.header_key_id(path) in key_ids:
                n += overwrite_and_unlink(path)
        except OSError:
            continue
    return n


def _markers(svc: Any, p: Plan, operator: list[str]) -> tuple[list[bytes], dict[str, Any]]:
    """Known pieces of the plaintext, in memory only: what the scan after the purge looks for.

    A control scan first drops pieces that occur in artifacts or home corpora the purge leaves
    alone (the same passage in another source, say): finding those afterwards would prove
    nothing. It looks only there: a piece found in the ledger, a log or a work folder is a leak
    the verification must report, not excuse. How many were dropped, and where they were, goes
    into the certificate. The operator's own strings are never dropped.
    """
    rng = secrets.SystemRandom()
    found: set[bytes] = {m.encode("utf-8") for m in operator if len(m.encode("utf-8")) >= 8}
    for a in p.purge:
        obj = svc.store.path_of(a["digest"])
        if not obj.exists():
            continue
        files = [obj] if obj.is_file() else sorted(f for f in obj.rglob("*") if f.is_file())
        for f in files:
            # The data itself, not a folder's metadata (a shard manifest holds digests found elsewhere).
            if not (sealed.is_sealed(f) or (not a["sealed"] and f.suffix in (".parquet", ".bin"))):
                continue
            with sealed.open_read(f) as fh:
                size = fh.seek(0, 2)
                for _ in range(MARKERS_PER_FILE):
                    if size >= MARKER_BYTES * 4:
                        fh.seek(rng.randrange(0, size - MARKER_BYTES))
                        found |= _byte_windows(fh.read(MARKER_BYTES * 4), rng, 1)
            if f.suffix == ".parquet":
                found |= _text_windows(f, rng)
    for src in p.sources:
        path = Path(src["path"])
        if path.is_file():
            with open(path, "rb") as fh:
                found |= _byte_windows(fh.read(8 << 20), rng, MARKERS_PER_FILE)
    mine = {m.encode("utf-8") for m in operator if len(m.encode("utf-8")) >= 8}
    sampled = sorted(found - mine)
    erased = _to_erase(svc, p)
    shared_in: dict[str, int] = {}
    shared: set[bytes] = set()
    for path, hits in _scan_home(svc, sampled, skip=erased, only=(svc.store.root, svc.home.corpora_dir)):
        shared_in[str(path.relative_to(svc.home.root))] = len(hits)
        shared |= hits
    control = {"sampled": len(sampled), "dropped_as_shared": len(shared), "shared_with": shared_in, "operator_markers": len(mine)}
    return sorted((set(sampled) - shared) | mine), control


def _to_erase(svc: Any, p: Plan) -> set[Path]:
    """Paths the purge erases (folders stand for everything below them)."""
    out = set()
    for a in p.purge:
        out |= {svc.store.path_of(a["digest"]), svc.store.sig_path_of(a["digest"])}
        if a.get("run_id") and a.get("stage"):
            out.add(svc.home.work_dir / a["run_id"] / a["stage"])
    out |= {Path(s["path"]) for s in p.sources if s["in_home"]}
    return out


def _marker_pattern(markers: list[bytes]) -> tuple[re.Pattern[bytes], int] | None:
    if not markers:
        return None
    return re.compile(b"|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True))), max(len(m) for m in markers) - 1


def _markers_in(path: Path, pattern: re.Pattern[bytes] | None, overlap: int = 0) -> tuple[set[bytes], bytes]:
    """The markers in one file (its plain bytes, chunked), and its first 64 bytes (a sealed header, if any)."""
    hits: set[bytes] = set()
    head, tail = b"", b""
    with open(path, "rb") as f:
        if pattern is None:  # no markers to look for: the header is all that is read
            return hits, f.read(sealed.HEADER_SIZE)
        while chunk := f.read(1 << 22):
            if not head:
                head = chunk[: sealed.HEADER_SIZE]
            hits |= set(pattern.findall(tail + chunk))
            tail = chunk[-overlap:] if overlap else b""
    return hits, head


def _scan_home(svc: Any, markers: list[bytes], *, skip: set[Path], only: tuple[Path, ...]) -> Any:
    """(path, the markers found in it) for every file under ``only`` and not under ``skip`` that holds one."""
    compiled = _marker_pattern(markers)
    if compiled is None:
        return
    for path in _walk_home(svc):
        if any(path == s or path.is_relative_to(s) for s in skip) or not any(path.is_relative_to(o) for o in only):
            continue
        try:
            hits, _ = _markers_in(path, *compiled)
        except OSError:
            continue
        if hits:
            yield path, hits


def _byte_windows(data: bytes, rng: Any, count: int) -> set[bytes]:
    out: set[bytes] = set()
    if len(data) < MARKER_BYTES * 2:
        return out
    for _ in range(count * 4):
        if len(out) >= count:
            break
        at = rng.randrange(0, len(data) - MARKER_BYTES)
        window = data[at : at + MARKER_BYTES]
        if len(set(window)) >= 12:  # skip padding and runs: a marker must not occur by chance
            out.add(window)
    return out


def _text_windows(path: Path, rng: Any) -> set[bytes]:
    import pyarrow.parquet as pq

    out: set[bytes] = set()
    with sealed.open_read(path) as fh:
        pf = pq.ParquetFile(fh)
        if "text" not in pf.schema_arrow.names:
            return out
        groups = rng.sample(range(pf.num_row_groups), min(pf.num_row_groups, 4))
        texts = [t for g in groups for t in pf.read_row_group(g, columns=["text"]).column("text").to_pylist() if t and len(t) >= TEXT_MARKER_CHARS * 2]
    for t in rng.sample(texts, min(len(texts), TEXT_MARKERS_PER_ARTIFACT)):
        at = rng.randrange(0, len(t) - TEXT_MARKER_CHARS)
        piece = t[at : at + TEXT_MARKER_CHARS].encode("utf-8")
        if len(set(piece)) >= 12:
            out.add(piece)
    return out


def _verify(svc: Any, key_ids: list[str], known: list[bytes], control: dict[str, Any], *, resumed: bool) -> dict[str, Any]:
    in_table = [k for k in key_ids if svc.datakeys.entry(k).exists()]
    in_memory = [k for k in key_ids if sealed.has_key(k)]
    # One pass over the home: each file's header (sealed under a destroyed key?) and its bytes (markers).
    compiled = _marker_pattern(known) or (None, 0)
    opened = still_sealed = scanned = size = 0
    hits: dict[str, int] = {}
    for path in _walk_home(svc):
        try:
            found, head = _markers_in(path, *compiled)
            size += path.stat().st_size
        except OSError:
            continue
        scanned += 1
        if found:
            hits[str(path.relative_to(svc.home.root))] = len(found)
        if head[: len(sealed.MAGIC)] == sealed.MAGIC and head[8:24].hex() in key_ids:
            still_sealed += 1
            try:
                sealed.SealedReader(path).close()
                opened += 1
            except sealed.SealedDataError:
                pass
    ok = not in_table and not in_memory and opened == 0 and not hits
    return {
        "result": "passed" if ok else "failed",
        "keys_destroyed": len(key_ids),
        "key_table_entries_left": in_table,
        "keys_in_memory_left": in_memory,
        "files_sealed_under_destroyed_keys_left": still_sealed,
        "of_which_decryptable": opened,
        "markers": len(known),
        "marker_scan": (
            "not repeated: the purge was resumed after an interruption and its markers were lost with the process"
            if resumed
            else {"files": scanned, "bytes": size, "files_with_markers": hits, "control": control}
        ),
    }


def _tool_version() -> str:
    try:
        return metadata.version("sovereign-appliance")
    except metadata.PackageNotFoundError:
        return "unknown"


def _certificate(
    svc: Any, purge_id: str, actor: str, started_ts: str, data: dict[str, Any], destroyed: list[str], overwritten: int, verification: dict[str, Any]
) -> dict[str, Any]:
    """The certificate, in the fields of NIST SP 800-88 Rev. 1's sample certificate of sanitization that apply."""
    arts = data["artifacts"]
    all_sealed = all(a.get("sealed") for a in arts if a.get("stored"))
    return {
        "certificate": "sanitization",
        "standard": "NIST SP 800-88 Rev. 1, Appendix G (fields that apply to files on a head node)",
        "purge_id": purge_id,
        "person_performing": {"requested_by": data["requester"], "approved_by": data.get("approver"), "approval_request": data.get("approval")},
        "organization": {"appliance_node_key": svc.key.key_id, "host": socket.gethostname(), "home": str(svc.home.root)},
        "media": {
            "type": "files of the appliance home (flash or magnetic storage; file system as mounted)",
            "target": data["target"],
            "description": data["label"],
            "artifacts": [{k: a.get(k) for k in ("digest", "kind", "name", "size_bytes", "files", "run_id", "sealed", "key_id")} for a in arts],
            "source_files": data.get("sources", []),
            "total_bytes": sum(int(a.get("size_bytes") or 0) for a in arts),
        },
        "sanitization": {
            "method_type": "purge",
            "technique": "cryptographic erase, then overwrite (one pass of random data), fsync and unlink"
            if all_sealed
            else "cryptographic erase where sealed; overwrite (one pass of random data), fsync and unlink for artifacts stored before encryption at rest (not crypto-erasable)",
            "cipher": sealed.CIPHER,
            "key_wrap": sealed.WRAP,
            "data_keys_destroyed": sorted({a["key_id"] for a in arts if a.get("key_id")}),
            "key_table_entries_overwritten": destroyed,
            "bytes_overwritten": overwritten,
            "tool": "sovereign-appliance",
            "tool_version": _tool_version(),
            "started": started_ts,
            "completed": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "resumed_after_interruption": bool(verification["marker_scan"] and isinstance(verification["marker_scan"], str)),
        },
        "verification": {"method": "full: key table, keyring, every sealed file and a marker scan of every file of the home", **verification},
        "kept_derived_from_purged_data": [{k: a.get(k) for k in ("digest", "kind", "name")} for a in data.get("kept", [])],
        "exports_beyond_reach": data.get("exports", []),
        "post_sanitization": "the media stays in service in the appliance home; the ledger keeps the purged artifacts' rows (status purged)",
        "recorded_by": actor,
    }
