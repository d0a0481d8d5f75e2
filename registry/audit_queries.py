"""The canned audit queries: the questions an auditor asks of the ledger, as SQL over its views.

Each builder returns one read-only SELECT that the service runs in its audit sandbox (the
same `ledger.query` an auditor's own SQL goes through: time, memory and row limits, no
external access), so a canned query can see nothing the auditor's SQL could not. Values
from the command line are checked (a digest is hex, a name is printable) and quoted as SQL
string literals, never pasted in raw.
"""

from __future__ import annotations

import re

from registry.errors import AuditQueryError

# Artifact kinds that are models someone could ship or use.
MODEL_KINDS = ("model", "finetuned-model", "adapter", "imported-model")
_HEX = re.compile(r"(sha256:)?[0-9a-fA-F]{8,64}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}([T ][0-9:.]+)?(Z|[+-]\d{2}:?\d{2})?")


def literal(text: str) -> str:
    """``text`` as a DuckDB string literal."""
    if not text.isprintable():
        raise AuditQueryError(f"{text[:40]!r} holds characters that are not printable", "pass plain text")
    return "'" + text.replace("'", "''") + "'"


def _digest_prefix(text: str, what: str) -> str:
    if not _HEX.fullmatch(text):
        raise AuditQueryError(f"{what} {text!r} is not a digest or digest prefix (8 to 64 hex digits)", "copy it from `appliance artifact list`")
    return text.removeprefix("sha256:").lower()


def _since(since: str | None) -> str:
    if since is None:
        return ""
    if not _TIME.fullmatch(since):
        raise AuditQueryError(f"--since {since!r} is not a date or time", "write e.g. 2026-11-01 or 2026-11-01T09:00:00Z")
    return f" AND ts >= {literal(since)}"


def who(user: str | None = None, since: str | None = None) -> str:
    """Who did what and when: every decision the service took (allowed or not), newest last."""
    where = "TRUE" + (f" AND identity = {literal(user)}" if user else "") + _since(since)
    return f"SELECT seq, ts, identity, action, subject, allowed, rule FROM decisions WHERE {where} ORDER BY seq"


def denied(user: str | None = None, since: str | None = None) -> str:
    """Every action the policy refused, with why."""
    where = "NOT allowed" + (f" AND identity = {literal(user)}" if user else "") + _since(since)
    return f"SELECT seq, ts, identity, uid, action, subject, reason FROM decisions WHERE {where} ORDER BY seq"


def _one_artifact(prefix: str, kinds: tuple[str, ...] | None) -> str:
    kind_filter = f" AND kind IN ({', '.join(literal(k) for k in kinds)})" if kinds else ""
    return f"(SELECT digest FROM artifacts WHERE starts_with(digest, {literal(prefix)}){kind_filter})"


def lineage(model: str) -> str:
    """The full lineage of a model: the model and every ancestor back to the source files and base, by depth."""
    prefix = _digest_prefix(model, "model")
    one = _one_artifact(prefix, MODEL_KINDS)
    return (
        f"WITH m AS {one} "
        "SELECT 0 AS depth, a.kind, a.name, a.digest, a.run_id, a.ts FROM artifacts a JOIN m USING (digest) "
        "UNION ALL "
        "SELECT x.depth, x.kind, x.name, x.digest, a.run_id, a.ts FROM m, ancestors(m.digest) x LEFT JOIN artifacts a ON a.digest = x.digest "
        "ORDER BY depth, kind, name"
    )


def derived(source: str) -> str:
    """Every model derived from a source file (named by its digest prefix or its file name): what an erasure request reaches."""
    if _HEX.fullmatch(source):
        match = f"starts_with(digest, {literal(source.removeprefix('sha256:').lower())})"
    else:
        match = f"(name = {literal(source)} OR ends_with(name, {literal('/' + source)}))"
    kinds = ", ".join(literal(k) for k in MODEL_KINDS)
    return (
        f"WITH s AS (SELECT digest, name FROM artifacts WHERE kind = 'source' AND {match}) "
        "SELECT s.name AS source, s.digest AS source_digest, x.kind, x.name, x.digest, x.depth "
        f"FROM s, descendants(s.digest) x WHERE x.kind IN ({kinds}) ORDER BY s.name, x.depth, x.name"
    )


def key_use(key_id: str) -> str:
    """Every use of a key: what it signed (events, per kind, first and last), and every event naming it."""
    prefix = _digest_prefix(key_id, "key id")
    p = literal(prefix)
    return (
        "SELECT 'signed' AS how, kind, count(*) AS events, min(seq) AS first_seq, max(seq) AS last_seq, min(ts) AS first_ts, max(ts) AS last_ts "
        f"FROM events WHERE starts_with(key_id, {p}) GROUP BY kind "
        "UNION ALL "
        "SELECT 'named' AS how, kind, count(*), min(seq), max(seq), min(ts), max(ts) FROM events "
        f"WHERE starts_with(body ->> '$.data.key_id', {p}) OR starts_with(body ->> '$.data.new_key_id', {p}) GROUP BY kind "
        "ORDER BY how DESC, first_seq"
    )


def exports() -> str:
    """Every export and import of a model: when, by whom, which model, where to or from, under which approval."""
    return (
        "SELECT e.seq, e.ts, e.kind, e.actor, e.body ->> '$.data.digest' AS digest, a.name, "
        "coalesce(e.body ->> '$.data.destination', e.body ->> '$.data.origin') AS place, e.body ->> '$.data.approval' AS approval "
        "FROM events e LEFT JOIN artifacts a ON a.digest = e.body ->> '$.data.digest' "
        "WHERE e.kind IN ('model.exported', 'model.imported') ORDER BY e.seq"
    )


def approvals() -> str:
    """Every step of every two-person request."""
    return (
        "SELECT seq, ts, kind, actor, body ->> '$.data.id' AS request, body ->> '$.data.action' AS action, "
        "body ->> '$.data.subject' AS subject, body ->> '$.data.reason' AS reason FROM events "
        "WHERE kind LIKE 'approval.%' ORDER BY seq"
    )


def purges() -> str:
    """Every purge: target, who requested and approved it, when, what it erased, its verification and certificate."""
    return (
        "SELECT purge_id, target, status, requester, approver, started_ts, finished_ts, artifacts, verification, certificate_sha256 "
        "FROM purges ORDER BY started_seq"
    )


def purge_derived() -> str:
    """Artifacts derived from purged data (kept by choice: a model cannot be un-trained), and the purged ones themselves."""
    return (
        "SELECT a.status, a.kind, a.name, a.digest, coalesce(p.purge_id, d.purge_id) AS purge_id, coalesce(p.ts, d.ts) AS since "
        "FROM artifacts a LEFT JOIN purged_artifacts p USING (digest) LEFT JOIN derived_from_purged d USING (digest) "
        "WHERE a.status <> 'recorded' ORDER BY a.status, a.seq"
    )
