"""Ordered, bounded parallel map over worker processes, or over a Ray cluster's tasks.

The data stages split their input into fixed-size batches (the split depends on the data
only, never on the worker count), send them to worker processes and consume the results
in submission order. So the output is byte-identical whatever the number of workers, and
``workers = 1`` runs the very same function in this process.

``concurrent.futures.ProcessPoolExecutor.map`` would submit every batch up front, holding
the whole input in memory; here at most ``window`` batches are in flight, so memory stays
flat on inputs of any size. Workers are started with ``spawn``: forking a process that
holds threads (progress display, torch) can deadlock in the child.

Every worker dies with the process that started the pool (``pipeline.lifeline``): a stage
job killed with SIGKILL cannot shut its pool down, and its workers would otherwise live on
(adopted by init) holding memory and file handles.

What runs the batches, and whether their completion is recorded, is the stage's context,
set by whoever runs the stage (`stage_tasks`; the stage job does it from the recipe's
``[cluster]`` table), so the stages themselves call `ordered_map` the same way either way:

- ``executor``: local worker processes, or tasks on a running Ray cluster
  (`pipeline.ray_executor`, imported only then);
- ``journal``: a folder where each finished batch's result is recorded
  (`pipeline.task_journal`); a relaunch after a kill recomputes only the others, and the
  journal is removed once the stage has finished.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pipeline.errors import DataError
from pipeline.lifeline import die_with_parent
from pipeline.settings.cluster import ClusterConfig

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(workers: int) -> int:
    """``0`` means one worker per available core."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class TaskStats:
    """What the stage's `ordered_map` calls did: batches computed now, and read back from the journal."""

    executor: str = "local"
    batches: int = 0
    computed: int = 0
    reused: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"executor": self.executor, "batches": self.batches, "computed": self.computed, "reused": self.reused}


@dataclass
class _Context:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    journal: Path | None = None
    # The identities of the stage's input files (`task_journal.file_identity`): part of the journal's key.
    inputs: tuple[Any, ...] = ()
    stats: TaskStats = field(default_factory=TaskStats)


_CONTEXT = _Context()


@contextmanager
def stage_tasks(*, cluster: ClusterConfig | None = None, journal: Path | None = None, inputs: Sequence[Path] = ()) -> Iterator[TaskStats]:
    """Within this block, `ordered_map` runs on ``cluster``'s executor and records each finished batch in ``journal``.

    ``inputs`` are the stage's input files: a journal made from other files is never read.
    When the block ends normally the stage's outputs are complete and the journal is removed;
    on an error, a kill or a stop it stays, for the relaunch.
    """
    global _CONTEXT
    from pipeline.task_journal import file_identity, remove_journal

    previous = _CONTEXT
    cluster = cluster or ClusterConfig()
    _CONTEXT = _Context(cluster, Path(journal) if journal is not None else None, tuple(file_identity(p) for p in inputs), TaskStats(cluster.executor))
    try:
        yield _CONTEXT.stats
        if _CONTEXT.journal is not None:
            remove_journal(_CONTEXT.journal)
    finally:
        _CONTEXT = previous


class _Backend(Protocol):
    """What runs batches: submit returns a handle, result waits for it (in submission order)."""

    def submit(self, item: Any) -> Any: ...

    def result(self, handle: Any) -> Any: ...

    def cancel(self, handle: Any) -> None: ...

    def close(self) -> None: ...


class _Inline:
    """``workers = 1``: everything in this process, each batch computed when its result is read."""

    def __init__(self, fn: Callable[[Any], Any], initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
        self.fn = fn
        if initializer is not None:
            initializer(*initargs)

    def submit(self, item: Any) -> Any:
        return item

    def result(self, handle: Any) -> Any:
        return self.fn(handle)

    def cancel(self, handle: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _start_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    """Runs first in each worker: follow the pool's process, then the stage's own initializer."""
    die_with_parent(expected_parent=parent)
    if initializer is not None:
        initializer(*initargs)


class _Pool:
    """Local worker processes (spawned, each following this process)."""

    def __init__(self, fn: Callable[[Any], Any], workers: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
        self.fn = fn
        context = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(), initializer, initargs))

    def submit(self, item: Any) -> Future[Any]:
        return self.pool.submit(self.fn, item)

    def result(self, handle: Future[Any]) -> Any:
        try:
            return handle.result()
        except BrokenProcessPool:
            raise DataError(
                f"a worker process of {getattr(self.fn, '__module__', 'the stage')} died before finishing its batch "
                '(killed for memory, or the calling script starts workers without an `if __name__ == "__main__":` guard)',
                "check the kernel log (dmesg) for the out-of-memory killer, or set workers = 1 in the recipe to run in one process",
            ) from None

    def cancel(self, handle: Future[Any]) -> None:
        handle.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    window: int = 0,
) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computed by ``workers`` processes (or the stage's Ray cluster).

    ``fn`` and ``initializer`` must be module-level functions (they are pickled by name).
    ``initializer(*initargs)`` runs once per worker, for state that is costly to build per
    batch (compiled filters, a loaded tokenizer). With one worker everything runs here.
    Under `stage_tasks` with a journal, batches a killed attempt finished are read back
    instead of recomputed; no worker starts until a batch needs one.
    """
    ctx = _CONTEXT
    journal = None
    if ctx.journal is not None:
        from pipeline.task_journal import TaskJournal, item_digest, journal_key

        journal = TaskJournal(ctx.journal, fn, journal_key(fn, initializer, initargs, ctx.inputs))
    backend: _Backend | None = None

    def start() -> _Backend:
        if ctx.cluster.executor == "ray":
            from pipeline.ray_executor import RayBackend

            return RayBackend(fn, ctx.cluster, initializer, initargs)
        if workers <= 1:
            return _Inline(fn, initializer, initargs)
        return _Pool(fn, workers, initializer, initargs)

    # (index, batch digest, backend handle or None, result read from the journal)
    pending: deque[tuple[int, bytes, Any, Any]] = deque()
    size = window

    def finish(entry: tuple[int, bytes, Any, Any]) -> Any:
        index, digest, handle, value = entry
        ctx.stats.batches += 1
        if handle is None:
            ctx.stats.reused += 1
            return value
        if backend is None:  # pragma: no cover - a handle exists only once the backend does
            raise RuntimeError("a batch was submitted before its backend started")
        value = backend.result(handle)
        if journal is not None:
            journal.record(index, digest, value)
        ctx.stats.computed += 1
        return value

    try:
        for index, item in enumerate(items):
            digest = b""
            if journal is not None:
                digest = item_digest(item)
                done, value = journal.load(index, digest)
                if done:
                    pending.append((index, digest, None, value))
                    if len(pending) >= (size or 1):
                        yield finish(pending.popleft())
                    continue
            if backend is None:
                backend = start()
                size = window or getattr(backend, "window", 0) or (2 * workers if workers > 1 else 1)
            pending.append((index, digest, backend.submit(item), None))
            if len(pending) >= size:
                yield finish(pending.popleft())
        while pending:
            yield finish(pending.popleft())
    finally:
        # On an error or an early stop, do not wait for batches nobody will read.
        if backend is not None:
            for _, _, handle, _ in pending:
                if handle is not None:
                    backend.cancel(handle)
            backend.close()
