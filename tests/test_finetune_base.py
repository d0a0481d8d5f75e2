"""Base model import: layout checks, manifest digests, and offline signature verification (key and keyless)."""

from __future__ import annotations

import base64
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from keys.digest import sha256_path
from keys.errors import SigningError
from keys.keystore import key_id_of
from pipeline.finetune.base import BaseModelError, inspect_base
from pipeline.finetune.base_sig import _pae, embedded_trust_config, verify_base, verify_keyless
from pipeline.settings.finetune import DatasetConfig, FinetuneConfig
from tests.finetune_fixtures import build_tiny_base

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**kw: Any) -> FinetuneConfig:
    return FinetuneConfig(base="base", datasets=[DatasetConfig(path="train.jsonl")], **kw)


def _keypair(directory: Path, name: str, curve: ec.EllipticCurve | None = None) -> tuple[Path, Path]:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _sign(model_dir: Path, private_key: Path) -> Path:
    from model_signing import hashing, signing

    sig = model_dir / "model.sig"
    hashing_config = hashing.Config().set_ignored_paths(paths=["model.sig"], ignore_git_paths=True)
    signing.Config().use_elliptic_key_signer(private_key=private_key).set_hashing_config(hashing_config).sign(model_dir, sig)
    return sig


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(recipe dir holding base/ signed with signer.pem, signer.pub.pem, other.pub.pem); copy before changing."""
    recipe = tmp_path_factory.mktemp("recipe")
    build_tiny_base(recipe / "base")
    private, public = _keypair(recipe, "signer")
    _, other = _keypair(recipe, "other")
    _sign(recipe / "base", private)
    return recipe, public, other


@pytest.fixture
def recipe(signed: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    """A private copy of the signed recipe dir, safe to tamper with."""
    dest = tmp_path / "recipe"
    shutil.copytree(signed[0], dest, symlinks=True)
    return dest


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("qwen") / "base", arch="qwen2", chat_template=False)


# --- inspection -----------------------------------------------------------------------------------


def test_inspection_reads_shape_tokenizer_and_manifest(signed: tuple[Path, Path, Path]) -> None:
    base = inspect_base(signed[0] / "base")
    assert (base.model_type, base.architecture) == ("llama", "LlamaForCausalLM")
    assert (base.shape.hidden_size, base.shape.num_layers, base.shape.num_heads, base.shape.num_kv_heads) == (64, 2, 4, 2)
    assert base.shape.max_positions == 256 and base.shape.vocab_size == 320
    assert base.weight_files == ("model.safetensors",)
    assert base.has_chat_template and "tokenizer.json" in base.tokenizer_files
    # The estimate from config.json alone equals what the safetensors headers declare (tied head not stored).
    assert base.parameter_estimate() == base.parameters
    assert base.memory_estimate(4) == base.weight_bytes
    names = list(base.manifest_dict())
    assert names == sorted(names, key=str.encode) and "model.safetensors" in names and "model.sig" in names
    # Same convention as every other directory digest of the appliance (sha256sum format).
    assert base.digest == sha256_path(signed[0] / "base")
    assert base.manifest_text().splitlines()[0].endswith(f"  {names[0]}")


def test_qwen2_shape_counts_its_qkv_biases(qwen_base: Path) -> None:
    base = inspect_base(qwen_base)
    assert base.model_type == "qwen2" and base.shape.qkv_bias
    assert base.parameter_estimate() == base.parameters
    assert not base.has_chat_template


def test_manifest_digest_is_stable_and_follows_the_files(recipe: Path) -> None:
    first, second = inspect_base(recipe / "base"), inspect_base(recipe / "base")
    assert first.digest == second.digest and first.manifest == second.manifest
    (recipe / "base" / "generation_config.json").write_text('{"do_sample": false}')
    third = inspect_base(recipe / "base")
    assert third.digest != first.digest
    changed = {p for p, e in third.manifest_dict().items() if first.manifest_dict()[p] != e}
    assert changed == {"generation_config.json"}


def test_hidden_files_are_ignored(recipe: Path) -> None:
    before = inspect_base(recipe / "base")
    (recipe / "base" / ".cache" / "huggingface").mkdir(parents=True)
    (recipe / "base" / ".cache" / "huggingface" / "download.lock").write_text("x")
    (recipe / "base" / ".gitattributes").write_text("*.safetensors filter=lfs")
    after = inspect_base(recipe / "base")
    assert after.digest == before.digest
    # ... and verification, too, leaves unsigned hidden files alone.
    verify_base(after, _cfg(base_public_key="signer.pub.pem"), recipe, [])


def test_pickle_weights_are_refused_with_the_conversion(recipe: Path) -> None:
    (recipe / "base" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(BaseModelError) as err:
        inspect_base(recipe / "base")
    assert "pytorch_model.bin" in err.value.message and "arbitrary code" in err.value.message
    assert "safe_serialization=True" in err.value.message


def test_pickle_only_base_says_there_are_no_safetensors(recipe: Path) -> None:
    (recipe / "base" / "model.safetensors").rename(recipe / "base" / "model.pt")
    with pytest.raises(BaseModelError, match=r"(?s)model\.pt.*no \*\.safetensors weights"):
        inspect_base(recipe / "base")


def test_auto_map_custom_code_is_refused(recipe: Path) -> None:
    config_path = recipe / "base" / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(BaseModelError, match="auto_map.*trust_remote_code"):
        inspect_base(recipe / "base")


def test_symlink_escaping_the_directory_is_refused(recipe: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    (recipe / "base" / "generation_config.json").unlink()
    (recipe / "base" / "generation_config.json").symlink_to(outside)
    with pytest.raises(BaseModelError, match=r"generation_config\.json is a link to .*outside the model directory.*cp -rL"):
        inspect_base(recipe / "base")


def test_link_inside_the_directory_is_hashed_as_its_target(recipe: Path) -> None:
    base_dir = recipe / "base"
    shutil.copyfile(base_dir / "generation_config.json", base_dir / "gen_copy.json")
    (base_dir / "gen_link.json").symlink_to("gen_copy.json")
    manifest = inspect_base(base_dir).manifest_dict()
    assert manifest["gen_link.json"] == manifest["gen_copy.json"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "weights.ckpt").write_bytes(b"x")
    with pytest.raises(BaseModelError) as err:
        inspect_base(tmp_path)
    text = err.value.message
    assert "model_type 'gpt2'" in text and "weights.ckpt" in text and "tokenizer is incomplete" in text
    with pytest.raises(BaseModelError, match="not a directory"):
        inspect_base(tmp_path / "nothing")


def test_inspection_imports_neither_torch_nor_transformers() -> None:
    code = "import sys, pipeline.finetune.base, pipeline.finetune.base_sig; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --- key signatures -------------------------------------------------------------------------------


def test_signed_base_verifies_with_its_key(signed: tuple[Path, Path, Path]) -> None:
    recipe, public, _ = signed
    base = inspect_base(recipe / "base")
    verdict = verify_base(base, _cfg(base_public_key="signer.pub.pem"), recipe, [])
    assert verdict.method == "key" and verdict.bundle == recipe / "base" / "model.sig"
    assert verdict.signer == key_id_of(serialization.load_pem_public_key(public.read_bytes()))  # type: ignore[arg-type]
    assert verdict.manifest_digest == base.digest
    assert verdict.record()["method"] == "key"


def test_trusted_keys_are_picked_by_the_bundle_hint(signed: tuple[Path, Path, Path]) -> None:
    recipe, public, other = signed
    base = inspect_base(recipe / "base")
    verdict = verify_base(base, _cfg(), recipe, [other, public])
    assert verdict.method == "key" and verdict.key_path == public
    with pytest.raises(SigningError, match="none of the 1 trusted key") as err:
        verify_base(base, _cfg(), recipe, [other])
    assert "base_public_key" in err.value.hint


def test_a_signature_outside_the_base_via_base_signature(recipe: Path) -> None:
    (recipe / "base" / "model.sig").rename(recipe / "base.sig")
    base = inspect_base(recipe / "base")
    verdict = verify_base(base, _cfg(base_signature="base.sig", base_public_key="signer.pub.pem"), recipe, [])
    assert verdict.method == "key" and verdict.bundle == recipe / "base.sig"
    with pytest.raises(SigningError, match="base_signature .*missing.sig does not exist"):
        verify_base(base, _cfg(base_signature="missing.sig", allow_unsigned_base=True), recipe, [])


def test_one_flipped_byte_in_the_weights_is_named(recipe: Path) -> None:
    weights = recipe / "base" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    base = inspect_base(recipe / "base")
    with pytest.raises(SigningError) as err:
        verify_base(base, _cfg(base_public_key="signer.pub.pem"), recipe, [])
    assert str(recipe / "base") in err.value.message and "model.sig" in err.value.message
    assert "model.safetensors differs" in err.value.message and "tokenizer.json" not in err.value.message


def test_an_unsigned_file_added_after_signing_is_named(recipe: Path) -> None:
    (recipe / "base" / "chat_template.json").write_text('{"chat_template": "{{ evil }}"}')
    with pytest.raises(SigningError, match=r"chat_template\.json is extra \(not signed\)"):
        verify_base(inspect_base(recipe / "base"), _cfg(base_public_key="signer.pub.pem"), recipe, [])


def test_a_file_changed_after_inspection_is_caught(recipe: Path) -> None:
    base = inspect_base(recipe / "base")
    # Swap in another validly signed version between inspection and verification.
    (recipe / "base" / "generation_config.json").write_text("{}")
    _sign(recipe / "base", recipe / "signer.pem")
    with pytest.raises(SigningError, match=r"changed between inspection and signature check.*generation_config\.json differs"):
        verify_base(base, _cfg(base_public_key="signer.pub.pem"), recipe, [])


def test_a_wrong_key_is_refused(recipe: Path) -> None:
    with pytest.raises(SigningError, match="signed by a different key than .*other.pub.pem"):
        verify_base(inspect_base(recipe / "base"), _cfg(base_public_key="other.pub.pem"), recipe, [])


def test_an_edited_file_list_fails_the_signature(recipe: Path) -> None:
    sig = recipe / "base" / "model.sig"
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"] = statement["predicate"]["resources"][1:]
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    sig.write_text(json.dumps(bundle))
    with pytest.raises(SigningError, match="signature does not verify .*signed file list was altered"):
        verify_base(inspect_base(recipe / "base"), _cfg(base_public_key="signer.pub.pem"), recipe, [])


def test_keys_model_signing_cannot_use_offline_are_refused(recipe: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pem = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (recipe / "ed.pub.pem").write_bytes(pem)
    with pytest.raises(SigningError, match="not ECDSA P-256, P-384 or P-521"):
        verify_base(inspect_base(recipe / "base"), _cfg(base_public_key="ed.pub.pem"), recipe, [])


def test_a_p384_signature_verifies(recipe: Path) -> None:
    private, _ = _keypair(recipe, "p384", ec.SECP384R1())
    _sign(recipe / "base", private)
    verdict = verify_base(inspect_base(recipe / "base"), _cfg(base_public_key="p384.pub.pem"), recipe, [])
    assert verdict.method == "key"


def test_unsigned_base_is_refused_unless_the_recipe_allows_it(recipe: Path) -> None:
    (recipe / "base" / "model.sig").unlink()
    base = inspect_base(recipe / "base")
    with pytest.raises(SigningError, match="is not signed") as err:
        verify_base(base, _cfg(), recipe, [recipe / "signer.pub.pem"])
    assert "allow_unsigned_base = true" in err.value.hint and "model_signing sign key" in err.value.hint
    verdict = verify_base(base, _cfg(allow_unsigned_base=True), recipe, [])
    assert verdict.method == "unsigned-allowed" and verdict.note == "unsigned, allowed by the recipe"
    assert verdict.bundle is None and verdict.manifest_digest == base.digest


def test_allow_unsigned_never_admits_a_failed_signature(recipe: Path) -> None:
    (recipe / "base" / "config.json").write_text((recipe / "base" / "config.json").read_text() + " ")
    with pytest.raises(SigningError, match=r"config\.json differs"):
        verify_base(inspect_base(recipe / "base"), _cfg(base_public_key="signer.pub.pem", allow_unsigned_base=True), recipe, [])


# --- keyless (sigstore) ---------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Any attempt to open a connection or resolve a name is recorded and fails."""
    attempts: list[tuple[Any, ...]] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def _forged_keyless_bundle(model_sig: Path, out: Path, identity: str) -> Path:
    """A bundle shaped like a Fulcio + Rekor one, over the real file list, but from a self-made certificate."""
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    bundle = json.loads(model_sig.read_text())
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(minutes=10))
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(identity)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    payload = base64.b64decode(bundle["dsseEnvelope"]["payload"])
    bundle["dsseEnvelope"]["signatures"] = [{"sig": b64(key.sign(_pae(payload), ec.ECDSA(hashes.SHA256())))}]
    entry = {
        "logIndex": "1",
        "logId": {"keyId": b64(bytes(32))},
        "kindVersion": {"kind": "dsse", "version": "0.0.1"},
        "integratedTime": str(int(start.timestamp()) + 60),
        "inclusionPromise": {"signedEntryTimestamp": b64(b"\x30\x00")},
        "inclusionProof": {
            "logIndex": "1",
            "rootHash": b64(bytes(32)),
            "treeSize": "2",
            "hashes": [b64(bytes(32))],
            "checkpoint": {"envelope": "x\n2\nAA==\n\n"},
        },
        "canonicalizedBody": b64(json.dumps({"apiVersion": "0.0.1", "kind": "dsse", "spec": {}}).encode()),
    }
    bundle["verificationMaterial"] = {"certificate": {"rawBytes": b64(cert.public_bytes(serialization.Encoding.DER))}, "tlogEntries": [entry]}
    out.write_text(json.dumps(bundle))
    return out


def test_keyless_bundle_not_chaining_to_sigstore_is_refused_offline(recipe: Path, no_network: list[tuple[Any, ...]]) -> None:
    forged = _forged_keyless_bundle(recipe / "base" / "model.sig", recipe / "keyless.sig", "release@example.org")
    base = inspect_base(recipe / "base")
    cfg = _cfg(base_signature="keyless.sig", base_identity="release@example.org", base_issuer="https://accounts.google.com")
    with pytest.raises(SigningError) as err:
        verify_base(base, cfg, recipe, [])
    assert f"keyless signature {forged}" in err.value.message and "embedded production trust root" in err.value.message
    assert "does not verify for identity 'release@example.org'" in err.value.message
    assert "certificate chain" in err.value.message
    assert "offline" in err.value.hint
    assert no_network == []


def test_keyless_bundle_needs_identity_and_issuer(recipe: Path, no_network: list[tuple[Any, ...]]) -> None:
    _forged_keyless_bundle(recipe / "base" / "model.sig", recipe / "base" / "model.sig", "release@example.org")
    base = inspect_base(recipe / "base")
    with pytest.raises(SigningError, match="keyless signature and the recipe names no base_identity"):
        verify_base(base, _cfg(), recipe, [recipe / "signer.pub.pem"])
    with pytest.raises(SigningError, match="needs both the signer's identity and its OIDC issuer"):
        verify_base(base, _cfg(base_identity="release@example.org"), recipe, [])
    with pytest.raises(SigningError, match="is a keyless signature, not a key signature"):
        verify_base(base, _cfg(base_public_key="signer.pub.pem"), recipe, [])
    verdict = verify_base(base, _cfg(allow_unsigned_base=True), recipe, [])
    assert verdict.method == "unsigned-allowed" and "not checked" in verdict.note
    assert no_network == []


def test_key_bundle_with_keyless_settings_is_refused(recipe: Path) -> None:
    with pytest.raises(SigningError, match="is a key signature, not a keyless"):
        verify_keyless(inspect_base(recipe / "base"), recipe / "base" / "model.sig", "a@b.c", "https://accounts.google.com")


def test_the_embedded_trust_roots_parse_without_network(no_network: list[tuple[Any, ...]]) -> None:
    from sigstore.models import ClientTrustConfig

    for instance in ("production", "staging"):
        config = ClientTrustConfig.from_json(embedded_trust_config(instance).decode())  # type: ignore[arg-type]
        assert config.trusted_root.get_fulcio_certs()
    assert no_network == []


# --- the appliance's own packaged model ------------------------------------------------------------


@pytest.mark.slow
def test_the_appliance_packaged_model_verifies_with_the_home_key(finished_run: tuple[Path, Any], tmp_path: Path) -> None:
    home, summary = finished_run
    model_path = Path(summary.model_path)
    base = inspect_base(model_path)
    assert base.appliance_package and base.model_type == "llama" and "tokenizer.model" in base.tokenizer_files
    assert base.digest == sha256_path(model_path)
    node_key = home / "keys" / "node.pub.pem"
    verdict = verify_base(base, FinetuneConfig(base=str(model_path), datasets=[DatasetConfig(path="t.jsonl")]), tmp_path, [node_key])
    assert verdict.method == "key" and verdict.key_path == node_key and verdict.bundle == model_path / "model.sig"
    assert os.path.samefile(verdict.bundle, model_path / "model.sig")


def test_the_base_stage_refuses_a_window_past_the_base_context(recipe: Path) -> None:
    # The last guard for a base the run start could not read (a stored "model:" base): refused
    # once config.json is read, before any weight is loaded or anything is written.
    from pipeline.errors import ConfigError
    from pipeline.finetune.stages import run_base

    with pytest.raises(ConfigError, match=r"train.seq_len = 1024 is longer than the base model's context \(256 positions"):
        run_base(_cfg(allow_unsigned_base=True), recipe, recipe / "work", [], seq_len=1024)
    assert not (recipe / "work").exists()
