"""The node key: encrypted at rest, 0600, never overwritten, clear errors."""

from __future__ import annotations

import json
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from keys.errors import KeyStoreError, SigningError
from keys.keystore import (
    ENV_PASSPHRASE,
    create_key,
    key_id_of,
    load_key,
    load_public_key,
    public_key_path,
    verify_signature,
)

PASS = b"correct horse battery"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "node.key"
    key = create_key(path, PASS)
    return path, key


def test_created_key_file_is_private_and_encrypted(key_file):
    path, key = key_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert b"PRIVATE KEY" not in raw
    document = json.loads(raw)
    assert document["kdf"]["name"] == "argon2id"
    assert document["key_id"] == key.key_id
    # The public half sits beside it, as PEM.
    assert public_key_path(path) == path.with_name("node.pub.pem")
    assert key_id_of(load_public_key(public_key_path(path))) == key.key_id


def test_load_round_trip_signs_verifiably(key_file):
    path, key = key_file
    loaded = load_key(path, PASS)
    assert loaded.key_id == key.key_id
    sig = loaded.sign(b"data")
    verify_signature(key.public_key, sig, b"data")
    with pytest.raises(SigningError):
        verify_signature(key.public_key, sig, b"other data")
    assert "PRIVATE" not in repr(loaded)


def test_wrong_passphrase_names_the_file(key_file):
    path, _ = key_file
    with pytest.raises(KeyStoreError) as err:
        load_key(path, b"wrong passphrase")
    assert "wrong passphrase for key file" in err.value.message
    assert str(path) in err.value.message
    assert ENV_PASSPHRASE in err.value.hint


def test_missing_key_file_hints_init(tmp_path):
    with pytest.raises(KeyStoreError) as err:
        load_key(tmp_path / "none.key", PASS)
    assert "appliance init" in err.value.hint


def test_refuses_to_overwrite(key_file):
    path, _ = key_file
    before = path.read_bytes()
    with pytest.raises(KeyStoreError, match="refusing to overwrite"):
        create_key(path, PASS)
    assert path.read_bytes() == before


def test_short_passphrase_refused(tmp_path):
    with pytest.raises(KeyStoreError, match="shorter than 8"):
        create_key(tmp_path / "k.key", b"short")
    assert not (tmp_path / "k.key").exists()


def test_edited_header_fails_like_a_wrong_passphrase(key_file, tmp_path):
    path, _ = key_file
    document = json.loads(path.read_text())
    document["kdf"]["iterations"] = 1  # a downgrade attempt breaks the AEAD tag
    forged = tmp_path / "forged.key"
    forged.write_text(json.dumps(document))
    forged.chmod(0o600)
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        load_key(forged, PASS)


def test_world_readable_key_refused(key_file, tmp_path):
    path, _ = key_file
    copy = tmp_path / "copy.key"
    copy.write_bytes(path.read_bytes())
    copy.chmod(0o644)
    with pytest.raises(KeyStoreError, match="accessible by other users") as err:
        load_key(copy, PASS)
    assert "chmod 600" in err.value.hint


def test_pem_for_tool_is_encrypted_with_a_fresh_password(key_file):
    _, key = key_file
    pem1, pw1 = key.encrypted_pem_for_tool()
    pem2, pw2 = key.encrypted_pem_for_tool()
    assert b"ENCRYPTED PRIVATE KEY" in pem1 and pw1 != pw2 and len(pw1) >= 43
    unlocked = serialization.load_pem_private_key(pem1, pw1)
    assert key_id_of(unlocked.public_key()) == key.key_id
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(pem1, pw2)


def test_load_public_key_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(KeyStoreError, match="not a PEM public key"):
        load_public_key(bad)
