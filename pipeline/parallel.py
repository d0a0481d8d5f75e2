"""Ordered, bounded parallel map over worker processes.

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
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from pipeline.errors import DataError
from pipeline.lifeline import die_with_parent

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


def _start_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    """Runs first in each worker: follow the pool's process, then the stage's own initializer."""
    die_with_parent(expected_parent=parent)
    if initializer is not None:
        initializer(*initargs)


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    window: int = 0,
) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computed by ``workers`` processes.

    ``fn`` and ``initializer`` must be module-level functions (they are pickled by name).
    ``initializer(*initargs)`` runs once per worker, for state that is costly to build per
    batch (compiled filters, a loaded tokenizer). With one worker everything runs here.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    window = window or 2 * workers
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(), initializer, initargs)) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise DataError(
                f"a worker process of {getattr(fn, '__module__', 'the stage')} died before finishing its batch "
                '(killed for memory, or the calling script starts workers without an `if __name__ == "__main__":` guard)',
                "check the kernel log (dmesg) for the out-of-memory killer, or set workers = 1 in the recipe to run in one process",
            ) from None
        finally:
            # On an error or an early stop, do not wait for batches nobody will read.
            for future in pending:
                future.cancel()
