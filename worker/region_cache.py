"""A bounded LRU of verified region bytes, with sequential read-ahead, for serving exports.

``vmvault serve`` (worker/serve.py) answers NBD reads of a few KiB to a few MiB from
regions of 4 MiB that must be fetched, rebuilt and hashed whole before any byte of them
is served. The cache keeps the newest regions (bounded in bytes), so that the many small
reads inside one region cost one fetch; ``ReadAhead`` notices a connection walking
forward and fetches the next regions in a small thread pool before they are asked for:

    reads     |r7|r7|r8|r8|r9| ...            one connection, walking forward
    fetched   |r7|r8 r9 r10 r11|r12|          r8.. in the pool while r7 is served

Every key is fetched by exactly one thread: a second reader of the same key waits on the
first one's future. A fetch that fails is forgotten (its waiters get the error, the next
read tries again), so one bad GET cannot poison the cache; nothing is ever cached that
was not returned by the loader.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# Regions fetched ahead of a connection that walks forward. Four regions of 4 MiB keep
# an S3 pipe busy (the restore fetches 8 at once across all its disks) and bound what a
# connection that stops early has fetched for nothing.
DEFAULT_READ_AHEAD = 4
DEFAULT_AHEAD_THREADS = 4


class RegionCache(Generic[K]):
    """Thread-safe LRU of ``load(key)`` results, bounded to ``capacity`` bytes.

    ``load`` must return the verified bytes of a key (or raise); the cache never stores
    an exception. ``capacity`` below one region still works: the region just read is
    kept until the next one evicts it.
    """

    def __init__(
        self,
        load: Callable[[K], bytes],
        capacity: int,
        ahead_threads: int = DEFAULT_AHEAD_THREADS,
    ) -> None:
        self._load = load
        self.capacity = capacity
        self._lock = threading.Lock()
        self._done: OrderedDict[K, bytes] = OrderedDict()
        self._size = 0
        self._inflight: dict[K, Future[bytes]] = {}
        self._pool = ThreadPoolExecutor(max(1, ahead_threads), thread_name_prefix="ahead")
        # Counters for tests and logs: how the reads were answered.
        self.hits = 0
        self.fetches = 0
        self.failures = 0

    @property
    def size(self) -> int:
        """Bytes held now."""
        with self._lock:
            return self._size

    def get(self, key: K) -> bytes:
        """The bytes of ``key``: from the cache, from a fetch in flight, else fetched now."""
        with self._lock:
            data = self._done.get(key)
            if data is not None:
                self._done.move_to_end(key)
                self.hits += 1
                return data
            fut = self._inflight.get(key)
            owner = fut is None
            if fut is None:
                fut = self._inflight[key] = Future()
        if owner:
            self._fetch(key, fut)
        return fut.result()

    def prefetch(self, keys: list[K]) -> None:
        """Fetch ``keys`` in the pool unless cached or in flight; returns at once."""
        todo: list[tuple[K, Future[bytes]]] = []
        with self._lock:
            for key in keys:
                if key in self._done or key in self._inflight:
                    continue
                fut: Future[bytes] = Future()
                self._inflight[key] = fut
                todo.append((key, fut))
        for key, fut in todo:
            try:
                self._pool.submit(self._fetch, key, fut)
            except RuntimeError:  # the pool was shut down (closing): nobody waits
                self._forget(key, fut, RuntimeError("the cache is closed"))

    def _fetch(self, key: K, fut: Future[bytes]) -> None:
        """Load ``key`` and publish the result (or the error) to ``fut``'s waiters."""
        try:
            data = self._load(key)
        except BaseException as err:
            self._forget(key, fut, err)
            if not isinstance(err, Exception):
                raise
            return
        with self._lock:
            self.fetches += 1
            self._inflight.pop(key, None)
            if key not in self._done:
                self._done[key] = data
                self._size += len(data)
                # Keep the newest entry even when it alone is over capacity.
                while self._size > self.capacity and len(self._done) > 1:
                    _, old = self._done.popitem(last=False)
                    self._size -= len(old)
        fut.set_result(data)

    def _forget(self, key: K, fut: Future[bytes], err: BaseException) -> None:
        with self._lock:
            self.failures += 1
            if self._inflight.get(key) is fut:
                del self._inflight[key]
        fut.set_exception(err)

    def close(self) -> None:
        """Stop the read-ahead pool (fetches running finish; queued ones are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        # A cancelled pool task never ran its _fetch: fail its future for any waiter.
        with self._lock:
            stranded = list(self._inflight.items())
        for key, fut in stranded:
            if not fut.done():
                self._forget(key, fut, RuntimeError("the cache is closed"))


class ReadAhead(Generic[K]):
    """One reader's (one NBD connection's) position: prefetches when it walks forward.

    A read of region ``i`` counts as forward when the previous one was ``i - 1`` or ``i``
    (many small reads inside a region, or the next region); then the ``depth`` regions
    after ``i`` that ``wanted`` accepts (zeros need no fetch) are prefetched. A jump
    resets the walk: random access fetches only what it reads. The position is advisory,
    so the races between parallel requests of one connection only shift a prefetch.
    """

    def __init__(
        self,
        cache: RegionCache[K],
        key: Callable[[int], K],
        count: int,
        wanted: Callable[[int], bool],
        depth: int = DEFAULT_READ_AHEAD,
    ) -> None:
        self._cache = cache
        self._key = key
        self._count = count
        self._wanted = wanted
        self._depth = depth
        self._last = -2

    def get(self, i: int) -> bytes:
        forward = self._last <= i <= self._last + 1
        self._last = i
        if forward and self._depth > 0:
            ahead = range(i + 1, min(self._count, i + 1 + self._depth))
            self._cache.prefetch([self._key(j) for j in ahead if self._wanted(j)])
        return self._cache.get(self._key(i))
