"""Provenance statements: where a model came from, as an in-toto Statement v1 with a SLSA v1 predicate.

Built from the ledger alone (what it recorded when the model was made), for one model under
its registry name and version:

- ``subject``: ``NAME:VERSION`` and the model directory's digest (the appliance's tree
  digest), so the statement binds the name and version, not only the bytes;
- ``buildDefinition``: the recipe (external parameters, with its digest), the launch
  (internal parameters), and every ancestor artifact as a resolved dependency, back to the
  source files and any base model;
- ``runDetails``: the builder (this appliance, named by its node key), the run id, start and
  finish times, and the environment the run recorded (Python, platform, packages, egress guard).

The statement is signed as a DSSE envelope (registry/dsse.py) by the release key.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from registry.errors import StoreError
from registry.ledger import Ledger

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:sovereign-appliance:build-type:training-run:v1"


class ProvenanceError(StoreError):
    """A provenance statement cannot be built, or does not say what it must about the model."""


def builder_id(node_key_id: str) -> str:
    return f"urn:sovereign-appliance:node:{node_key_id}"


def _one(ledger: Ledger, sql: str, params: list[Any], missing: str) -> tuple[Any, ...]:
    rows = ledger.select(sql, params)
    if not rows:
        raise ProvenanceError(missing, "the ledger must hold the model's record; check it with `appliance ledger verify`")
    return tuple(rows[0])


def build_statement(ledger: Ledger, *, digest: str, name: str, version: int, node_key_id: str, appliance_version: str) -> dict[str, Any]:
    """The in-toto statement for the model ``digest``, recorded in ``ledger``, as ``name:version``."""
    run_id, kind = _one(ledger, "SELECT run_id, kind FROM artifacts WHERE digest = ?", [digest], f"no artifact {digest[:16]}… is recorded")
    started_body, started_ts = _one(
        ledger,
        "SELECT body ->> '$.data', ts FROM events WHERE kind = 'run.started' AND body ->> '$.data.run_id' = ? ORDER BY seq LIMIT 1",
        [run_id],
        f"run {run_id} of model {digest[:16]}… has no run.started record",
    )
    started = json.loads(started_body)
    finished = ledger.select("SELECT ts FROM events WHERE kind = 'run.finished' AND body ->> '$.data.run_id' = ? ORDER BY seq DESC LIMIT 1", [run_id])
    deps = [
        {"name": f"{k}:{n}", "digest": {"sha256": d}, "annotations": {"kind": k, "depth": int(depth)}}
        for d, depth, k, n in ledger.select("SELECT digest, depth, kind, name FROM ancestors(?) ORDER BY depth, kind, name, digest", [digest])
    ]
    environment = json.dumps(started.get("environment") or {}, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f"{name}:{version}", "digest": {"sha256": digest}, "annotations": {"kind": kind}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "recipe": started.get("recipe"),
                    "recipe_digest": started.get("recipe_digest"),
                    "recipe_name": started.get("recipe_name"),
                    "data_from": started.get("data_from"),
                    "context": started.get("context"),
                },
                "internalParameters": {"launch": started.get("launch")},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": builder_id(node_key_id), "version": {"sovereign-appliance": appliance_version}},
                "metadata": {
                    "invocationId": run_id,
                    "startedOn": str(started_ts),
                    "finishedOn": str(finished[0][0]) if finished else None,
                },
                "byproducts": [
                    {"name": "environment", "mediaType": "application/json", "content": base64.b64encode(environment).decode("ascii")},
                ],
            },
        },
    }


def check_statement(statement: dict[str, Any], *, digest: str, name: str, version: int, source: str) -> list[str]:
    """Check that ``statement`` is an in-toto SLSA provenance statement about exactly this model
    (digest, name, version); returns the digests of its resolved dependencies."""
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        raise ProvenanceError(f"{source} is not an in-toto Statement v1 with a SLSA v1 provenance predicate", "export the bundle again")
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
        raise ProvenanceError(f"{source} must name exactly one subject", "export the bundle again")
    subject = subjects[0]
    said = (subject.get("name"), (subject.get("digest") or {}).get("sha256"))
    if said != (f"{name}:{version}", digest):
        raise ProvenanceError(
            f"{source} is about {said[0]} ({str(said[1])[:16]}…), not {name}:{version} ({digest[:16]}…)",
            "the statement belongs to another model or version: do not trust this bundle",
        )
    try:
        deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
        return [str(d["digest"]["sha256"]) for d in deps]
    except (KeyError, TypeError):
        raise ProvenanceError(f"{source} has no resolved dependencies", "export the bundle again") from None
