"""A bounded group of tasks in the repository's thread pool: the first failure kept, all awaited.

Both disk writers (storage/writer.py for version 1, storage/region_writer.py for version
2) hand their per-chunk work to the repository's shared pool through one of these: at most
``limit`` tasks are in flight (each holds a chunk or region in memory, so this bounds the
writer's memory), the first failure is kept and raised by ``check`` and ``wait``, and
``cancel`` drops what has not started (an aborted backup).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from vmvault.storage.errors import StorageError


class TaskGroup:
    """Tasks of one disk writer; thread-safe."""

    def __init__(self, pool: ThreadPoolExecutor, limit: int, failure: str) -> None:
        self._pool = pool
        self._slots = threading.BoundedSemaphore(limit)
        self._failure = failure  # prefix of the error a non-storage exception becomes
        self._lock = threading.Lock()
        self._futures: set[Future[None]] = set()
        self._error: BaseException | None = None

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` in the pool; blocks while ``limit`` tasks are in flight."""
        self._slots.acquire()
        try:
            fut = self._pool.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future[None]) -> None:
        self._slots.release()
        with self._lock:
            self._futures.discard(fut)
            if not fut.cancelled() and fut.exception() is not None and self._error is None:
                err = fut.exception()
                self._error = (
                    err
                    if isinstance(err, StorageError)
                    else StorageError(f"{self._failure}: {err!r}")
                )

    def check(self) -> None:
        """Raise the first failure, if a task failed."""
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        """Wait for every task, then raise the first failure, if any."""
        self._drain(cancel=False)
        self.check()

    def cancel(self) -> None:
        """Cancel the tasks not started yet and wait for the rest."""
        self._drain(cancel=True)

    def _drain(self, cancel: bool) -> None:
        with self._lock:
            pending = list(self._futures)
        for fut in pending:
            if cancel:
                fut.cancel()
        for fut in pending:
            if not fut.cancelled():
                fut.exception()  # waits
