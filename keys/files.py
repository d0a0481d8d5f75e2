"""The one atomic file write of the project: readers see the old bytes or the new, never a torn file.

``atomic_write`` writes a temporary file beside the target, fsyncs it, renames it over the
target and fsyncs the directory. After a crash at any point the name holds either the old
content or the new, and once the call returns the new content and its name are on disk.

The temporary file is created with ``O_CREAT | O_EXCL`` and the requested mode, then
``fchmod``-ed to that mode: the umask can narrow a mode given to ``open`` (a 0644 public key
would come out 0600 under umask 077) but never widen it, so the file is never more open than
asked, not even for a moment, and ends exactly as asked whatever the umask. The rename keeps
that mode: the target's old mode and owner do not carry over.

``publish_dir`` does the same for a directory: filled under a temporary name beside its
target, fsynced file by file and directory by directory, renamed, parent fsynced.

`keys` is the lowest floor, so every package may use this; errors are the OS's own
(``OSError`` naming the file): the caller knows what the file is for and wraps it in its
package's error with the fix.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

from keys.errors import ApplianceError

# A temporary name is ".<name>.<12 hex>.tmp"; long target names are cut so that it stays
# under NAME_MAX (255 bytes on every Linux file system).
_TMP_NAME_MAX = 200


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by name, so that a rename after it cannot expose unwritten data."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory, making the names created, renamed or removed in it durable.

    Raises ``NotADirectoryError`` if ``path`` is not a directory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _create_temp(directory: Path, name: str, mode: int) -> tuple[Path, int]:
    stem = name.encode("utf-8", "surrogateescape")[:_TMP_NAME_MAX].decode("utf-8", "ignore")
    for _ in range(16):
        tmp = directory / f".{stem}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        except FileExistsError:
            continue
        return tmp, fd
    raise FileExistsError(f"could not create a temporary file beside {directory / name}: every name tried exists")


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600, exclusive: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file ends with exactly ``mode``.

    ``exclusive=True`` refuses to replace an existing file (``FileExistsError``, nothing
    changed): the complete temporary file is hard-linked to the name, so the name never
    holds a partial file, even after a crash (what ``O_EXCL`` on the name itself cannot
    give). The parent directory must exist. On any failure the temporary file is removed
    and ``path`` keeps its old content.
    """
    path = Path(path)
    _refuse_special(path)
    directory = path.parent
    tmp, fd = _create_temp(directory, path.name, mode)
    placed = False
    try:
        try:
            os.fchmod(fd, mode)  # undo the umask's narrowing; the file never had more than mode
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)  # FileExistsError if the name is taken; never replaces
        else:
            os.replace(tmp, path)
        placed = True
    finally:
        if exclusive or not placed:
            tmp.unlink(missing_ok=True)
    fsync_dir(directory)


def _refuse_special(path: Path) -> None:
    """Refuse to replace what is not a regular file: renaming over ``/dev/null`` (say, from
    ``--out /dev/null``, run as root) would leave the whole machine a regular file in its place."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
        raise ApplianceError(f"{path} is {what}, not a regular file: refusing to replace it", "give the path of a file to write")


def atomic_write_text(path: Path, text: str, *, mode: int = 0o600, exclusive: bool = False) -> None:
    """``atomic_write`` of ``text`` encoded as UTF-8."""
    atomic_write(path, text.encode("utf-8"), mode=mode, exclusive=exclusive)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o600, indent: int | None = 2, ensure_ascii: bool = False) -> None:
    """``atomic_write`` of ``obj`` as stable JSON: sorted keys, fixed indent, one final newline.

    Equal objects give equal bytes, so a file's digest follows its content. This is the
    readable form for files people open; signatures and hash chains use `registry.canonical`.
    """
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=ensure_ascii) + "\n"
    atomic_write(path, text.encode("utf-8"), mode=mode)


def _raise(exc: OSError) -> None:
    raise exc


def fsync_tree(path: Path) -> None:
    """fsync every file and directory below ``path`` (or ``path`` itself if it is a file), children first.

    After it returns, renaming ``path`` cannot expose a name whose data is not on disk. An
    unreadable directory raises instead of being skipped: a tree half-fsynced is not durable.
    """
    path = Path(path)
    if not path.is_dir():
        fsync_path(path)
        return
    for root, _dirs, files in os.walk(path, topdown=False, onerror=_raise):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_dir(Path(root))


def publish_dir(tmp: Path, final: Path, *, replace: bool = False) -> None:
    """Make the directory filled at ``tmp`` appear at ``final`` whole: fsync it all, rename, fsync the parent.

    The directory counterpart of ``atomic_write``: ``final`` either does not exist or holds
    every byte written below ``tmp``, so its existence means it is complete. ``tmp`` must be
    beside ``final`` (same file system). ``replace=True`` first removes an existing
    ``final`` (a crash between the removal and the rename leaves no ``final``, never a mix
    of old and new); otherwise an existing non-empty ``final`` makes the rename fail with
    ``OSError`` and nothing changes (rename(2) does replace an *empty* directory).
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if replace and final.exists():
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        else:
            final.unlink()
    os.rename(tmp, final)
    fsync_dir(final.parent)


def overwrite_and_unlink(path: Path) -> int:
    """Overwrite a regular file with random bytes, fsync it, unlink it and fsync its folder.

    Returns the bytes overwritten. On flash and copy-on-write file systems the old blocks
    may survive an overwrite: this is the second line of a purge, after the data keys are
    destroyed (cryptographic erase), never the only one.
    """
    path = Path(path)
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        path.unlink()
        fsync_dir(path.parent)
        return 0
    os.chmod(path, 0o600)
    size = st.st_size
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        left = size
        while left > 0:
            n = min(left, 1 << 20)
            _write_all(fd, os.urandom(n))
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    fsync_dir(path.parent)
    return size
