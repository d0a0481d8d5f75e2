"""The content-addressed store: placement, read-only objects, signatures, named differences."""

from __future__ import annotations

import json
import os
import stat

import pytest

from keys.digest import sha256_path
from keys.keystore import create_key
from registry.errors import StoreError
from registry.store import Store


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return create_key(tmp_path_factory.mktemp("k") / "node.key", b"store passphrase")


@pytest.fixture(scope="module")
def other_key(tmp_path_factory):
    return create_key(tmp_path_factory.mktemp("k2") / "other.key", b"store passphrase")


@pytest.fixture
def trusted(key):
    return {key.key_id: key.public_key}


def _model_dir(base):
    d = base / "model"
    (d / "sub").mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (d / "config.json").write_text('{"dim": 8}')
    (d / "sub" / "tok.model").write_text("pieces")
    return d


def _writable(path):
    """What an attacker with the service's uid does first: undo the read-only bits."""
    os.chmod(path, 0o755)
    for root, dirs, files in os.walk(path):
        for n in dirs:
            os.chmod(os.path.join(root, n), 0o755)
        for n in files:
            os.chmod(os.path.join(root, n), 0o644)


def test_import_directory(tmp_path, key, trusted):
    src = _model_dir(tmp_path)
    expected = sha256_path(src)
    store = Store(tmp_path / "store")
    art = store.import_path(src, kind="model", name="tiny", signer=key)
    assert art.digest == expected
    assert art.path == tmp_path / "store" / "sha256" / expected[:2] / expected
    assert (art.files, art.size_bytes) == (3, 200 + 10 + 6)
    assert not src.exists()  # moved
    assert store.exists(expected) and store.path_of(expected) == art.path
    assert stat.S_IMODE(art.path.stat().st_mode) == 0o555
    assert stat.S_IMODE((art.path / "weights.bin").stat().st_mode) == 0o444
    assert stat.S_IMODE((art.path / "sub").stat().st_mode) == 0o555
    record = json.loads(store.sig_path_of(expected).read_text())
    assert record["kind"] == "model" and record["key_id"] == key.key_id
    assert [f[0] for f in record["files"]] == ["config.json", "sub/tok.model", "weights.bin"]
    store.verify(expected, trusted)
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_import_file_copy_and_idempotent(tmp_path, key, trusted):
    src = tmp_path / "data.parquet"
    src.write_bytes(b"rows")
    store = Store(tmp_path / "store")
    art = store.import_path(src, kind="dataset", name="d", signer=key, move=False)
    assert src.exists() and art.files == 1 and art.size_bytes == 4
    assert stat.S_IMODE(art.path.stat().st_mode) == 0o444
    again = store.import_path(src, kind="dataset", name="d", signer=key, move=True)
    assert again == art and not src.exists()
    store.verify(art.digest, trusted)


def test_import_of_present_but_corrupted_object_fails(tmp_path, key):
    src = tmp_path / "f.txt"
    src.write_text("content")
    store = Store(tmp_path / "store")
    art = store.import_path(src, kind="k", name="n", signer=key, move=False)
    os.chmod(art.path, 0o644)
    art.path.write_text("tampered")
    with pytest.raises(StoreError, match="differs"):
        store.import_path(src, kind="k", name="n", signer=key, move=False)


def test_changed_file_in_directory_is_named(tmp_path, key, trusted):
    store = Store(tmp_path / "store")
    art = store.import_path(_model_dir(tmp_path), kind="model", name="tiny", signer=key)
    _writable(art.path)
    (art.path / "sub" / "tok.model").write_text("PIECES")
    with pytest.raises(StoreError) as err:
        store.verify(art.digest, trusted)
    assert "file sub/tok.model differs" in err.value.message
    assert art.digest in err.value.message and "tiny" in err.value.message


def test_extra_and_missing_files_are_named(tmp_path, key, trusted):
    store = Store(tmp_path / "store")
    art = store.import_path(_model_dir(tmp_path), kind="model", name="tiny", signer=key)
    _writable(art.path)
    (art.path / "config.json").unlink()
    (art.path / "backdoor.py").write_text("import os")
    with pytest.raises(StoreError) as err:
        store.verify(art.digest, trusted)
    assert "file config.json is missing" in err.value.message
    assert "file backdoor.py is extra" in err.value.message


def test_changed_single_file(tmp_path, key, trusted):
    src = tmp_path / "x.bin"
    src.write_bytes(b"abc")
    store = Store(tmp_path / "store")
    art = store.import_path(src, kind="k", name="x", signer=key)
    os.chmod(art.path, 0o644)
    art.path.write_bytes(b"abd")
    with pytest.raises(StoreError, match="does not match its digest"):
        store.verify(art.digest, trusted)


def test_signature_checks(tmp_path, key, other_key, trusted):
    src = tmp_path / "x.bin"
    src.write_bytes(b"abc")
    store = Store(tmp_path / "store")
    art = store.import_path(src, kind="k", name="x", signer=key)
    with pytest.raises(StoreError, match="not trusted"):
        store.verify(art.digest, {other_key.key_id: other_key.public_key})
    sig = store.sig_path_of(art.digest)
    record = json.loads(sig.read_text())
    os.chmod(sig, 0o644)
    sig.write_text(json.dumps(dict(record, kind="model")))  # relabel the artifact
    with pytest.raises(StoreError, match="signature does not verify"):
        store.verify(art.digest, trusted)
    sig.unlink()
    with pytest.raises(StoreError, match="no signature file"):
        store.verify(art.digest, trusted)


def test_edited_file_list_is_caught(tmp_path, key, trusted):
    store = Store(tmp_path / "store")
    art = store.import_path(_model_dir(tmp_path), kind="model", name="tiny", signer=key)
    _writable(art.path)
    (art.path / "weights.bin").write_bytes(b"evil")
    sig = store.sig_path_of(art.digest)
    record = json.loads(sig.read_text())
    for entry in record["files"]:  # an attacker updates the saved manifest too
        if entry[0] == "weights.bin":
            entry[1] = sha256_path(art.path / "weights.bin")
    os.chmod(sig, 0o644)
    sig.write_text(json.dumps(record))
    with pytest.raises(StoreError, match="does not hash to the digest"):
        store.verify(art.digest, trusted)


def test_refusals(tmp_path, key):
    store = Store(tmp_path / "store")
    with pytest.raises(StoreError, match="not a sha256 digest"):
        store.path_of("../../etc/passwd")
    with pytest.raises(StoreError, match="does not exist"):
        store.import_path(tmp_path / "nope", kind="k", name="n", signer=key)
    d = tmp_path / "withlink"
    d.mkdir()
    (d / "real").write_text("x")
    (d / "link").symlink_to(d / "real")
    with pytest.raises(StoreError, match="link"):
        store.import_path(d, kind="k", name="n", signer=key)
    assert d.exists()
    with pytest.raises(StoreError, match="missing from the store"):
        missing = "0" * 64
        store.sig_path_of(missing).parent.mkdir(parents=True)
        store._write_sig(missing, {"digest": missing, "kind": "k", "name": "n", "key_id": "x"})
        store.verify_content(missing)


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_modes_are_explicit_whatever_the_umask(tmp_path, key, trusted, umask):
    old = os.umask(umask)
    try:
        store = Store(tmp_path / "store")
        art = store.import_path(_model_dir(tmp_path), kind="model", name="tiny", signer=key)
    finally:
        os.umask(old)
    sig = store.sig_path_of(art.digest)
    assert stat.S_IMODE(sig.stat().st_mode) == 0o444
    assert stat.S_IMODE(art.path.stat().st_mode) == 0o555
    assert stat.S_IMODE((art.path / "weights.bin").stat().st_mode) == 0o444
    assert sig.read_text().endswith("}\n") and json.loads(sig.read_text())["digest"] == art.digest
    assert sorted(p.name for p in sig.parent.iterdir()) == sorted([art.digest, sig.name])  # no temporary file left
    store.verify(art.digest, trusted)
