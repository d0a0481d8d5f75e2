"""Files on disk: the one atomic write (keys.files) and the modes it leaves, whatever the umask."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from keys.files import atomic_write, atomic_write_json, atomic_write_text, fsync_dir


@pytest.fixture(params=[0o000, 0o077], ids=["umask000", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.fixture
def umask000():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------- keys.files


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o444, 0o640])
def test_atomic_write_mode_is_exact_whatever_the_umask(tmp_path, umask, mode):
    target = tmp_path / "f"
    atomic_write(target, b"new", mode=mode)
    assert target.read_bytes() == b"new" and _mode(target) == mode
    atomic_write(target, b"newer", mode=0o600)  # replacing: the new mode wins, not the old
    assert target.read_bytes() == b"newer" and _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_atomic_write_default_mode_is_private(tmp_path, umask000):
    atomic_write_text(tmp_path / "t", "é")
    assert _mode(tmp_path / "t") == 0o600 and (tmp_path / "t").read_text(encoding="utf-8") == "é"


def test_atomic_write_json_is_stable(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": ["é"]}, mode=0o644)
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == json.dumps({"a": ["é"], "b": 1}, indent=2, ensure_ascii=False) + "\n"
    atomic_write_json(tmp_path / "b.json", {"a": ["é"], "b": 1}, mode=0o644)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_write_failing_midway_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "f"
    atomic_write(target, b"old content", mode=0o644)
    real_write, calls = os.write, []

    def half_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, b"x" * 10_000, mode=0o600)
    monkeypatch.undo()
    assert calls == [10_000, 5_000]
    assert target.read_bytes() == b"old content" and _mode(target) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # the temporary file is gone


def test_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f", b"data")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_exclusive_never_replaces(tmp_path):
    target = tmp_path / "f"
    atomic_write(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_long_names_and_missing_directory(tmp_path):
    long_name = "n" * 250
    atomic_write(tmp_path / long_name, b"ok")
    assert (tmp_path / long_name).read_bytes() == b"ok"
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "f", b"x")


def test_fsync_dir_wants_a_directory(tmp_path):
    fsync_dir(tmp_path)
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")
