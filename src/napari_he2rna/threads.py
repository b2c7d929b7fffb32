"""Thread pools whose workers never keep the process alive: Ctrl-C ends a command at once (issue 21).

:class:`concurrent.futures.ThreadPoolExecutor` joins its workers when the interpreter exits. A worker whose
start Ctrl-C interrupted (the main thread waits for a new thread to start, and a signal can end that wait)
is never registered, so it is never told to stop, and the process hangs at exit for ever. dask's threaded
scheduler keeps such a pool for the whole process and starts its workers from the main thread (a slide's
thumbnail, when tiling and under the heatmaps). :class:`DaemonThreadPool` runs tasks on daemon threads
instead: nothing waits for them at exit. Inside :func:`daemon_threads_for_dask`, dask's threaded scheduler
uses one (a command runs in it; a library user's code keeps dask's own pool).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import threading
from concurrent.futures import Executor, Future
from typing import Any

__all__ = ["DaemonThreadPool", "shared_pool", "daemon_threads_for_dask"]

_shared: DaemonThreadPool | None = None
_shared_lock = threading.Lock()


class DaemonThreadPool(Executor):
    """A thread pool of daemon threads, started on demand up to ``max_workers``.

    Tasks run in a copy of the submitting thread's context (contextvars), as dask's own pool runs them.
    :meth:`shutdown` with ``wait`` waits for the tasks already running; nothing waits for them at exit.
    """

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "he2rna-pool") -> None:
        self._max_workers = int(max_workers or min(32, (os.cpu_count() or 1) + 4))
        if self._max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._shut = False

    def submit(self, fn, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        context = contextvars.copy_context()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put((future, context, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self._prefix}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, context, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = context.run(fn, *args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, context, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in self._threads:
                self._queue.put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()


def shared_pool() -> DaemonThreadPool:
    """The process's pool for dask's threaded scheduler (one worker per core, as dask's own)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = DaemonThreadPool(os.cpu_count() or 1, thread_name_prefix="he2rna-dask")
        return _shared


def daemon_threads_for_dask() -> contextlib.AbstractContextManager:
    """Inside the block, dask's threaded scheduler runs on :func:`shared_pool` (a command runs in one)."""
    import dask

    return dask.config.set(pool=shared_pool())
