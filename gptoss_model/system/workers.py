"""Spread independent pieces of work (conversion chunks, export groups) over this process and N-1 others.

    pool = start_pool(2, init_worker, (state,))         # spawned now: their imports overlap our planning
    spread(items, here=lambda it: work(it), submit=lambda it: pool.submit(remote_work, it),
           pool=pool, on_done=record, describe=lambda it: f"chunk {it.index}")

Items are handed out one at a time from one queue, so a fast process takes
more. This process works too (in a thread, starting at once while the pool's
processes are still importing torch) and saves a process's worth of memory.
Spawned processes die with their parent (`die_with_parent`), run torch on one
thread (one process per core is the parallelism), and an exception they raise
comes back as is; one that died (killed, out of memory) raises WorkerError.
Items finished before a failure stay finished: the caller records them in
`on_done`, so a rerun does only the others.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import torch

from gptoss_model.system.processes import die_with_parent

T = TypeVar("T")


class WorkerError(RuntimeError):
    """A worker process died or failed."""


def _init(parent_pid: int, initializer: Callable | None, initargs: tuple) -> None:
    die_with_parent(parent_pid)
    torch.set_num_threads(1)
    if initializer is not None:
        initializer(*initargs)


def _ready() -> int:
    return os.getpid()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def useful_workers(requested: int, items: int) -> int:
    """More processes than items idle, more than cores only contend (each one imports torch: ~250 MB)."""
    return max(1, min(requested, items, cores()))


@dataclass
class WorkerPool:
    """Spawned processes (the process that spreads the work is not counted)."""

    executor: ProcessPoolExecutor
    processes: int

    def submit(self, fn: Callable, *args) -> Future:
        return self.executor.submit(fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def start_pool(processes: int, initializer: Callable | None = None, initargs: tuple = ()) -> WorkerPool:
    """Spawn `processes` processes now; `initializer(*initargs)` runs once in each (module-level, picklable)."""
    import multiprocessing as mp

    executor = ProcessPoolExecutor(max_workers=processes, mp_context=mp.get_context("spawn"), initializer=_init,
                                   initargs=(os.getpid(), initializer, initargs))
    for _ in range(processes):  # one submit spawns one process (while none is idle)
        executor.submit(_ready)
    return WorkerPool(executor, processes)


def spread(items: Iterable[T], *, here: Callable[[T], object], submit: Callable[[T], Future] | None,
           pool: WorkerPool | None, on_done: Callable[[T, object], None], describe: Callable[[T], str]) -> None:
    """Do every item: `here(item)` in this process, `submit(item)` (a Future of the same result) in the pool.

    `on_done(item, result)` is called once per finished item, under a lock, in finishing order.
    """
    todo, lock = deque(items), threading.Lock()

    def take() -> T | None:
        with lock:
            return todo.popleft() if todo else None

    def finished(item: T, result) -> None:
        with lock:
            on_done(item, result)

    def work_here() -> None:
        with torch.no_grad():
            while (item := take()) is not None:
                finished(item, here(item))

    if pool is None:
        work_here()
        return
    failure: list[BaseException] = []

    def local_worker() -> None:
        try:
            work_here()
        except BaseException as e:  # re-raised by the caller's thread below
            failure.append(e)

    local = threading.Thread(target=local_worker, name="spread-here", daemon=True)
    local.start()
    pending: dict[Future, T] = {}
    try:
        while True:
            while len(pending) < pool.processes and not failure and (item := take()) is not None:
                pending[submit(item)] = item
            if not pending:
                break
            for fut in wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)[0]:
                item = pending.pop(fut)
                try:
                    finished(item, fut.result())
                except BrokenProcessPool as e:
                    raise WorkerError(f"a worker process died while {describe(item)}: {e}; finished work is "
                                      "kept and a rerun does the rest") from e
    except BaseException:
        with lock:
            todo.clear()  # the local worker stops after its current item
        raise
    finally:
        local.join()
    if failure:
        raise failure[0]
