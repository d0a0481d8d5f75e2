"""keys.files: the one atomic file write and the one directory publish.

Cases that check modes run under umask 000 (nothing narrows a mode by accident) and 077;
the umask is restored after each test.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from keys import files
from keys.files import atomic_write, atomic_write_json, atomic_write_text, fsync_dir, fsync_tree, publish_dir


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------- atomic_write


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


# ---------------------------------------------------------------- publish_dir


def _fill(tmp):
    (tmp / "sub" / "deeper").mkdir(parents=True)
    (tmp / "a.bin").write_bytes(b"a")
    (tmp / "sub" / "b.txt").write_text("b", encoding="utf-8")
    (tmp / "sub" / "deeper" / "c").write_bytes(b"")
    return tmp


@pytest.fixture
def synced(monkeypatch):
    """Every path ``fsync_path`` and ``fsync_dir`` were called on, in order."""
    calls = []
    real_path, real_dir = files.fsync_path, files.fsync_dir

    def path(p):
        calls.append(("path", p))
        real_path(p)

    def directory(p):
        calls.append(("dir", p))
        real_dir(p)

    monkeypatch.setattr(files, "fsync_path", path)
    monkeypatch.setattr(files, "fsync_dir", directory)
    return calls


def test_fsync_tree_syncs_every_file_and_directory_children_first(tmp_path, synced):
    root = _fill(tmp_path / "t")
    fsync_tree(root)
    seen = [p for _, p in synced]
    assert sorted(seen) == sorted([root, root / "a.bin", root / "sub", root / "sub" / "b.txt", root / "sub" / "deeper", root / "sub" / "deeper" / "c"])
    for p in seen:  # a directory is synced after everything below it
        assert all(seen.index(q) < seen.index(p) for q in seen if p in q.parents)
    assert {kind for kind, p in synced if p.is_dir()} == {"dir"}
    synced.clear()
    fsync_tree(root / "a.bin")  # a single file is allowed too
    assert synced == [("path", root / "a.bin")]


def test_publish_dir_renames_after_syncing_and_syncs_the_parent(tmp_path, synced):
    tmp, final = _fill(tmp_path / ".out.tmp"), tmp_path / "out"
    publish_dir(tmp, final)
    assert not tmp.exists()
    assert (final / "sub" / "b.txt").read_text(encoding="utf-8") == "b" and (final / "sub" / "deeper" / "c").is_file()
    assert synced[-1] == ("dir", tmp_path)  # the rename itself made durable
    assert {p for _, p in synced[:-1]} >= {tmp, tmp / "a.bin", tmp / "sub" / "deeper" / "c"}  # all before the rename


def test_publish_dir_never_merges_into_an_existing_directory(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_bytes(b"old")
    tmp = _fill(tmp_path / ".out.tmp")
    with pytest.raises(OSError) as err:
        publish_dir(tmp, final)
    assert err.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert [p.name for p in final.iterdir()] == ["old"] and (tmp / "a.bin").is_file()  # nothing changed
    publish_dir(tmp, final, replace=True)
    assert sorted(p.name for p in final.iterdir()) == ["a.bin", "sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publish_dir_replace_without_a_previous_one(tmp_path):
    publish_dir(_fill(tmp_path / ".x"), tmp_path / "x", replace=True)
    assert (tmp_path / "x" / "a.bin").read_bytes() == b"a"


def test_publish_dir_failing_fsync_leaves_nothing_published(tmp_path, monkeypatch):
    tmp, final = _fill(tmp_path / ".out.tmp"), tmp_path / "out"

    def disk_error(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", disk_error)
    with pytest.raises(OSError, match="Input/output"):
        publish_dir(tmp, final, replace=True)
    monkeypatch.undo()
    assert not final.exists() and (tmp / "a.bin").is_file()  # the caller removes or retries its temp dir


def test_atomic_write_never_replaces_a_device_pipe_or_directory(tmp_path: Path) -> None:
    # Run as root, `--out /dev/null` once turned /dev/null into a regular file: never again.
    import os

    from keys.errors import ApplianceError
    from keys.files import atomic_write_text

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    for target in (fifo, tmp_path / "dir"):
        with pytest.raises(ApplianceError, match="not a regular file: refusing to replace it"):
            atomic_write_text(target, "x")
    assert fifo.is_fifo() and (tmp_path / "dir").is_dir()
    atomic_write_text(tmp_path / "file", "ok")
    atomic_write_text(tmp_path / "file", "again")
    assert (tmp_path / "file").read_text() == "again"
