"""The task journal: each finished batch of a data stage, recorded, so a relaunch skips it.

A stage killed mid-way (SIGKILL, OOM, a lost node) and started again recomputes only the
batches it had not finished. Each batch's result is written, pickled, to its own file in
the journal folder of the stage's work dir, named by the batch's index. The folder is named
by a digest of everything the results depend on: the batch function and initializer (by
name), the initializer's arguments (canonically encoded: the stage's settings), the stage's
input files (path, size, mtime) and the pipeline's code (a digest of its source files). A
journal made from other input, other settings or other code is therefore never read, and is
removed when the stage starts. Each entry also carries the sha256 of the batch it answers
and of its own payload: an entry for another batch, or a torn one, is recomputed.

Entries hold document text, so they are written through `keys.sealed.open_write`: sealed
like the rest of the stage's scratch files when the job was told to seal them. An entry that
no longer opens (its key was a stage attempt's scratch key, since forgotten) is recomputed.

Results are unpickled from the stage's own work dir, which only the service user can write
(the appliance home is 0700): the same trust as the stage's other scratch files.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from keys import sealed
from keys.errors import ApplianceError
from keys.files import atomic_write, fsync_dir

MAGIC = b"APTASK01"
_HEADER = len(MAGIC) + 64  # magic | sha256 of the batch | sha256 of the payload
VERSION = 1
# Not an entry: a temporary file of a write that did not finish.
_PARTIAL = ".partial"


def _name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def canonical(obj: Any) -> Any:
    """``obj`` as JSON-able data that is equal exactly when the settings are.

    Pickle is not canonical (a set of strings pickles in hash order, which changes with
    every process), so settings are encoded field by field. An object with no faithful
    encoding falls back to its repr; a repr naming an address changes every run, which only
    means a journal that is never reused.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"@": _name(type(obj)), **{f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, enum.Enum):
        return {"@enum": _name(type(obj)), "value": canonical(obj.value)}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (bytes, bytearray)):
        return {"@bytes": hashlib.sha256(obj).hexdigest()}
    if isinstance(obj, os.PathLike):
        return {"@path": os.fspath(obj)}
    if isinstance(obj, dict):
        return {"@dict": sorted(([canonical(k), canonical(v)] for k, v in obj.items()), key=json.dumps)}
    if isinstance(obj, (set, frozenset)):
        return {"@set": sorted((canonical(v) for v in obj), key=json.dumps)}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    return {"@repr": repr(obj)}


def file_identity(path: Path) -> list[Any]:
    """What identifies an input cheaply: its path, size and mtime (every file below a folder).

    The service's inputs are store paths named by their digest; a library caller's changed
    file gets a new mtime. Hashing a many-gigabyte input on every attempt would cost more
    than the batches it saves.
    """
    path = Path(path).resolve()
    if path.is_dir():
        return [str(path), [[str(p.relative_to(path)), *_stat(p)] for p in sorted(path.rglob("*")) if p.is_file()]]
    return [str(path), *_stat(path)]


def _stat(path: Path) -> list[int]:
    try:
        st = path.stat()
    except OSError:
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


def _code_identity() -> str:
    # A batch computed by other code may differ: any change to the pipeline package's source voids
    # the journal (by content: an upgrade that rewrites the same files does not).
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        try:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            digest.update(b"?")
    return digest.hexdigest()


def journal_key(fn: Callable[..., Any], initializer: Callable[..., Any] | None, initargs: tuple[Any, ...], inputs: Iterable[Any]) -> str:
    """The digest that names one `ordered_map` call's journal folder."""
    body = {
        "version": VERSION,
        "fn": _name(fn),
        "initializer": _name(initializer) if initializer is not None else None,
        "initargs": canonical(initargs),
        "inputs": list(inputs),
        "code": _code_identity(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=repr).encode()).hexdigest()


def item_digest(item: Any) -> bytes:
    """sha256 of a batch as sent to the workers (its pickle)."""
    return hashlib.sha256(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)).digest()


class TaskJournal:
    """The finished batches of one `ordered_map` call, one file each, under ``root``."""

    def __init__(self, root: Path, fn: Callable[..., Any], key: str) -> None:
        prefix = _name(fn).replace("<", "_").replace(">", "_")
        self.folder = Path(root) / f"{prefix}-{key[:32]}"
        # Journals of the same function made from other input, settings or code: never reused.
        if Path(root).is_dir():
            for stale in Path(root).glob(f"{prefix}-*"):
                if stale != self.folder:
                    shutil.rmtree(stale, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.folder / f"{index:08d}.task"

    def load(self, index: int, digest: bytes) -> tuple[bool, Any]:
        """(True, result) when batch ``index`` (whose pickle has sha256 ``digest``) finished; else (False, None)."""
        path = self._path(index)
        if not path.is_file():
            return False, None
        try:
            data = sealed.read_plain(path)
            if data[: len(MAGIC)] != MAGIC or data[len(MAGIC) : len(MAGIC) + 32] != digest:
                raise ValueError("another batch")
            payload = data[_HEADER:]
            if hashlib.sha256(payload).digest() != data[len(MAGIC) + 32 : _HEADER]:
                raise ValueError("torn entry")
            return True, pickle.loads(payload)  # noqa: S301 - our own work dir, see the module docstring
        except (OSError, ValueError, ApplianceError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
            # Unreadable (its key is gone, torn, another batch's, or made by other code): recompute.
            path.unlink(missing_ok=True)
            return False, None

    def record(self, index: int, digest: bytes, result: Any) -> None:
        """Write batch ``index``'s result, atomically: the name never holds a partial entry."""
        payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        data = MAGIC + digest + hashlib.sha256(payload).digest() + payload
        path = self._path(index)
        if sealed.sealing_key_for(path) is None:
            atomic_write(path, data)
            return
        tmp = path.with_name(path.name + _PARTIAL)
        try:
            with sealed.open_write(tmp, like=path) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.folder)


def remove_journal(root: Path) -> None:
    """Remove a stage's journal folder (its outputs are complete: nothing left to resume)."""
    shutil.rmtree(root, ignore_errors=True)
