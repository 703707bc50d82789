"""Reading a restored disk back over NBD and checking it against the backup's index.

The verifier of the restore data path (worker/nbd_write.py writes; this module reads back).
It shares the writer's NBD connection (the engine's ``AioConnection``, worker/nbd.py) and
needs nothing else of the writer: each :class:`Window` of chunks, once its writes are
done, is flushed, asked for its zero extents, read back and checked in disk order.
"""

from __future__ import annotations

import bisect
import functools
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import nbd

from vmvault.storage.progress import Progress
from vmvault.worker.errors import WorkerError
from vmvault.worker.nbd import BASE_ALLOCATION, STATE_ZERO, AioConnection, Issue, NbdWriteError


class VerifyError(WorkerError):
    """What was read back from a restored disk differs from the backup. Not retryable."""

    def __init__(self, disk: str, offset: int, message: str) -> None:
        super().__init__(message)
        self.disk = disk
        self.offset = offset


def _covered(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """True when ``[start, end)`` lies inside one of the sorted, merged ``ranges``."""
    index = bisect.bisect_right(ranges, (start, 1 << 62)) - 1
    return index >= 0 and ranges[index][0] <= start and end <= ranges[index][1]


@dataclass
class Window:
    """Chunks ``[first, end)`` that are written, then flushed, then read back.

    state: writing → flushing → flushed → status (block status asked) → ready (read back).
    """

    first: int
    end: int
    closed: bool = False  # every write of the window has been issued
    writes: int = 0  # writes of the window still in flight
    state: str = "writing"
    zero_ranges: list[tuple[int, int]] = field(default_factory=list)

    def set_state(self, state: str) -> None:
        self.state = state


class ReadBack:
    """Reads chunks back once their window is flushed, and checks them in disk order.

    A zero chunk inside an extent the server reports as ``NBD_STATE_ZERO``
    (``base:allocation``: "will read as zeroes") is verified without reading it. Hashing
    runs in a small thread pool (blake3 and hashlib release the GIL) so reads stay in
    flight meanwhile; read buffers are recycled, so memory stays at a few chunks.
    """

    def __init__(
        self,
        conn: AioConnection,
        disk: str,
        expected: Sequence[str | None],
        chunk_size: int,
        digest: Callable[[bytes], str],
        progress: Progress | None,
        buffers: int = 8,
        hash_threads: int = 2,
    ) -> None:
        needed = -(-conn.size // chunk_size)
        if len(expected) != needed:
            raise VerifyError(
                disk,
                0,
                f"disk {disk}: the index has {len(expected)} chunks but the restored"
                f" disk of {conn.size} bytes needs {needed} (chunk size {chunk_size})",
            )
        self.conn = conn
        self.disk = disk
        self.size = conn.size
        self.expected = expected
        self.chunk_size = chunk_size
        self.digest = digest
        self.progress = progress
        self.windows: deque[Window] = deque()
        self.next_index = 0
        # [offset, length, wanted digest, buffer or None (not read), parts in flight]
        self.reads: deque[list[Any]] = deque()
        self.hashing: deque[
            tuple[int, int, str | None, bytearray | None, Future[str | None] | None]
        ] = deque()
        self.free = [bytearray(chunk_size) for _ in range(buffers)]
        self.zero_chunk = bytes(chunk_size)
        self.verified = 0
        self.pool = ThreadPoolExecutor(hash_threads, thread_name_prefix="verify")

    def add(self, window: Window) -> None:
        self.windows.append(window)

    def all_closed(self) -> bool:
        return all(w.closed for w in self.windows)

    @property
    def done(self) -> bool:
        return (
            not self.windows
            and not self.reads
            and not self.hashing
            and self.next_index >= len(self.expected)
        )

    def pump(self, block: bool) -> None:
        """Move windows on, issue read-backs, settle finished hashes; ``block``: until done."""
        try:
            while True:
                self._advance_windows()
                self._issue_reads()
                self._hand_over()
                while self.hashing and (self.hashing[0][4] is None or self.hashing[0][4].done()):
                    self._settle_one()
                if not block or self.done:
                    break
                if self.conn.busy:
                    self.conn.poll_once()
                elif self.hashing:
                    self._settle_one()
                elif not self._can_move():
                    raise NbdWriteError(
                        f"disk {self.disk}: verification stalled at offset"
                        f" {self.next_index * self.chunk_size}"
                    )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the hash threads (idempotent)."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _can_move(self) -> bool:
        return any(w.state in ("flushed", "ready") for w in self.windows) or any(
            w.state == "writing" and w.closed and w.writes == 0 for w in self.windows
        )

    def _advance_windows(self) -> None:
        conn = self.conn
        for win in list(self.windows):
            if win.state == "writing" and win.closed and win.writes == 0:
                if conn.can_flush:
                    win.state = "flushing"
                    flushed = functools.partial(win.set_state, "flushed")
                    offset = win.first * self.chunk_size
                    conn.issue("flush", offset, 0, None, self._flush_request(), flushed)
                else:
                    win.state = "flushed"
            if win.state == "flushed":
                start = win.first * self.chunk_size
                end = min(win.end * self.chunk_size, self.size)
                if conn.can_status and end > start:
                    win.state = "status"
                    ready = functools.partial(win.set_state, "ready")
                    status = self._status_request(win, start, end - start)
                    conn.issue("block-status", start, 0, None, status, ready)
                else:
                    win.state = "ready"

    def _issue_reads(self) -> None:
        cs = self.chunk_size
        while self.windows:
            win = self.windows[0]
            if win.state != "ready":
                return
            if self.next_index >= win.end:
                self.windows.popleft()
                continue
            offset = self.next_index * cs
            length = min(cs, self.size - offset)
            want = self.expected[self.next_index]
            if want is None and _covered(win.zero_ranges, offset, offset + length):
                # Verified by the server's block status; queued to keep results in order.
                self.reads.append([offset, length, None, None, 0])
            elif self.free:
                entry: list[Any] = [offset, length, want, self.free.pop(), 0]
                self.reads.append(entry)
                self._read_into(entry)
            else:
                return
            self.next_index += 1

    def _check(self, buf: bytearray, length: int, want: str | None) -> str | None:
        """None when the chunk matches, else what was found instead (runs in the pool)."""
        if want is None:
            if length == self.chunk_size:
                return None if buf == self.zero_chunk else "data"
            return None if not any(memoryview(buf)[:length]) else "data"
        data = buf if length == self.chunk_size else memoryview(buf)[:length]
        # The digest functions (blake3, hashlib) take any buffer: no copy of the chunk.
        got = self.digest(data)  # type: ignore[arg-type]
        return None if got == want else got

    def _hand_over(self) -> None:
        while self.reads and self.reads[0][4] == 0:
            offset, length, want, buf, _ = self.reads.popleft()
            fut = None if buf is None else self.pool.submit(self._check, buf, length, want)
            self.hashing.append((offset, length, want, buf, fut))

    def _settle_one(self) -> None:
        offset, length, want, buf, fut = self.hashing.popleft()
        found = fut.result() if fut is not None else None
        if buf is not None:
            self.free.append(buf)
        if found is not None:
            if want is None:
                detail = "should be all zeroes but holds data"
            else:
                detail = f"has digest {found}, the backup's index says {want}"
            raise VerifyError(
                self.disk,
                offset,
                f"disk {self.disk}: verification failed at offset {offset}"
                f" ({offset:#x}): the chunk read back {detail}",
            )
        self.verified += length
        if self.progress is not None:
            self.progress("verify", self.verified, self.size)

    def _read_into(self, entry: list[Any]) -> None:
        offset, length, _, buf, _ = entry
        view = memoryview(buf)[:length]

        def part_done() -> None:
            entry[4] -= 1

        step = self.conn.max_request
        for start in range(0, length, step):
            part = view[start : start + step]
            nbd_buf = nbd.Buffer.from_buffer(part)
            entry[4] += 1
            self.conn.issue(
                "read",
                offset + start,
                len(part),
                nbd_buf,
                self._read_request(nbd_buf, offset + start),
                part_done,
            )

    def _read_request(self, buf: Any, offset: int) -> Issue:
        def issue(cb: Callable[[Any], int]) -> object:
            return self.conn.handle.aio_pread(buf, offset, completion=cb)

        return issue

    def _status_request(self, window: Window, offset: int, length: int) -> Issue:
        def extent(context: str, start: int, entries: list[int], err: Any) -> int:
            # Runs inside libnbd: record only, never call back into the handle.
            if context == BASE_ALLOCATION:
                pos = start
                for size, flags in zip(entries[::2], entries[1::2], strict=True):
                    if flags & STATE_ZERO:
                        ranges = window.zero_ranges
                        if ranges and ranges[-1][1] == pos:
                            ranges[-1] = (ranges[-1][0], pos + size)
                        else:
                            ranges.append((pos, pos + size))
                    pos += size
            return 0

        def issue(cb: Callable[[Any], int]) -> object:
            return self.conn.handle.aio_block_status(length, offset, extent, completion=cb)

        return issue

    def _flush_request(self) -> Issue:
        def issue(cb: Callable[[Any], int]) -> object:
            return self.conn.handle.aio_flush(completion=cb)

        return issue
