"""glibc malloc tuned for the data path while a backup or restore runs.

Every chunk passes through a few fresh multi-MiB buffers (NBD reads, the stored object,
its payload, the plaintext). With glibc's defaults each one is a fresh ``mmap``, or the
heap grows and is trimmed around it, so each one faults in and zeroes a thousand new
pages. With higher mmap and trim thresholds the buffers are reused. Measured here:
a backup spent 1.6 CPU-seconds of kernel time per 700 MiB with the defaults against 0.5
with the heap kept (docs/backup.md); restoring the bench's 2 GiB backup took 75 000-90 000
minor faults instead of 220 000-260 000 (bench/restore_bench.py).

The setting is process-wide, and a Celery worker runs jobs for days: it is therefore
reference-counted across overlapping jobs, and glibc's defaults are set back (its dynamic
mmap threshold stays off, as after any mallopt) and the heap trimmed when the last job
ends. A no-op without glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from typing import Any

# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's own defaults (mallopt(3)); set back when the last job of the process ends.
_DEFAULT_MMAP_THRESHOLD = 128 * 1024
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
# Chunk buffers (4 MiB, a few bytes more for the object header) come from the heap below
# this and are reused; the heap is given back to the kernel only above the trim threshold.
_CHUNK_MMAP_THRESHOLD = 16 * 1024 * 1024
_CHUNK_TRIM_THRESHOLD = 32 * 1024 * 1024
_lock = threading.Lock()
_users = 0


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def chunk_friendly_malloc() -> Iterator[None]:
    """Keep chunk-sized buffers on the heap for the duration of the block (see module doc)."""
    global _users
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _users += 1
        if _users == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, _CHUNK_MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, _CHUNK_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
