"""Model signing with OpenSSF model-signing: our verify names files; the standard CLI agrees."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from keys.errors import SigningError
from keys.keystore import create_key, public_key_path
from registry.modelsig import sign_model_dir, verify_model_dir

CLI = Path(sys.executable).with_name("model_signing")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("keys")
    key = create_key(base / "node.key", b"model passphrase")
    create_key(base / "other.key", b"model passphrase")  # its public key is the wrong-key fixture
    return key, public_key_path(base / "node.key"), public_key_path(base / "other.key")


@pytest.fixture(scope="module")
def signed_model(tmp_path_factory, keys):
    key, _, _ = keys
    d = tmp_path_factory.mktemp("m") / "model"
    (d / "tokenizer").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (d / "tokenizer" / "tok.model").write_bytes(b"sp")
    sig = sign_model_dir(d, key)
    assert sig == d / "model.sig"
    return d


@pytest.fixture
def model(signed_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(signed_model, copy)
    return copy


def test_signature_verifies_and_key_never_left_on_disk(signed_model, keys, tmp_path):
    _, pub, _ = keys
    verify_model_dir(signed_model, pub)
    bundle = json.loads((signed_model / "model.sig").read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    names = sorted(r["name"] for r in statement["predicate"]["resources"])
    assert names == ["config.json", "model.safetensors", "tokenizer/tok.model"]
    assert "model.sig" in statement["predicate"]["serialization"]["ignore_paths"]
    assert not list(Path(tempfile.gettempdir()).glob("appliance-sign-*"))


@pytest.mark.skipif(not CLI.exists(), reason="model_signing CLI not installed")
def test_standard_cli_verifies(signed_model, keys):
    _, pub, other = keys
    ok = subprocess.run(
        [str(CLI), "verify", "key", str(signed_model), "--signature", str(signed_model / "model.sig"), "--public_key", str(pub)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "Verification succeeded" in ok.stdout
    bad = subprocess.run(
        [str(CLI), "verify", "key", str(signed_model), "--signature", str(signed_model / "model.sig"), "--public_key", str(other)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0


def test_flipped_byte_is_named(model, keys):
    _, pub, _ = keys
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(SigningError) as err:
        verify_model_dir(model, pub)
    assert "model.safetensors differs" in err.value.message
    assert "config.json" not in err.value.message


def test_extra_file_is_named(model, keys):
    _, pub, _ = keys
    (model / "tokenizer" / "added.py").write_text("import os")
    with pytest.raises(SigningError, match=r"tokenizer/added\.py is extra"):
        verify_model_dir(model, pub)


def test_missing_file_is_named(model, keys):
    _, pub, _ = keys
    (model / "config.json").unlink()
    with pytest.raises(SigningError, match=r"config\.json is missing"):
        verify_model_dir(model, pub)


def test_wrong_key(model, keys):
    _, _, other = keys
    with pytest.raises(SigningError, match="different key"):
        verify_model_dir(model, other)


def test_edited_statement_is_explained(model, keys):
    _, pub, _ = keys
    # Change a file and rewrite the statement to match it: only the signature can tell.
    (model / "config.json").write_text("{}")
    sig = model / "model.sig"
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    for resource in statement["predicate"]["resources"]:
        if resource["name"] == "config.json":
            resource["digest"] = hashlib.sha256(b"{}").hexdigest()
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    sig.write_text(json.dumps(bundle))
    with pytest.raises(SigningError, match="signed statement .* was altered"):
        verify_model_dir(model, pub)


def test_missing_or_garbage_signature(model, keys):
    _, pub, _ = keys
    (model / "model.sig").write_text("not json")
    with pytest.raises(SigningError, match="not a model-signing bundle"):
        verify_model_dir(model, pub)
    (model / "model.sig").unlink()
    with pytest.raises(SigningError, match="no signature file"):
        verify_model_dir(model, pub)


def test_resigning_ignores_the_old_signature(model, keys):
    key, pub, _ = keys
    (model / "config.json").write_text('{"v": 2}')
    sign_model_dir(model, key)
    verify_model_dir(model, pub)
