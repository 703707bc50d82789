"""The serve cache's own rules (pure logic, a loader function instead of a repository):
one fetch per key at a time, failures never cached, bounded size, read-ahead when walking
forward only."""

from __future__ import annotations

import threading
import time

import pytest

from vmvault.worker.region_cache import ReadAhead, RegionCache


class Loader:
    """Counts calls per key; fails keys in ``bad`` (once each if ``once``)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: dict[int, int] = {}
        self.bad: set[int] = set()
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, key: int) -> bytes:
        with self.lock:
            self.calls[key] = self.calls.get(key, 0) + 1
        time.sleep(self.delay)
        if key in self.bad:
            raise OSError(f"key {key} is damaged")
        return bytes([key % 256]) * 100


def test_concurrent_gets_of_one_key_fetch_it_once() -> None:
    load = Loader(delay=0.05)
    cache: RegionCache[int] = RegionCache(load, capacity=10_000)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(7))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [bytes([7]) * 100] * 8
    assert load.calls == {7: 1}
    cache.close()


def test_a_failed_fetch_reaches_its_waiters_and_is_not_cached() -> None:
    load = Loader(delay=0.05)
    load.bad.add(3)
    cache: RegionCache[int] = RegionCache(load, capacity=10_000)
    errors: list[BaseException] = []

    def get() -> None:
        try:
            cache.get(3)
        except OSError as err:
            errors.append(err)

    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert len(errors) == 4 and all("damaged" in str(e) for e in errors)
    load.bad.clear()  # the store recovered: the next read fetches again and succeeds
    assert cache.get(3) == bytes([3]) * 100
    assert load.calls[3] == 2
    cache.close()


def test_size_stays_bounded_and_the_newest_stay() -> None:
    load = Loader()
    cache: RegionCache[int] = RegionCache(load, capacity=350)
    for key in range(10):
        cache.get(key)
    assert cache.size <= 350
    cache.get(9)
    assert load.calls[9] == 1  # still cached
    cache.get(0)
    assert load.calls[0] == 2  # evicted long ago
    tiny: RegionCache[int] = RegionCache(Loader(), capacity=10)
    assert tiny.get(1) == bytes([1]) * 100  # larger than capacity: served, kept alone
    assert tiny.size == 100
    cache.close()
    tiny.close()


def test_read_ahead_prefetches_when_walking_forward_only() -> None:
    load = Loader()
    cache: RegionCache[int] = RegionCache(load, capacity=100_000)
    ahead = ReadAhead(cache, lambda i: i, count=20, wanted=lambda i: i != 3, depth=2)
    ahead.get(0)  # first read: no walk yet
    ahead.get(1)  # forward: 2 and 3 ahead, 3 is not wanted (zeros)
    deadline = time.monotonic() + 5
    while 2 not in load.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert sorted(load.calls) == [0, 1, 2]
    ahead.get(10)  # a jump: random access fetches what it reads only
    time.sleep(0.05)
    assert sorted(load.calls) == [0, 1, 2, 10]
    ahead.get(19)  # ... and at the end nothing past the disk is asked for
    ahead.get(19)
    time.sleep(0.05)
    assert sorted(load.calls) == [0, 1, 2, 10, 19]
    ahead.get(2)
    assert load.calls[2] == 1  # the prefetched region is served from the cache
    cache.close()


def test_a_failed_prefetch_does_not_poison_the_cache() -> None:
    load = Loader()
    load.bad.add(5)
    cache: RegionCache[int] = RegionCache(load, capacity=100_000)
    cache.prefetch([5])
    deadline = time.monotonic() + 5
    while cache.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="damaged"):
        cache.get(5)  # fetched again (the prefetch's failure was forgotten), fails again
    assert load.calls[5] == 2
    load.bad.clear()
    assert cache.get(5) == bytes([5]) * 100
    cache.close()
