"""Read operations: the ledger (query, verify, head), the store (list, verify), a run's data.

Every one is authorized and its decision recorded before anything is read. They run inside
the service, which holds the ledger: auditor SQL goes to the sandbox (`Ledger.query`, its own
DuckDB instance with file access closed and time, memory and row limits), never to the
writer's connection. Keys a caller wants to trust arrive as PEM text, not as paths the
service would read on the caller's behalf.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import duckdb

from appliance.service.caller import Caller
from appliance.service.resolve import resolve_digest, resolve_run, run_artifact_digest
from keys import sealed
from keys.errors import ApplianceError
from keys.keystore import key_id_of, public_key_from_pem
from registry.errors import LedgerError, StoreError

_PEM_BLOCK = re.compile(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


def _trusted(svc: Any, pems: Sequence[str]) -> dict[str, Any]:
    """The keys to trust: those the caller sent (PEM text), else the home's node key."""
    if not pems:
        return dict(svc.trusted)
    keys = {}
    for i, text in enumerate(pems):
        # One file may hold several keys (`keys export-public --all` writes them all): each counts.
        blocks = _PEM_BLOCK.findall(text) or [text]
        for j, pem in enumerate(blocks):
            pub = public_key_from_pem(pem.encode(), source=f"trusted key #{i + 1}" + (f" (block {j + 1})" if len(blocks) > 1 else ""))
            keys[key_id_of(pub)] = pub
    return keys


def ledger_query(svc: Any, caller: Caller, *, sql: str) -> dict[str, Any]:
    """One sandboxed, read-only SELECT over the ledger's views."""
    svc.authorize(caller, "ledger.query", sql[:500])
    # The limits (time, memory, rows) are the service's, set when it opened the ledger.
    columns, rows = svc.ledger.query(sql)
    return {"columns": columns, "rows": [list(r) for r in rows]}


def ledger_verify(svc: Any, caller: Caller, *, head: str | None = None, trusted_keys: Sequence[str] = ()) -> dict[str, Any]:
    """Recompute the whole chain and every signature, and check the signed head (the caller's
    copy, sent as text, or the home's)."""
    svc.authorize(caller, "ledger.verify", "ledger")
    head_dict = _head(head) if head is not None else None
    report = svc.ledger.verify(_trusted(svc, trusted_keys), head_dict if head_dict is not None else svc.home.head_file)
    if not trusted_keys:
        _keys_valid_when_used(svc)
    approvals = _approvals_signed(svc)
    return {
        "ok": True,
        "events": report.events,
        "last_seq": report.last_seq,
        "last_hash": report.last_hash,
        "head_checked": report.head_checked,
        "trust_store_version": svc.trust.version,
        "root_key": svc.trust.root_key_id,
        "approvals_checked": approvals,
    }


def _keys_valid_when_used(svc: Any) -> None:
    """Every signing key was a node key of the trust store, valid (not revoked, not rotated out)
    from its first event to its last: a signature by a key after its revocation is a forgery."""
    for key_id, first, last in svc.ledger.select("SELECT key_id, min(ts), max(ts) FROM events GROUP BY key_id ORDER BY min(ts)"):
        svc.trust.require(key_id, "node", at=first)
        svc.trust.require(key_id, "node", at=last)


def _approvals_signed(svc: Any) -> int:
    """Check every recorded approval or denial again: signed by the approver's user key, valid when
    it was recorded, for exactly the request recorded before it. Returns how many were checked."""
    from keys.approval import check_statement, statement

    rows = svc.ledger.select(
        "SELECT d.seq, d.ts, d.body, r.body FROM events d JOIN events r ON r.kind = 'approval.requested' "
        "AND r.body ->> '$.data.id' = d.body ->> '$.data.id' AND r.seq < d.seq "
        "WHERE d.kind IN ('approval.approved', 'approval.denied') ORDER BY d.seq"
    )
    for seq, ts, decided_body, requested_body in rows:
        decided, req = json.loads(decided_body)["data"], json.loads(requested_body)["data"]
        body = decided["statement"]
        approver = decided["by"]["user"]
        expected = statement(req, decision=str(body.get("decision")), approver=approver, key_id="", signed_at="")
        try:
            check_statement(body, decided["signature"], svc.trust, approver=approver, expected=expected, at=str(ts))
        except ApplianceError as exc:
            raise LedgerError(f"event {seq} ({approver}'s decision on request {decided['id']}) does not check: {exc.message}", exc.hint) from None
    return len(rows)


def _head(text: str) -> dict[str, Any]:
    hint = "pass the head written by `appliance ledger head --out FILE`"
    try:
        head = json.loads(text)
    except (ValueError, RecursionError):
        raise LedgerError("the signed head given is not JSON", hint) from None
    if not isinstance(head, dict):
        raise LedgerError("the signed head given is not a JSON object", hint)
    return head


def ledger_head(svc: Any, caller: Caller) -> dict[str, Any]:
    """The signed head: keep a copy outside the appliance to catch rows cut off the end."""
    svc.authorize(caller, "ledger.head", "ledger")
    return dict(svc.ledger.head())


def artifact_list(svc: Any, caller: Caller, *, kind: str | None = None) -> list[dict[str, Any]]:
    """Recorded artifacts (of one kind), oldest first."""
    svc.authorize(caller, "artifact.list", kind or "all")
    cols = ["digest", "kind", "name", "size_bytes", "run_id", "status"]
    if kind is None:
        rows = svc.ledger.select(f"SELECT {', '.join(cols)} FROM artifacts ORDER BY seq")
    else:
        rows = svc.ledger.select(f"SELECT {', '.join(cols)} FROM artifacts WHERE kind = ? ORDER BY seq", [kind])
    return [dict(zip(cols, r, strict=True)) for r in rows]


def artifact_verify(svc: Any, caller: Caller, *, digest: str, trusted_keys: Sequence[str] = ()) -> dict[str, Any]:
    """Check a stored artifact on its own (digest, signature file) and through the ledger."""
    svc.authorize(caller, "artifact.verify", digest)
    full = resolve_digest(svc.ledger, digest)
    from appliance.service.purge import purged_message

    gone = purged_message(svc, full)
    if gone is not None:
        kind, name = svc.ledger.select("SELECT kind, name FROM artifacts WHERE digest = ?", [full])[0]
        return {"ok": True, "purged": True, "digest": full, "kind": kind, "name": name, "message": gone}
    event = verify_stored(svc, full, _trusted(svc, trusted_keys))
    return {"ok": True, "digest": full, "kind": event.data["kind"], "name": event.data["name"], "seq": event.seq}


def verify_stored(svc: Any, digest: str, trusted: dict[str, Any]) -> Any:
    """The ledger event that recorded ``digest``, after checking it and the stored copy."""
    from appliance.service.purge import require_not_purged

    require_not_purged(svc, digest)  # "purged on … by certificate …", not a missing-file failure
    event = svc.ledger.recorded(digest, trusted)
    if event.data.get("store_path") is None:
        raise StoreError(
            f"artifact {digest[:16]}… is a recorded {event.data['kind']} ({event.data['name']}) that the store does not hold",
            "source files are recorded, not copied: verify them where they are with sha256sum",
        )
    svc.store.verify(digest, trusted)
    return event


def _run_artifact(svc: Any, run_id: str, kind: str, trusted: dict[str, Any]) -> Any:
    digest = run_artifact_digest(svc.ledger, run_id, kind)
    if digest is None:
        raise StoreError(
            f"run {run_id} recorded no {kind} artifact",
            "the run may have failed before that stage (see `appliance runs show RUN`), or it ran before the appliance produced this artifact",
        )
    verify_stored(svc, digest, trusted)
    return svc.store.path_of(digest)


def data_card(svc: Any, caller: Caller, *, run: str, trusted_keys: Sequence[str] = ()) -> dict[str, Any]:
    """A run's dataset card, JSON and Markdown, read from the verified stored artifact."""
    svc.authorize(caller, "data.card", run)
    run_id = resolve_run(svc.ledger, run)
    folder = _run_artifact(svc, run_id, "dataset-card", _trusted(svc, trusted_keys))
    card = json.loads((folder / "dataset_card.json").read_text(encoding="utf-8"))
    markdown = (folder / "dataset_card.md").read_text(encoding="utf-8")
    notice = purge_notice(svc, run_id)
    if notice:
        card["purge_notice"] = notice
        markdown = f"> **{notice}**\n\n" + markdown
    return {"run_id": run_id, "card": card, "markdown": markdown}


def purge_notice(svc: Any, run_id: str) -> str | None:
    """The line a run's cards carry once some of its data was purged (the stored cards are immutable)."""
    rows = svc.ledger.select(
        "SELECT a.status, count(*), any_value(coalesce(p.purge_id, d.purge_id)) FROM artifacts a "
        "LEFT JOIN purged_artifacts p USING (digest) LEFT JOIN derived_from_purged d USING (digest) "
        "WHERE a.run_id = ? AND a.status <> 'recorded' GROUP BY a.status ORDER BY a.status",
        [run_id],
    )
    if not rows:
        return None
    parts = {status: (n, pid) for status, n, pid in rows}
    pid = next(iter(parts.values()))[1]
    return (
        f"Derived from purged data: {parts.get('purged', (0, ''))[0]} artifact(s) of run {run_id} were purged "
        f"(certificate {pid}); what was trained on them keeps what it learned"
    )


def data_dropped(
    svc: Any, caller: Caller, *, run: str, filter: str | None = None, rule: str | None = None, limit: int = 10, trusted_keys: Sequence[str] = ()
) -> dict[str, Any]:
    """Sample documents a curation filter (or every filter) dropped in a run, with the counts."""
    svc.authorize(caller, "data.dropped", run)
    if limit < 1:
        raise ApplianceError(f"--limit must be at least 1, got {limit}", "pass e.g. --limit 5")
    run_id = resolve_run(svc.ledger, run)
    path = _run_artifact(svc, run_id, "dropped-samples", _trusted(svc, trusted_keys))
    counts = svc.ledger.select("SELECT filter, rule, documents FROM data_drops WHERE run_id = ? ORDER BY filter, rule", [run_id])
    totals = {f"{f}.{r}": int(n) for f, r, n in counts}
    known = sorted({name.split(".", 1)[0] for name in totals})
    if filter is not None and filter not in known:
        raise ApplianceError(
            f"run {run_id} has no drops by a filter named '{filter}'", f"filters that dropped documents in this run: {', '.join(known) or 'none'}"
        )
    rows = _read_parquet(path, filter=filter, rule=rule, limit=limit)
    return {"run_id": run_id, "dropped": {k: v for k, v in totals.items() if filter is None or k.startswith(filter + ".")}, "samples": rows}


def _read_parquet(path: Any, *, filter: str | None, rule: str | None, limit: int) -> list[dict[str, Any]]:
    # The service imports no pyarrow: a private in-memory DuckDB reads the verified parquet file
    # (a path the service chose, never one a caller named).
    # The file is sealed (its plaintext exists only in this process), so DuckDB reads it through
    # the decrypting file object, never from the path.
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        with sealed.open_read(path) as f:
            con.register("dropped", con.read_parquet(f))
            sql = "SELECT * FROM dropped WHERE (? IS NULL OR filter = ?) AND (? IS NULL OR rule = ?) LIMIT ?"
            cur = con.execute(sql, [filter, filter, rule, rule, limit])
            cols = [d[0] for d in cur.description or []]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()


def data_skipped(svc: Any, caller: Caller, *, run: str) -> dict[str, Any]:
    """The source files a run's ingest skipped (whole or in part), with the reasons."""
    svc.authorize(caller, "data.skipped", run)
    run_id = resolve_run(svc.ledger, run)
    cols = ["path", "sha256", "whole_file", "records_skipped", "reasons"]
    rows = svc.ledger.select(f"SELECT {', '.join(cols)} FROM skipped WHERE run_id = ? ORDER BY path", [run_id])
    out = []
    for row in rows:
        item = dict(zip(cols, row, strict=True))
        item["reasons"] = json.loads(item["reasons"]) if isinstance(item["reasons"], str) else item["reasons"]
        out.append(item)
    return {"run_id": run_id, "skipped": out}
