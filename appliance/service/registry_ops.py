"""The model registry: models by name and version, tags that move, lineage, and verification.

A model's name is its run's recipe name and its version the order in which models of that
name were recorded (views ``registry_models`` and ``registry_tags`` over the ledger): nothing
is stored twice and a version is never rewritten, because the ledger only grows. A tag
(``production``, ``candidate``, …) points at one version of a name; moving or removing it is a
``registry.tagged`` event, decided under ``model.promote``.

A model is named as ``NAME:VERSION``, ``NAME@TAG``, ``NAME`` (its latest version), or by its
digest (or a unique prefix of one).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from appliance.service.caller import Caller
from appliance.service.reads import purge_notice, verify_stored
from pipeline.errors import ConfigError
from registry.errors import StoreError

TAG = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_HEX = re.compile(r"(sha256:)?[0-9a-fA-F]{8,64}")
_COLUMNS = "name, version, kind, digest, run_id, seq, ts, size_bytes"


def _row(columns: str, values: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip([c.strip() for c in columns.split(",")], values, strict=True))


def _tags(svc: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for tag, digest in svc.ledger.select("SELECT tag, digest FROM registry_tags ORDER BY tag"):
        out.setdefault(str(digest), []).append(str(tag))
    return out


def resolve_model(svc: Any, ref: str) -> dict[str, Any]:
    """The registry row ``ref`` names (NAME:VERSION, NAME@TAG, NAME, or a digest prefix); StoreError if none or several."""
    ref = ref.strip()
    rows: list[tuple[Any, ...]]
    if "@" in ref:
        name, tag = ref.rsplit("@", 1)
        rows = svc.ledger.select(
            f"SELECT {', '.join('m.' + c.strip() for c in _COLUMNS.split(','))} FROM registry_models m "
            "JOIN registry_tags t ON t.digest = m.digest AND t.name = m.name WHERE m.name = ? AND t.tag = ?",
            [name, tag],
        )
        missing = f"no version of {name!r} is tagged {tag!r}"
    elif ":" in ref:
        name, _, version = ref.rpartition(":")
        if not version.isdigit():
            raise ConfigError(f"{ref!r}: the version after ':' must be a number", "write NAME:VERSION, e.g. stdlib-demo:2")
        rows = svc.ledger.select(f"SELECT {_COLUMNS} FROM registry_models WHERE name = ? AND version = ?", [name, int(version)])
        missing = f"{name!r} has no version {version}"
    else:
        rows = svc.ledger.select(f"SELECT {_COLUMNS} FROM registry_models WHERE name = ? ORDER BY version DESC LIMIT 1", [ref])
        missing = f"no model is named {ref!r}"
        if not rows and _HEX.fullmatch(ref):
            rows = svc.ledger.select(f"SELECT {_COLUMNS} FROM registry_models WHERE starts_with(digest, ?)", [ref.removeprefix("sha256:").lower()])
            missing = f"no model has a digest starting {ref}"
    if not rows:
        raise StoreError(missing, "`appliance registry list` shows every model with its name, version and tags")
    if len(rows) > 1:
        raise StoreError(f"{ref!r} names {len(rows)} models", "give more of the digest, or NAME:VERSION")
    return _row(_COLUMNS, rows[0])


def registry_list(svc: Any, caller: Caller, *, name: str | None = None) -> list[dict[str, Any]]:
    """Every model (or every version of ``name``), oldest first, with its tags and signer."""
    svc.authorize(caller, "artifact.list", f"registry {name or '*'}")
    sql = f"SELECT {_COLUMNS} FROM registry_models" + (" WHERE name = ?" if name else "") + " ORDER BY name, version"
    tags = _tags(svc)
    signers = {int(s): str(k) for s, k in svc.ledger.select("SELECT seq, key_id FROM events WHERE kind = 'artifact.recorded'")}
    out = []
    for values in svc.ledger.select(sql, [name] if name else []):
        row = _row(_COLUMNS, values)
        out.append({**row, "tags": tags.get(row["digest"], []), "signer": signers.get(int(row["seq"]))})
    return out


def registry_show(svc: Any, caller: Caller, *, ref: str) -> dict[str, Any]:
    """One model: name, version, digest, run, signer, parents, tags, and every tag move that touched it."""
    svc.authorize(caller, "artifact.verify", f"registry {ref}")
    row = resolve_model(svc, ref)
    event = svc.ledger.event(int(row["seq"]))
    history = [
        {"seq": s, "ts": str(t), "actor": a, "tag": g, "version": v}
        for s, t, a, g, v in svc.ledger.select(
            "SELECT seq, ts, actor, body ->> '$.data.tag', CAST(body ->> '$.data.version' AS BIGINT) FROM events "
            "WHERE kind = 'registry.tagged' AND body ->> '$.data.name' = ? ORDER BY seq",
            [row["name"]],
        )
    ]
    return {
        **row,
        "tags": _tags(svc).get(row["digest"], []),
        "signer": event.key_id,
        "parents": list(event.data.get("parents") or []),
        "recorded_by": event.actor,
        "tag_history": history,
        # The stored model card cannot change: a model trained on data purged since says so here.
        "purge_notice": purge_notice(svc, row["run_id"]) if row.get("run_id") else None,
    }


def registry_tag(svc: Any, caller: Caller, *, ref: str, tag: str, remove: bool = False) -> dict[str, Any]:
    """Point ``tag`` of a model's name at it (or remove the tag): a ``registry.tagged`` event under model.promote."""
    svc.authorize(caller, "model.promote", f"{ref} @{tag}")
    if not TAG.fullmatch(tag):
        raise ConfigError(f"tag {tag!r} is not a tag name", "use lower-case letters, digits, '-' and '_', starting with a letter (e.g. production)")
    row = resolve_model(svc, ref)
    before = svc.ledger.select("SELECT version FROM registry_tags WHERE name = ? AND tag = ?", [row["name"], tag])
    previous = int(before[0][0]) if before else None
    if remove and previous is None:
        raise StoreError(f"{row['name']} has no tag {tag!r}", "`appliance registry show NAME` lists its tags")
    if not remove and previous == int(row["version"]):
        return {"name": row["name"], "tag": tag, "version": previous, "digest": row["digest"], "previous_version": previous, "unchanged": True}
    data = {
        "name": row["name"],
        "tag": tag,
        "version": None if remove else int(row["version"]),
        "digest": None if remove else row["digest"],
        "previous_version": previous,
        "by": caller.as_record(),
    }
    svc.ledger.append("registry.tagged", caller.user, data)
    return {"name": row["name"], "tag": tag, "version": data["version"], "digest": data["digest"], "previous_version": previous}


def registry_lineage(svc: Any, caller: Caller, *, ref: str) -> dict[str, Any]:
    """The model and the lineage edges around it: every ancestor (what it was made from) and every descendant."""
    svc.authorize(caller, "artifact.list", f"lineage {ref}")
    row = resolve_model(svc, ref)
    digest = row["digest"]
    near: set[str] = {digest}
    for table in ("ancestors", "descendants"):
        near |= {str(d) for (d,) in svc.ledger.select(f"SELECT digest FROM {table}(?)", [digest])}  # noqa: S608 (a fixed name)
    edges = [
        (str(c), str(p))
        for c, p in svc.ledger.select("SELECT DISTINCT child, parent FROM lineage WHERE child = ANY(?) AND parent = ANY(?)", [list(near), list(near)])
    ]
    names = {str(d): {"kind": k, "name": n} for d, k, n in svc.ledger.select("SELECT digest, kind, name FROM artifacts WHERE digest = ANY(?)", [list(near)])}
    return {"model": row, "nodes": names, "edges": edges}


def registry_verify(svc: Any, caller: Caller, *, ref: str) -> dict[str, Any]:
    """Check a model: its bytes against its digest, its signature file, its ledger record, that the
    signing node key was trusted and valid when it signed, and its model-signing signature."""
    from registry.modelsig import verify_model_dir

    svc.authorize(caller, "artifact.verify", f"registry {ref}")
    row = resolve_model(svc, ref)
    event = verify_stored(svc, row["digest"], svc.trusted)
    entry = svc.trust.require(event.key_id, "node", at=event.ts)  # raises UntrustedKeyError naming the key
    path = svc.store.path_of(row["digest"])
    signer_pem = entry.public_key_pem
    if row["kind"] == "imported-model":
        # Its model.sig is the origin's: checked with the origin node key recorded at import (itself checked then against the origin's root).
        found = svc.ledger.select(
            "SELECT body ->> '$.data.origin_node_key_pem' FROM events WHERE kind = 'model.imported' AND body ->> '$.data.digest' = ? LIMIT 1", [row["digest"]]
        )
        signer_pem = str(found[0][0]) if found else signer_pem
    if (path / "model.sig").exists():
        import tempfile

        # Against the key that signed it then (a rotated-out key still verifies what it signed).
        with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
            pem = Path(tmp) / "signer.pub.pem"
            pem.write_text(signer_pem, encoding="ascii")
            verify_model_dir(path, pem)
    return {
        **row,
        "signer": event.key_id,
        "signer_owner": entry.owner,
        "checked": ["digest", "signature file", "ledger record", "signer trusted then", "model-signing"],
    }
