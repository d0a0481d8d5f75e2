"""The ledger's SQL: the events table, the audit views and the lineage macros.

Every view reads the signed ``body`` of an event (not the side columns), so a view cannot
say anything the signed hash chain does not. Views and macros live in the database file, so
they work for an auditor who attaches it read-only (after ``USE`` of that catalog: DuckDB
binds a macro's body in the *current* catalog).

Also the required fields of the event kinds the service writes (checked on append so that
the views never meet a malformed event).
"""

from __future__ import annotations

from registry.errors import LedgerError

SCHEMA_VERSION = 1

EVENTS_TABLE = """
CREATE TABLE IF NOT EXISTS events (
    seq        BIGINT PRIMARY KEY,
    ts         VARCHAR NOT NULL,
    kind       VARCHAR NOT NULL,
    actor      VARCHAR NOT NULL,
    body       VARCHAR NOT NULL,
    prev_hash  VARCHAR NOT NULL,
    hash       VARCHAR NOT NULL,
    key_id     VARCHAR NOT NULL,
    signature  VARCHAR NOT NULL
)
"""

META_TABLE = """
CREATE TABLE IF NOT EXISTS ledger_meta (name VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)
"""

# (name, SQL body). Order matters: later views read earlier ones.
VIEWS: list[tuple[str, str]] = [
    (
        "signed_events",
        """
        SELECT CAST(body ->> '$.seq' AS BIGINT) AS seq,
               body ->> '$.ts'    AS ts,
               body ->> '$.kind'  AS kind,
               body ->> '$.actor' AS actor,
               body -> '$.data'   AS data
        FROM events
        """,
    ),
    (
        # Every purge: started, then completed (a started one without an end is being finished).
        "purges",
        """
        SELECT s.data ->> '$.purge_id' AS purge_id,
               s.data ->> '$.target' AS target,
               CASE WHEN c.seq IS NULL THEN 'started' ELSE 'completed' END AS status,
               s.data ->> '$.requester.user' AS requester,
               s.data ->> '$.approver.user' AS approver,
               s.seq AS started_seq, s.ts AS started_ts, c.ts AS finished_ts,
               CAST(json_array_length(s.data -> '$.artifacts') AS BIGINT) AS artifacts,
               c.data ->> '$.certificate_sha256' AS certificate_sha256,
               c.data ->> '$.verification' AS verification
        FROM (SELECT * FROM signed_events WHERE kind = 'purge.started') s
        LEFT JOIN (SELECT * FROM signed_events WHERE kind = 'purge.completed') c
               ON c.data ->> '$.purge_id' = s.data ->> '$.purge_id'
        """,
    ),
    (
        # Artifacts a completed purge erased: their rows stay, their bytes are gone.
        "purged_artifacts",
        """
        SELECT unnest(json_extract_string(data, '$.purged[*]')) AS digest,
               data ->> '$.purge_id' AS purge_id, ts, seq,
               data ->> '$.certificate_sha256' AS certificate_sha256
        FROM signed_events WHERE kind = 'purge.completed'
        """,
    ),
    (
        # Artifacts a purge left in place that derive from the data it erased (a model cannot be un-trained).
        "derived_from_purged",
        """
        SELECT k.digest, any_value(k.purge_id) AS purge_id, min(k.ts) AS ts
        FROM (
            SELECT unnest(json_extract_string(data, '$.kept[*]')) AS digest, data ->> '$.purge_id' AS purge_id, ts
            FROM signed_events WHERE kind = 'purge.completed'
        ) k
        WHERE k.digest NOT IN (SELECT digest FROM purged_artifacts)
        GROUP BY k.digest
        """,
    ),
    (
        # One row per digest: the first event that recorded it (a deterministic stage may
        # record the same content again in a later run; lineage keeps every edge).
        "artifacts",
        """
        SELECT data ->> '$.digest' AS digest,
               data ->> '$.kind'   AS kind,
               data ->> '$.name'   AS name,
               CAST(data ->> '$.size_bytes' AS BIGINT) AS size_bytes,
               CAST(data ->> '$.files' AS BIGINT)      AS files,
               data ->> '$.store_path' AS store_path,
               data ->> '$.run_id'     AS run_id,
               data ->> '$.stage'      AS stage,
               seq, ts,
               CASE WHEN data ->> '$.digest' IN (SELECT digest FROM purged_artifacts) THEN 'purged'
                    WHEN data ->> '$.digest' IN (SELECT digest FROM derived_from_purged) THEN 'derived-from-purged'
                    ELSE 'recorded' END AS status,
               data ->> '$.sealed.key_id' AS data_key_id
        FROM signed_events
        WHERE kind = 'artifact.recorded'
        QUALIFY row_number() OVER (PARTITION BY data ->> '$.digest' ORDER BY seq) = 1
        """,
    ),
    (
        "lineage",
        """
        SELECT child, parent, run_id, seq FROM (
            SELECT data ->> '$.digest' AS child,
                   unnest(json_extract_string(data, '$.parents[*]')) AS parent,
                   data ->> '$.run_id' AS run_id,
                   seq
            FROM signed_events
            WHERE kind = 'artifact.recorded'
        )
        """,
    ),
    (
        "runs",
        """
        WITH started AS (
            SELECT data ->> '$.run_id' AS run_id,
                   data ->> '$.recipe_name' AS recipe_name,
                   data ->> '$.recipe_digest' AS recipe_digest,
                   actor, seq AS started_seq, ts AS started_ts
            FROM signed_events WHERE kind = 'run.started'
        ), finished AS (
            -- The last of run.finished and run.resumed: a resumed run is running again.
            SELECT data ->> '$.run_id' AS run_id,
                   CASE kind WHEN 'run.resumed' THEN 'running' ELSE data ->> '$.status' END AS status,
                   CASE kind WHEN 'run.resumed' THEN NULL ELSE data ->> '$.error' END AS error,
                   CASE kind WHEN 'run.resumed' THEN NULL ELSE ts END AS finished_ts
            FROM signed_events WHERE kind IN ('run.finished', 'run.resumed')
            QUALIFY row_number() OVER (PARTITION BY data ->> '$.run_id' ORDER BY seq DESC) = 1
        )
        SELECT s.run_id, s.recipe_name, s.recipe_digest, s.actor, s.started_seq, s.started_ts,
               coalesce(f.status, 'running') AS status, f.error, f.finished_ts
        FROM started s LEFT JOIN finished f USING (run_id)
        """,
    ),
    (
        "stages",
        """
        SELECT data ->> '$.run_id' AS run_id,
               data ->> '$.stage' AS stage,
               CASE kind WHEN 'stage.finished' THEN 'finished' WHEN 'stage.stopped' THEN 'stopped' ELSE 'failed' END AS status,
               seq, ts
        FROM signed_events
        WHERE kind IN ('stage.finished', 'stage.failed', 'stage.stopped')
        """,
    ),
    (
        "metrics",
        """
        SELECT run_id, stage, p.step AS step, p.name AS name, p.value AS value FROM (
            SELECT data ->> '$.run_id' AS run_id,
                   data ->> '$.stage' AS stage,
                   unnest(from_json(data -> '$.points',
                          '[{"step": "BIGINT", "name": "VARCHAR", "value": "DOUBLE"}]')) AS p
            FROM signed_events
            WHERE kind = 'metrics.recorded'
        )
        """,
    ),
    (
        # Every checkpoint a training job wrote, and what became of it: saved (digest signed
        # as it appeared), pruned by retention, or rejected on resume (corrupt or altered).
        "checkpoints",
        """
        SELECT data ->> '$.run_id' AS run_id,
               CAST(data ->> '$.step' AS BIGINT) AS step,
               CASE kind WHEN 'checkpoint.saved' THEN 'saved'
                         WHEN 'checkpoint.pruned' THEN 'pruned' ELSE 'rejected' END AS status,
               data ->> '$.digest' AS digest,
               CAST(data ->> '$.size_bytes' AS BIGINT) AS size_bytes,
               data ->> '$.reason' AS reason,
               data ->> '$.path' AS path,
               seq, ts
        FROM signed_events
        WHERE kind IN ('checkpoint.saved', 'checkpoint.pruned', 'checkpoint.rejected')
        """,
    ),
    (
        "decisions",
        """
        SELECT seq, ts,
               data ->> '$.identity' AS identity,
               data ->> '$.action' AS action,
               data ->> '$.subject' AS subject,
               CAST(data -> '$.allowed' AS BOOLEAN) AS allowed,
               data ->> '$.reason' AS reason,
               CAST(data ->> '$.uid' AS BIGINT) AS uid,
               data -> '$.groups' AS groups,
               data ->> '$.permission' AS permission,
               data ->> '$.rule' AS rule,
               data ->> '$.policy_digest' AS policy_digest
        FROM signed_events
        WHERE kind = 'authz.decision'
        """,
    ),
    (
        # Every source file that lost documents at ingest, and why (one event per file).
        "skipped",
        """
        SELECT data ->> '$.run_id' AS run_id,
               data ->> '$.stage' AS stage,
               data ->> '$.path' AS path,
               data ->> '$.sha256' AS sha256,
               CAST(data -> '$.whole_file' AS BOOLEAN) AS whole_file,
               CAST(data -> '$.records_skipped' AS BIGINT) AS records_skipped,
               data -> '$.reasons' AS reasons,
               seq
        FROM signed_events
        WHERE kind = 'data.skipped'
        """,
    ),
    (
        # Documents each curation rule dropped, per run: one row per (filter, rule).
        "data_drops",
        """
        SELECT run_id, split_part(k, '.', 1) AS filter, split_part(k, '.', 2) AS rule,
               CAST(json_extract(dropped, '$."' || k || '"') AS BIGINT) AS documents
        FROM (
            SELECT data ->> '$.run_id' AS run_id, data -> '$.stats.dropped' AS dropped,
                   unnest(json_keys(data -> '$.stats.dropped')) AS k
            FROM signed_events
            WHERE kind = 'stage.finished' AND data ->> '$.stage' = 'curate'
        )
        """,
    ),
    (
        # Personal data and secrets found per run and type (redacted or dropped per the recipe).
        "pii_matches",
        """
        SELECT run_id, k AS type, CAST(json_extract(pii, '$."' || k || '"') AS BIGINT) AS matches
        FROM (
            SELECT data ->> '$.run_id' AS run_id, data -> '$.stats.pii' AS pii,
                   unnest(json_keys(data -> '$.stats.pii')) AS k
            FROM signed_events
            WHERE kind = 'stage.finished' AND data ->> '$.stage' = 'curate'
        )
        """,
    ),
    (
        # The model registry: every model-like artifact under its run's recipe name, numbered in
        # the order recorded. The ledger only grows, so a version, once given, never changes.
        "registry_models",
        """
        SELECT coalesce(r.recipe_name, a.name) AS name,
               row_number() OVER (PARTITION BY coalesce(r.recipe_name, a.name) ORDER BY a.seq) AS version,
               a.kind, a.digest, a.run_id, a.seq, a.ts, a.size_bytes
        FROM artifacts a LEFT JOIN runs r USING (run_id)
        WHERE a.kind IN ('model', 'finetuned-model', 'adapter', 'imported-model')
        """,
    ),
    (
        # Where each tag points now: the last move of (name, tag); a removal points nowhere.
        "registry_tags",
        """
        SELECT name, tag, version, digest, actor, seq, ts FROM (
            SELECT data ->> '$.name' AS name, data ->> '$.tag' AS tag,
                   CAST(data ->> '$.version' AS BIGINT) AS version, data ->> '$.digest' AS digest,
                   actor, seq, ts,
                   row_number() OVER (PARTITION BY data ->> '$.name', data ->> '$.tag' ORDER BY seq DESC) AS latest
            FROM signed_events WHERE kind = 'registry.tagged'
        ) WHERE latest = 1 AND digest IS NOT NULL
        """,
    ),
    (
        "ledger_keys",
        """
        SELECT data ->> '$.key_id' AS key_id,
               data ->> '$.public_key_pem' AS public_key_pem,
               data ->> '$.role' AS role,
               seq
        FROM signed_events
        WHERE kind = 'key.registered'
        """,
    ),
]

# Depth is capped so that a (corrupt) cycle cannot make a query run forever; UNION keeps
# one row per (digest, depth), so a diamond-shaped DAG stays small.
_WALK = """
WITH RECURSIVE walk(digest, depth) AS (
    SELECT {next}, 1 FROM lineage WHERE {this} = d
    UNION
    SELECT l.{next}, w.depth + 1 FROM lineage l JOIN walk w ON l.{this} = w.digest
    WHERE w.depth < 10000
)
SELECT w.digest AS digest, min(w.depth) AS depth,
       any_value(a.kind) AS kind, any_value(a.name) AS name
FROM walk w LEFT JOIN artifacts a ON a.digest = w.digest
GROUP BY w.digest
ORDER BY depth, digest
"""

MACROS: list[tuple[str, str]] = [
    ("ancestors", _WALK.format(this="child", next="parent")),
    ("descendants", _WALK.format(this="parent", next="child")),
]

VIEW_NAMES = [name for name, _ in VIEWS]
MACRO_NAMES = [name for name, _ in MACROS]


def schema_statements() -> list[str]:
    """DDL that creates (or brings up to date) every table, view and macro."""
    statements = [EVENTS_TABLE, META_TABLE]
    statements += [f"CREATE OR REPLACE VIEW {name} AS {sql}" for name, sql in VIEWS]
    statements += [f"CREATE OR REPLACE MACRO {name}(d) AS TABLE {sql}" for name, sql in MACROS]
    return statements


# Fields each known event kind's data must hold (the views read them). Other kinds are free.
EVENT_FIELDS: dict[str, frozenset[str]] = {
    "key.registered": frozenset({"key_id", "public_key_pem", "role"}),
    "authz.decision": frozenset({"identity", "action", "subject", "allowed", "reason"}),
    "run.started": frozenset({"run_id", "recipe_name", "recipe_digest", "recipe", "environment"}),
    "stage.finished": frozenset({"run_id", "stage", "stats"}),
    "stage.failed": frozenset({"run_id", "stage", "error"}),
    "stage.stopped": frozenset({"run_id", "stage", "error"}),
    "artifact.recorded": frozenset({"digest", "kind", "name", "size_bytes", "files", "store_path", "run_id", "stage", "parents", "meta"}),
    "metrics.recorded": frozenset({"run_id", "stage", "points"}),
    "run.finished": frozenset({"run_id", "status", "error", "summary"}),
    "model.signed": frozenset({"digest", "key_id", "signature_file"}),
    "data.skipped": frozenset({"run_id", "stage", "path", "sha256", "whole_file", "records_skipped", "reasons", "examples"}),
    "checkpoint.saved": frozenset({"run_id", "stage", "step", "digest", "manifest_sha256", "path", "files", "size_bytes"}),
    "checkpoint.rejected": frozenset({"run_id", "stage", "step", "path", "reason"}),
    "checkpoint.pruned": frozenset({"run_id", "stage", "step"}),
    "stage.reused": frozenset({"run_id", "stage", "from_run", "artifacts"}),
    "run.resumed": frozenset({"run_id", "previous_status", "reused_stages"}),
    "purge.started": frozenset({"purge_id", "target", "artifacts", "kept", "requester"}),
    "purge.completed": frozenset({"purge_id", "purged", "kept", "certificate", "certificate_sha256", "signature", "key_id"}),
}


def _fail(kind: str, field: str, expected: str) -> LedgerError:
    return LedgerError(
        f"event {kind!r}: field {field!r} must be {expected}",
        "fix the code that records this event; the ledger is append-only, so a malformed event would stay in the audit views forever",
    )


def check_event_data(kind: str, data: dict) -> None:
    """Raise LedgerError if a known event kind lacks a field or has one the views cannot read."""
    required = EVENT_FIELDS.get(kind)
    if required is None:
        return
    missing = sorted(required - data.keys())
    if missing:
        raise LedgerError(
            f"event {kind!r} is missing field(s) {', '.join(missing)}",
            f"record {kind!r} with all of: {', '.join(sorted(required))}",
        )
    if kind == "authz.decision" and type(data["allowed"]) is not bool:
        raise _fail(kind, "allowed", "true or false")
    if kind == "artifact.recorded":
        for field in ("size_bytes", "files"):
            if type(data[field]) is not int:
                raise _fail(kind, field, "an integer")
        parents = data["parents"]
        if type(parents) is not list or any(type(p) is not str for p in parents):
            raise _fail(kind, "parents", "a list of digests (strings)")
    if kind == "metrics.recorded":
        points = data["points"]
        if type(points) is not list:
            raise _fail(kind, "points", "a list of {step, name, value}")
        for point in points:
            if (
                type(point) is not dict
                or type(point.get("step")) is not int
                or type(point.get("name")) is not str
                or type(point.get("value")) not in (int, float)
            ):
                raise _fail(kind, "points", "a list of {step: int, name: str, value: number}")
