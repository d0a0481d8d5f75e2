"""Provenance statements (in-toto v1, SLSA v1) from a finished run's ledger, signed as DSSE envelopes."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from appliance.service import Service
from keys.keystore import create_key
from registry.dsse import EnvelopeError, open_envelope, pae, payload_json, sign_envelope
from registry.provenance import BUILD_TYPE, ProvenanceError, build_statement, check_statement
from tests.conftest import PASSPHRASE

PASS = PASSPHRASE.encode()


@pytest.fixture
def statement(home_copy: tuple[Path, Any]) -> tuple[dict[str, Any], Any]:
    home, s = home_copy
    with Service.open(home, PASS) as svc:
        st = build_statement(svc.ledger, digest=s.model_digest, name="tiny", version=1, node_key_id=svc.key.key_id, appliance_version="0.1.0")
    return st, s


def test_the_statement_names_the_model_and_every_ancestor(statement: tuple[dict[str, Any], Any]) -> None:
    st, s = statement
    assert st["subject"] == [{"name": "tiny:1", "digest": {"sha256": s.model_digest}, "annotations": {"kind": "model"}}]
    build = st["predicate"]["buildDefinition"]
    assert build["buildType"] == BUILD_TYPE and build["externalParameters"]["recipe_digest"]
    kinds = {d["annotations"]["kind"] for d in build["resolvedDependencies"]}
    assert {"source", "dataset", "tokenizer", "token-shards", "checkpoint", "recipe"} <= kinds
    run = st["predicate"]["runDetails"]
    env = json.loads(base64.b64decode(run["byproducts"][0]["content"]))
    assert env["python"] and run["metadata"]["invocationId"] and run["metadata"]["finishedOn"]
    deps = check_statement(st, digest=s.model_digest, name="tiny", version=1, source="the statement")
    assert len(deps) == len(build["resolvedDependencies"])
    # The name and version are bound: the same bytes under another name or version do not pass.
    for name, version in (("other", 1), ("tiny", 2)):
        with pytest.raises(ProvenanceError, match="is about tiny:1"):
            check_statement(st, digest=s.model_digest, name=name, version=version, source="the statement")


def test_dsse_signs_the_type_and_the_payload_and_trusts_only_given_keys(statement: tuple[dict[str, Any], Any], tmp_path: Path) -> None:
    st, _ = statement
    release = create_key(tmp_path / "release.key", PASS)
    stranger = create_key(tmp_path / "stranger.key", PASS)
    body = json.dumps(st, sort_keys=True).encode()
    env = sign_envelope(body, release)
    got, key_id = open_envelope(env, {release.key_id: release.public_key}, source="provenance.dsse.json")
    assert got == body and key_id == release.key_id and payload_json(got, source="x")["subject"] == st["subject"]
    assert pae("t", b"ab") == b"DSSEv1 1 t 2 ab"
    # Only the verifier's keys count: a key the envelope names but the verifier does not trust proves nothing.
    with pytest.raises(EnvelopeError, match="signed by no key this verifier trusts"):
        open_envelope(env, {stranger.key_id: stranger.public_key}, source="provenance.dsse.json")
    edited = copy.deepcopy(st)
    edited["subject"][0]["name"] = "tiny:9"
    forged = dict(env, payload=base64.b64encode(json.dumps(edited).encode()).decode())
    with pytest.raises(EnvelopeError, match="does not verify"):
        open_envelope(forged, {release.key_id: release.public_key}, source="provenance.dsse.json")
    with pytest.raises(EnvelopeError, match="not 'application/vnd.in-toto"):
        open_envelope(dict(env, payloadType="text/plain"), {release.key_id: release.public_key}, source="provenance.dsse.json")
