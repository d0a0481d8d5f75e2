"""keys.sealed: the sealed file format, random-access windows, the keyring and key wrapping."""

from __future__ import annotations

import hashlib
import os
import random
import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from keys import sealed
from keys.digest import dir_manifest, sha256_file
from keys.sealed import SealedDataError, SealedReader
from tests.sealed_fixtures import key_in_ring, keyring  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("keyring")


def write_sealed(path: Path, data: bytes, key_id: str) -> Path:
    sealed.seal_path(path, key_id)
    with sealed.open_write(path) as f:
        f.write(data)
    return path


def test_a_sealed_file_is_its_plaintext_under_a_header(tmp_path: Path) -> None:
    data = secrets.token_bytes(100_003)
    key_id = key_in_ring()
    (tmp_path / "s").mkdir()
    path = write_sealed(tmp_path / "s" / "doc.bin", data, key_id)
    raw = path.read_bytes()
    assert raw[:8] == sealed.MAGIC and len(raw) == sealed.HEADER_SIZE + len(data)
    assert data not in raw and data[1000:1032] not in raw
    assert sealed.is_sealed(path) and sealed.header_key_id(path) == key_id
    assert sealed.plain_size(path) == len(data)
    assert sealed.read_plain(path) == data
    assert b"".join(sealed.iter_plain(path, chunk=4097)) == data
    # Digests and directory manifests are of the plaintext: the same as a plain copy's.
    plain = tmp_path / "plain" / "doc.bin"
    plain.parent.mkdir()
    plain.write_bytes(data)
    assert sha256_file(path) == sha256_file(plain) == hashlib.sha256(data).hexdigest()
    assert dir_manifest(tmp_path / "s") == dir_manifest(tmp_path / "plain")


def test_random_windows_equal_the_plaintext(tmp_path: Path) -> None:
    data = secrets.token_bytes(50_000)
    path = write_sealed(tmp_path / "doc.bin", data, key_in_ring())
    rng = random.Random(5)
    with SealedReader(path) as reader:
        for _ in range(500):
            offset = rng.randrange(0, len(data) + 20)
            n = rng.choice([0, 1, 15, 16, 17, 31, 513, rng.randrange(0, 3000)])
            assert reader.pread(offset, n) == data[offset : offset + n], (offset, n)
        for n in (1, 16, 33, 514, 1026):
            offsets = [rng.randrange(0, len(data) - n + 1) for _ in range(40)] + [0, len(data) - n]
            got = reader.windows_at(offsets, n)
            assert got.shape == (len(offsets), n)
            assert [bytes(row) for row in got] == [data[o : o + n] for o in offsets]
        with pytest.raises(ValueError, match="not inside"):
            reader.windows_at([len(data) - 3], 4)
    with sealed.open_read(path) as f:
        f.seek(12_345)
        assert f.read(100) == data[12_345:12_445]
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]


@pytest.mark.parametrize("nonce", [bytes(7) + b"\x05" + b"\xff" * 7 + b"\xf0", b"\xff" * 16], ids=["low-half-carry", "128-bit-wrap"])
def test_the_counter_carries_and_wraps_as_ctr_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nonce: bytes) -> None:
    key_id = key_in_ring()
    data = secrets.token_bytes(4000)
    monkeypatch.setattr(sealed.secrets, "token_bytes", lambda n: nonce)
    path = write_sealed(tmp_path / "doc.bin", data, key_id)
    monkeypatch.undo()
    assert path.read_bytes()[24:40] == nonce
    with SealedReader(path) as reader:
        assert reader.readall() == data
        offsets = list(range(0, 4000 - 300, 7))
        assert [bytes(r) for r in reader.windows_at(offsets, 300)] == [data[o : o + 300] for o in offsets]


def test_windows_of_files_under_different_keys_keep_apart(tmp_path: Path) -> None:
    a, b = secrets.token_bytes(5000), secrets.token_bytes(7000)
    pa = write_sealed(tmp_path / "a.bin", a, key_in_ring())
    pb = write_sealed(tmp_path / "b.bin", b, key_in_ring())
    with SealedReader(pa) as ra, SealedReader(pb) as rb:
        assert [bytes(r) for r in ra.windows_at([10, 4000], 900)] == [a[10:910], a[4000:4900]]
        assert [bytes(r) for r in rb.windows_at([6000, 3], 900)] == [b[6000:6900], b[3:903]]


def test_a_missing_key_names_the_file_and_the_key(tmp_path: Path) -> None:
    key_id = key_in_ring()
    path = write_sealed(tmp_path / "doc.bin", b"secret text", key_id)
    sealed.forget_key(key_id)
    with pytest.raises(SealedDataError) as err:
        sealed.read_plain(path)
    assert str(path) in err.value.message and key_id in err.value.message and "does not hold" in err.value.message
    assert err.value.hint
    with pytest.raises(SealedDataError, match=key_id):
        sha256_file(path)


def test_a_wrong_key_fails_the_key_check_at_open(tmp_path: Path) -> None:
    key_id = key_in_ring()
    path = write_sealed(tmp_path / "doc.bin", b"secret text", key_id)
    sealed.add_key(key_id, secrets.token_bytes(32))  # same id, another key
    with pytest.raises(SealedDataError) as err:
        SealedReader(path)
    assert str(path) in err.value.message and key_id in err.value.message and "key check failed" in err.value.message


def test_the_header_names_its_key_and_a_plain_file_has_none(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"hello")
    assert sealed.header_key_id(plain) is None and not sealed.is_sealed(plain)
    assert not sealed.is_sealed(tmp_path / "missing") and not sealed.is_sealed(tmp_path)
    assert sealed.plain_size(plain) == 5
    with pytest.raises(SealedDataError, match="not a sealed file"):
        SealedReader(plain)
    key_id = key_in_ring()
    path = write_sealed(tmp_path / "doc.bin", b"x", key_id)
    assert sealed.header_key_id(path) == key_id


def test_a_file_sealed_under_a_key_not_in_the_ring_is_refused_naming_both(tmp_path: Path) -> None:
    key_id = sealed.new_key_id()
    sealed.seal_path(tmp_path, key_id)
    with pytest.raises(SealedDataError) as err:
        sealed.open_write(tmp_path / "doc.bin")
    assert key_id in err.value.message and "doc.bin" in err.value.message
    assert not (tmp_path / "doc.bin").exists()


def test_seal_paths_match_by_longest_prefix_and_like_names_the_final_file(tmp_path: Path) -> None:
    folder, file = key_in_ring(), key_in_ring()
    sealed.seal_path(tmp_path / "out", folder)
    sealed.seal_path(tmp_path / "out" / "raw.parquet", file)
    assert sealed.sealing_key_for(tmp_path / "out" / "raw.parquet") == file
    assert sealed.sealing_key_for(tmp_path / "out" / "raw.parquet.partial") == folder
    assert sealed.sealing_key_for(tmp_path / "out" / "sub" / "x") == folder
    assert sealed.sealing_key_for(tmp_path / "outside") is None
    assert sealed.sealing_key_for(tmp_path / "out2" / "x") is None  # a prefix of the name is not a folder above it
    (tmp_path / "out").mkdir()
    with sealed.open_write(tmp_path / "out" / "raw.parquet.partial", like=tmp_path / "out" / "raw.parquet") as f:
        f.write(b"rows")
    assert sealed.header_key_id(tmp_path / "out" / "raw.parquet.partial") == file
    sealed.unseal_path(tmp_path / "out")
    sealed.unseal_path(tmp_path / "out" / "raw.parquet")
    with sealed.open_write(tmp_path / "out" / "plain") as f:
        f.write(b"rows")
    assert (tmp_path / "out" / "plain").read_bytes() == b"rows"


def test_a_job_gets_its_keys_and_seal_paths_from_its_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_id, key = sealed.new_key()
    env = sealed.job_environment({key_id: key}, {tmp_path / "shards": key_id})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sealed.reset_for_tests()  # a fresh process: the environment is read on first use
    assert sealed.get_key(key_id) == key
    assert sealed.sealing_key_for(tmp_path / "shards" / "train_000000.bin") == key_id
    monkeypatch.setenv(sealed.ENV_KEYS, "{not json")
    sealed.reset_for_tests()
    with pytest.raises(SealedDataError, match=sealed.ENV_KEYS):
        sealed.has_key(key_id)


def test_tampered_ciphertext_is_caught_by_the_plaintext_digest(tmp_path: Path) -> None:
    data = secrets.token_bytes(10_000)
    expected = hashlib.sha256(data).hexdigest()
    path = write_sealed(tmp_path / "doc.bin", data, key_in_ring())
    assert sha256_file(path) == expected
    raw = bytearray(path.read_bytes())
    raw[sealed.HEADER_SIZE + 5000] ^= 0x01  # CTR is malleable: the flip decrypts to a flipped bit
    path.write_bytes(bytes(raw))
    plain = sealed.read_plain(path)
    assert plain != data and sum(x != y for x, y in zip(plain, data, strict=True)) == 1
    assert sha256_file(path) != expected


def test_a_tampered_key_check_is_refused(tmp_path: Path) -> None:
    key_id = key_in_ring()
    path = write_sealed(tmp_path / "doc.bin", b"secret text", key_id)
    raw = bytearray(path.read_bytes())
    raw[30] ^= 0x01  # the nonce: the key check no longer matches it
    path.write_bytes(bytes(raw))
    with pytest.raises(SealedDataError, match="key check failed"):
        sealed.read_plain(path)


def test_a_wrapped_key_unwraps_only_with_its_node_key_and_binding() -> None:
    node = ec.generate_private_key(ec.SECP256R1())
    key_id, key = sealed.new_key()
    record = sealed.wrap_key(key_id, key, node.public_key(), "run r1/raw-documents")
    assert sealed.unwrap_key(record, node) == key
    assert key.hex() not in str(record)
    moved = dict(record, binding="run r2/raw-documents")
    with pytest.raises(SealedDataError, match=key_id):
        sealed.unwrap_key(moved, node)
    with pytest.raises(SealedDataError):
        sealed.unwrap_key(dict(record, key_id=sealed.new_key_id()), node)
    with pytest.raises(SealedDataError):
        sealed.unwrap_key(record, ec.generate_private_key(ec.SECP256R1()))
    flipped = bytearray(bytes.fromhex(record["wrapped"]))
    flipped[0] ^= 1
    with pytest.raises(SealedDataError):
        sealed.unwrap_key(dict(record, wrapped=flipped.hex()), node)


def test_keys_and_ids_are_checked() -> None:
    with pytest.raises(SealedDataError, match="not a data key id"):
        sealed.add_key("nothex", bytes(32))
    with pytest.raises(SealedDataError, match="16 bytes"):
        sealed.add_key(sealed.new_key_id(), bytes(16))
