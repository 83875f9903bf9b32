"""One bounded, order-keeping parallel map, over threads or processes.

Every stage that decodes, paints or post-processes in parallel uses it: curate decodes in
processes (PIL holds the GIL for parts of a decode), detect and embed decode and crop in threads
(their work releases the GIL and shares the model's process), the demo world paints in processes.
Results come back in input order, so outputs do not depend on the number of workers, and the
input iterator is pulled only as results are taken: memory holds a window, not a shard.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from itertools import islice
from typing import Any, Literal, TypeVar, overload

T = TypeVar("T")
R = TypeVar("R")

Kind = Literal["threads", "processes"]
Count = int | Literal["auto"]  # runtime.workers: a number, or "auto": the cores this process may use

_share: int | None = None  # this process's share of the machine's cores, when it has been given one


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, as taskset or Slurm set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share_cores(cores: int | None) -> None:
    """Give this process `cores` of the machine (a Ray worker: the CPUs it reserved; a
    data-parallel rank: the machine's cores divided among the ranks); None: all of them."""
    global _share
    _share = cores


def cores() -> int:
    """The cores this process may use: its share (`share_cores`), else the machine's."""
    return _share if _share is not None else machine_cores()


def count(workers: Count) -> int:
    """A number of decode workers: as given, or for "auto" one per core of this process's share.
    Decoding gives the same results for any number, so "auto" changes speed only."""
    return max(1, cores()) if workers == "auto" else workers


@overload
def pool(
    workers: Count, kind: Literal["threads"] = "threads", name: str = "worker"
) -> AbstractContextManager[Executor]: ...
@overload
def pool(workers: Count, kind: Kind, name: str = "worker") -> AbstractContextManager[Executor | None]: ...
def pool(
    workers: Count, kind: Kind = "threads", name: str = "worker"
) -> AbstractContextManager[Executor | None]:
    """An executor for `ordered_map`: threads, or spawned processes (not forked: the caller may
    have started threads — torch, BLAS — before us). Processes with workers ≤ 1 give None: the
    work then runs in this process, with the same results. "auto": `count`."""
    return _pool(count(workers), kind, name)


@contextmanager
def _pool(workers: int, kind: Kind, name: str) -> Iterator[Executor | None]:
    if kind == "processes":
        if workers <= 1:
            yield None
            return
        executor: Executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix=name)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _run_chunk(fn: Callable[[T], R], items: list[T]) -> list[R]:
    return [fn(item) for item in items]


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    executor: Executor | None,
    window: int,
    chunk: int = 1,
) -> Iterator[R]:
    """fn over items, in order, with at most `window` chunks of `chunk` items in flight.

    executor None runs fn here, one item at a time. `chunk` > 1 sends items to processes in
    groups, so the cost of pickling fn and the results is paid per group, not per item; fn must
    then be picklable (a module-level function or a functools.partial of one)."""
    if executor is None:
        yield from map(fn, items)
        return
    it = iter(items)
    pending: deque[Any] = deque()
    window = max(1, window)
    while group := list(islice(it, chunk)):
        if chunk == 1:
            pending.append((False, executor.submit(fn, group[0])))
        else:
            pending.append((True, executor.submit(_run_chunk, fn, group)))
        del group  # memory holds what is in flight, nothing more
        if len(pending) >= window:
            yield from _take(pending.popleft())
    while pending:
        yield from _take(pending.popleft())


def _take(entry: tuple[bool, Any]) -> Iterator[Any]:
    grouped, future = entry
    if grouped:
        yield from future.result()
    else:
        yield future.result()
