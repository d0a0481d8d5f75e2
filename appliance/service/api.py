"""The service's API: one table of operations, served over the socket and called in-process.

Each operation has a name, an HTTP method and a versioned path (``/v1/…``), typed
parameters, and the service function that performs it. The socket server registers one
route per row; local mode (``--home``) calls `dispatch` directly. So there is one code path:
the same parameter checks, the same authorization, the same functions, whichever way a
request arrives. Who is asking is never a parameter: the caller comes from the kernel
(socket) or from the process itself (local mode).

Functions are named as ``module:function`` and imported on first use, so a client can read
this table (paths, parameters) without importing the service.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from pipeline.errors import ConfigError

API_VERSION = "v1"


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    required: bool = False


@dataclass(frozen=True)
class Op:
    name: str
    methods: tuple[str, ...]
    path: str
    fn: str  # "module:function", called as fn(svc, caller, **params)
    params: tuple[Param, ...] = ()
    # json: one JSON value; ndjson: a stream of JSON objects, one per line; tar: a byte stream.
    result: str = "json"
    summary: str = ""


def info(svc: Any, caller: Any) -> dict[str, Any]:
    svc.authorize(caller, "service.info", "service")
    return {
        "api": API_VERSION,
        "home": str(svc.home.root),
        "node_key": svc.key.key_id,
        "owner": svc.owner,
        "caller": caller.as_record(),
        "max_jobs": svc.config.max_jobs,
        # Whether this service process runs behind the egress guard (`appliance serve` does).
        "egress_guard": _guard_installed(),
        # The root key's public half: what a caller checks an export against. Public, and needed
        # by roles without keys.read (a release manager exports).
        "root_key": _root_key(svc),
        # The auditor's SQL sandbox: what `ledger.query` enforces per query.
        "query_limits": {"timeout_s": svc.config.query_timeout_s, "max_rows": svc.config.query_max_rows, "memory": svc.config.query_memory_limit},
    }


def _root_key(svc: Any) -> dict[str, str] | None:
    root_id = svc.trust.root_key_id
    entry = next((e for e in svc.trust.entries if e.key_id == root_id), None)
    return {"key_id": root_id, "public_key_pem": entry.public_key_pem} if entry is not None else None


def _guard_installed() -> bool:
    from airgap.guard import installed

    return installed()


S, I, B, L, D = str, int, bool, list, dict
OPS: tuple[Op, ...] = (
    Op("service.info", ("GET",), "/v1/info", "appliance.service.api:info", summary="who the service is, and who it thinks you are"),
    Op(
        "run.start",
        ("POST",),
        "/v1/runs",
        "appliance.service.runs:op_start",
        (Param("recipe", S, True), Param("source", S), Param("data_from", S), Param("launch", D), Param("job_file", S), Param("context", D)),
        summary="accept a run of a recipe and queue it",
    ),
    Op("run.list", ("GET",), "/v1/runs", "appliance.service.runs:op_list", summary="every run and its status"),
    Op("run.show", ("GET",), "/v1/runs/{run}", "appliance.service.runs:op_show", (Param("run", S, True),), summary="one run"),
    Op(
        "run.resume",
        ("POST",),
        "/v1/runs/{run}/resume",
        "appliance.service.runs:op_resume",
        (Param("run", S, True), Param("launch", D), Param("job_file", S)),
        summary="continue a stopped, failed or interrupted run",
    ),
    Op("run.cancel", ("POST",), "/v1/runs/{run}/cancel", "appliance.service.runs:op_cancel", (Param("run", S, True),), summary="stop a run"),
    Op(
        "run.events",
        ("GET",),
        "/v1/runs/{run}/events",
        "appliance.service.runs:op_follow",
        (Param("run", S, True), Param("since", I)),
        result="ndjson",
        summary="a run's events as they happen (NDJSON)",
    ),
    Op(
        "ledger.query",
        ("GET", "POST"),
        "/v1/ledger/query",
        "appliance.service.reads:ledger_query",
        (Param("sql", S, True),),
        summary="one sandboxed read-only SELECT",
    ),
    Op(
        "ledger.verify",
        ("GET", "POST"),
        "/v1/ledger/verify",
        "appliance.service.reads:ledger_verify",
        (Param("head", S), Param("trusted_keys", L)),
        summary="recompute the chain, every signature, and the signed head",
    ),
    Op("ledger.head", ("GET",), "/v1/ledger/head", "appliance.service.reads:ledger_head", summary="the signed head"),
    Op(
        "ledger.export",
        ("GET",),
        "/v1/ledger/export",
        "appliance.service.ledger_export_ops:ledger_export",
        (Param("format", S, True),),
        result="tar",
        summary="the ledger up to a signed head, verified, as a DuckDB file or Parquet (tar stream)",
    ),
    Op(
        "service.whoami",
        ("GET",),
        "/v1/whoami",
        "appliance.service.console_ops:whoami",
        summary="the caller's roles and permissions under the policy, what needs a second person, the home's free disk",
    ),
    Op(
        "run.metrics",
        ("GET",),
        "/v1/runs/{run}/metrics",
        "appliance.service.console_ops:metrics",
        (Param("run", S, True), Param("since", I)),
        summary="a run's training metrics (loss, lr, grad norm, tokens/s) from the signed ledger",
    ),
    Op(
        "run.log",
        ("GET",),
        "/v1/runs/{run}/log",
        "appliance.service.console_ops:log_tail",
        (Param("run", S, True), Param("stage", S, True), Param("lines", I)),
        summary="the tail of a stage's job log",
    ),
    Op("keys.list", ("GET",), "/v1/keys", "appliance.service.keyring:keys_list", summary="the root-signed trust store: keys, roles, validity"),
    Op("policy.show", ("GET",), "/v1/policy", "appliance.service.policy_ops:policy_show", summary="the policy in force: roles, permissions, bindings"),
    Op(
        "policy.update",
        ("POST",),
        "/v1/policy",
        "appliance.service.policy_ops:policy_update",
        (Param("text", S, True), Param("signature", S)),
        summary="install a root-signed policy (no self-escalation)",
    ),
    Op(
        "approvals.request",
        ("POST",),
        "/v1/approvals",
        "appliance.service.approvals:op_request",
        (Param("action", S, True), Param("subject", S, True), Param("reason", S), Param("ttl_s", I)),
        summary="ask a second person to approve an action under a two-person rule",
    ),
    Op(
        "approvals.list",
        ("GET",),
        "/v1/approvals",
        "appliance.service.approvals:op_list",
        (Param("all", B),),
        summary="your requests, and those waiting for you to decide",
    ),
    Op("approvals.show", ("GET",), "/v1/approvals/{id}", "appliance.service.approvals:op_show", (Param("id", S, True),), summary="one request"),
    Op(
        "approvals.decide",
        ("POST",),
        "/v1/approvals/{id}/decide",
        "appliance.service.approvals:op_decide",
        (Param("id", S, True), Param("statement", D, True), Param("signature", S, True)),
        summary="approve or deny a request, signed with your user key",
    ),
    Op("artifact.list", ("GET",), "/v1/artifacts", "appliance.service.reads:artifact_list", (Param("kind", S),), summary="recorded artifacts"),
    Op(
        "artifact.verify",
        ("GET", "POST"),
        "/v1/artifacts/{digest}/verify",
        "appliance.service.reads:artifact_verify",
        (Param("digest", S, True), Param("trusted_keys", L)),
        summary="check one stored artifact",
    ),
    Op(
        "purge.impact",
        ("GET", "POST"),
        "/v1/purge/impact",
        "appliance.service.purge:op_impact",
        (Param("target", S, True), Param("also", L)),
        summary="what a purge would erase, keep marked, and could not reach (changes nothing)",
    ),
    Op(
        "purge.run",
        ("POST",),
        "/v1/purge",
        "appliance.service.purge:op_purge",
        (Param("target", S, True), Param("also", L), Param("markers", L), Param("approval", S)),
        summary="crypto-erase a target and what the operator chose, verify, and sign a certificate",
    ),
    Op("purge.list", ("GET",), "/v1/purges", "appliance.service.purge:op_list", summary="every purge and its status"),
    Op("purge.show", ("GET",), "/v1/purges/{id}", "appliance.service.purge:op_show", (Param("id", S, True),), summary="a purge's signed certificate"),
    Op("model.list", ("GET",), "/v1/models", "appliance.service.models:model_list", summary="signed models"),
    Op(
        "bundle.export",
        ("GET",),
        "/v1/models/{model}/bundle",
        "appliance.service.export_ops:model_bundle",
        (Param("model", S, True), Param("approval", S)),
        result="tar",
        summary="a model as a signed bundle for another site (tar stream)",
    ),
    Op(
        "bundle.receive",
        ("POST",),
        "/v1/models/import",
        "appliance.service.import_ops:model_import",
        (Param("path", S, True), Param("root_key", S, True), Param("trust_store", S)),
        summary="verify another site's bundle against its root key, and import its model",
    ),
    Op(
        "registry.list",
        ("GET",),
        "/v1/registry",
        "appliance.service.registry_ops:registry_list",
        (Param("name", S),),
        summary="models by name and version, with tags",
    ),
    Op("registry.show", ("GET",), "/v1/registry/show", "appliance.service.registry_ops:registry_show", (Param("ref", S, True),), summary="one model"),
    Op(
        "registry.tag",
        ("POST",),
        "/v1/registry/tag",
        "appliance.service.registry_ops:registry_tag",
        (Param("ref", S, True), Param("tag", S, True), Param("remove", B)),
        summary="move (or remove) a tag of a model's name",
    ),
    Op(
        "registry.lineage",
        ("GET",),
        "/v1/registry/lineage",
        "appliance.service.registry_ops:registry_lineage",
        (Param("ref", S, True),),
        summary="a model's ancestors and descendants",
    ),
    Op(
        "registry.verify",
        ("GET", "POST"),
        "/v1/registry/verify",
        "appliance.service.registry_ops:registry_verify",
        (Param("ref", S, True),),
        summary="check a model end to end",
    ),
    Op(
        "model.export",
        ("GET",),
        "/v1/models/{model}/export",
        "appliance.service.models:model_export",
        (Param("model", S, True), Param("approval", S)),
        result="tar",
        summary="a signed model as a tar stream",
    ),
    Op(
        "model.generate",
        ("POST",),
        "/v1/generate",
        "appliance.service.models:generate",
        (Param("model", S, True), Param("prompts", L, True), Param("sample", D, True), Param("tokenizer", S), Param("device", S)),
        summary="continue prompts with a verified model",
    ),
    Op(
        "data.card",
        ("GET", "POST"),
        "/v1/runs/{run}/data/card",
        "appliance.service.reads:data_card",
        (Param("run", S, True), Param("trusted_keys", L)),
        summary="a run's dataset card",
    ),
    Op(
        "data.dropped",
        ("GET", "POST"),
        "/v1/runs/{run}/data/dropped",
        "appliance.service.reads:data_dropped",
        (Param("run", S, True), Param("filter", S), Param("rule", S), Param("limit", I), Param("trusted_keys", L)),
        summary="sample documents the curation filters dropped",
    ),
    Op(
        "data.skipped",
        ("GET",),
        "/v1/runs/{run}/data/skipped",
        "appliance.service.reads:data_skipped",
        (Param("run", S, True),),
        summary="source files ingest skipped",
    ),
)
BY_NAME = {op.name: op for op in OPS}


def coerce(op: Op, raw: dict[str, Any], *, from_text: bool = False) -> dict[str, Any]:
    """Check a request's parameters against the operation: unknown names and wrong types are
    errors that name the parameter. ``from_text``: values came from a query string."""
    known = {p.name: p for p in op.params}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{op.name} takes no parameter {', '.join(repr(u) for u in unknown)}", f"its parameters are: {', '.join(known) or 'none'}")
    out: dict[str, Any] = {}
    for p in op.params:
        if p.name not in raw or raw[p.name] is None:
            if p.required:
                raise ConfigError(f"{op.name} needs the parameter '{p.name}'", f"pass {p.name}")
            continue
        value = raw[p.name]
        if from_text and p.type is not str and isinstance(value, str):
            value = _parse_text(op, p, value)
        if p.type is I and isinstance(value, bool) or not isinstance(value, p.type):
            raise ConfigError(f"{op.name}: parameter '{p.name}' must be {p.type.__name__}, got {type(value).__name__}", f"pass {p.name} as {p.type.__name__}")
        out[p.name] = value
    return out


def _parse_text(op: Op, p: Param, value: str) -> Any:
    try:
        if p.type is I:
            return int(value)
        if p.type is B:
            return value.lower() in ("1", "true", "yes")
        return json.loads(value)
    except (ValueError, RecursionError):
        raise ConfigError(f"{op.name}: parameter '{p.name}' is not a valid {p.type.__name__}: {value[:80]!r}", f"pass {p.name} as {p.type.__name__}") from None


def resolve(op: Op) -> Callable[..., Any]:
    module, _, function = op.fn.partition(":")
    return getattr(import_module(module), function)  # type: ignore[no-any-return]


def dispatch(svc: Any, caller: Any, name: str, params: dict[str, Any], *, from_text: bool = False) -> Any:
    """Perform operation ``name`` for ``caller``: the one path every request takes."""
    op = BY_NAME.get(name)
    if op is None:
        raise ConfigError(f"the service has no operation '{name}'", "see `appliance --help`; the client and service versions may differ")
    return resolve(op)(svc, caller, **coerce(op, params, from_text=from_text))
