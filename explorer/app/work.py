"""Heavy work off the Tornado event loop: one bounded pool per server process.

* :func:`threads` - a process-wide thread pool (:data:`MAX_THREADS` workers) for numpy,
  file and zip work that releases the GIL: saves, metadata joins, tag counts, neighbour
  searches, label propagation, the overview.
* :func:`processes` - a process-wide pool of :data:`MAX_PROCESSES` worker process(es) for
  re-clustering (UMAP + HDBSCAN run numba code that can hold the GIL, and their libraries
  use ``warnings.catch_warnings``, which is not thread-safe: in a separate process neither
  can stall or confuse the server).

Sessions share both pools, so ten people pressing "Re-cluster" queue instead of starting ten
UMAP fits at once. :class:`Generation` lets a session drop a result when the person moved on.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable

__all__ = ["threads", "processes", "Generation", "MAX_THREADS", "MAX_PROCESSES"]

MAX_THREADS = max(2, min(4, (os.cpu_count() or 2)))
MAX_PROCESSES = 1

_lock = threading.Lock()
_threads: ThreadPoolExecutor | None = None
_processes: ProcessPoolExecutor | None = None


def _lower_priority() -> None:
    """Run this worker thread at a lower CPU priority than the event loop (Linux: per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: same priority then
        pass


def threads() -> Executor:
    """The process-wide thread pool (its threads yield the CPU to the event loop first)."""
    global _threads
    with _lock:
        if _threads is None:
            _threads = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="explorer-work",
                                          initializer=_lower_priority)
        return _threads


def processes() -> Executor:
    """The process-wide worker-process pool (started on first use, ``spawn``: no forked locks)."""
    global _processes
    with _lock:
        if _processes is None:
            import multiprocessing

            _processes = ProcessPoolExecutor(max_workers=MAX_PROCESSES,
                                             mp_context=multiprocessing.get_context("spawn"))
        return _processes


def when_done(future: Future, doc: Any, finish: Callable[[Any], None]) -> None:
    """Once ``future`` is done, call ``finish(result)`` on ``doc``'s next tick (the result,
    or the exception it raised: reported by ``finish``, never lost in a thread); nothing
    when the session is gone."""

    def done(fut: Future) -> None:
        try:
            result = fut.result()
        except Exception as exc:
            result = exc
        try:
            doc.add_next_tick_callback(lambda: finish(result))
        except Exception:  # the session is gone
            pass

    future.add_done_callback(done)


def recluster_in_worker(X, parent: str, seed: int = 42):
    """``explorer.stages.hierarchy.recluster`` (run in the worker process; a ValueError is returned)."""
    from explorer.stages.hierarchy import recluster

    try:
        return recluster(X, parent, seed=seed)
    except ValueError as exc:
        return exc


class Generation:
    """A counter a session bumps whenever the person moves on (new selection, reset, drill).

    A background job remembers :attr:`value` when it starts; its result is shown only if
    :meth:`current` still says the same when it finishes (review L12)."""

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> int:
        self.value += 1
        return self.value

    def current(self, value: int) -> bool:
        return value == self.value
