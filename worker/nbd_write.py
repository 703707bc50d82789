"""Writing a disk image over NBD with libnbd: many requests in flight, zeroes only where needed.

The restore data path is repository reader → ``NbdDiskWriter.write_and_verify`` → NBD
server (``qemu-nbd`` for files, QEMU's own ``block-export-add`` for incoming-mode domains):
chunks are written, each window of them flushed, then read back and their digests compared
with the backup's index (worker/nbd_verify.py) while later windows are written
(``write_chunks``, ``flush`` and ``verify`` are the same steps one after the other).

Chunk arithmetic (chunk size C, disk size S, the last chunk may be short)::

    offset   0        C        2C       3C            S
             |  data  |  zero  |  zero  |  data  | tail|
    request  pwrite   '-- one WRITE_ZEROES --'  pwrite pwrite     (target not known zero)
    request  pwrite   (nothing: already zero)    pwrite pwrite     (fresh image: sparse)

libnbd's aio calls do no I/O by themselves: progress happens in ``poll``. The requests go
through the engine's ``AioConnection`` (worker/nbd.py); the read-back checks are
worker/nbd_verify.py.
"""

from __future__ import annotations

import errno
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import nbd

from vmvault.storage.progress import Progress
from vmvault.worker.nbd import (
    BASE_ALLOCATION,
    DEFAULT_IO_TIMEOUT,
    AioConnection,
    Issue,
    NbdError,
    NbdWriteError,
    connect_unix,
    release,
)
from vmvault.worker.nbd_verify import ReadBack, VerifyError, Window

__all__ = ["NbdDiskWriter", "NbdWriteError", "VerifyError", "WriteStats", "sha256_hex"]

# Requests and bytes in flight, writes and read-backs together. The disk behind a local
# server is the limit, not the queue: the bench's 2 GiB restore was no slower with 8 / 32
# MiB than with 16 / 64 MiB (medians 3.4 vs 3.7 s in one set of 4 interleaved runs, equal
# within noise in another) with half the memory, and with fewer writes queued ahead of
# them the read-backs keep up (verify tail after the last write < 0.1 s, was 0.3-0.6 s).
DEFAULT_MAX_IN_FLIGHT = 8
DEFAULT_MAX_IN_FLIGHT_BYTES = 32 * 1024 * 1024
# Written, flushed, then read back as one unit; small enough that reading back overlaps
# the writing of the next windows, large enough that flushes stay rare.
DEFAULT_WINDOW = 128 * 1024 * 1024
_WRITES = ("write", "write-zeroes")


@dataclass
class WriteStats:
    """What ``write_chunks`` sent: data bytes, zeroed bytes, and bytes left as holes."""

    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = 0
    chunks: int = 0


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """A digest function for tests and callers without a repository (plain SHA-256 hex)."""
    return hashlib.sha256(data).hexdigest()


class NbdDiskWriter:
    """One NBD connection to a writable export of one disk.

    Use as a context manager; ``write_chunks`` → ``flush`` → ``verify``.
    """

    def __init__(
        self,
        socket: Path,
        disk: str,
        export_name: str = "",
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES,
        io_timeout: float = DEFAULT_IO_TIMEOUT,
    ) -> None:
        self.disk = disk
        self.io_timeout = io_timeout
        self._socket = socket
        self._export = export_name
        self._max_in_flight = max_in_flight
        self._max_bytes = max_in_flight_bytes
        self._conn: AioConnection | None = None
        self.size = 0
        # Set while write_and_verify runs: the window the writes being issued belong to.
        self._window: Window | None = None
        # State of write_chunks: the open run of zero chunks, the target, the stats.
        self._run: tuple[int, int] | None = None
        self._target_is_zero = False
        self._stats = WriteStats()

    # -- connection -----------------------------------------------------------------

    def __enter__(self) -> NbdDiskWriter:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self, timeout: float = 5.0) -> None:
        """Connect and read the export's size, limits and capabilities.

        A server that has just created its socket file may not listen on it yet (bind comes
        before listen): refused connections are retried for up to ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            handle = nbd.NBD()
            handle.set_export_name(self._export)
            # base:allocation lets verify skip reading ranges the server knows are zero.
            handle.add_meta_context(BASE_ALLOCATION)
            # libnbd zero-fills read buffers first unless told not to; a failed or short
            # read is an error here anyway, so that memset would only cost time.
            handle.set_pread_initialize(False)
            try:
                connect_unix(handle, self._socket, self.io_timeout, f"disk {self.disk}")
                break
            except NbdError as err:
                release(handle)
                raise NbdWriteError(str(err)) from err
            except nbd.Error as err:
                release(handle)
                retry = err.errnum in (errno.ECONNREFUSED, errno.ENOENT)
                if not retry or time.monotonic() > deadline:
                    raise NbdWriteError(
                        f"disk {self.disk}: cannot connect to NBD server at {self._socket}: {err}"
                    ) from err
                time.sleep(0.02)
        if handle.is_read_only():
            release(handle)
            raise NbdWriteError(
                f"disk {self.disk}: NBD export {self._export!r} at {self._socket} is read-only"
            )
        self._conn = AioConnection(
            handle, f"disk {self.disk}", self.io_timeout, self._max_in_flight, self._max_bytes,
            NbdWriteError,
        )  # fmt: skip
        self.size = self._conn.size

    def close(self) -> None:
        """Disconnect cleanly (NBD_CMD_DISC) when possible; always release the handle."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    @property
    def _c(self) -> AioConnection:
        if self._conn is None:
            raise NbdWriteError(f"disk {self.disk}: NBD connection is not open")
        return self._conn

    # -- request plumbing -------------------------------------------------------------

    def _issue(self, what: str, offset: int, nbytes: int, keep: Any, issue: Issue) -> None:
        """Send one request; a write counts against the window it belongs to until done."""
        window = self._window if what in _WRITES else None
        if window is None:
            self._c.issue(what, offset, nbytes, keep, issue)
            return
        window.writes += 1

        def written() -> None:
            window.writes -= 1

        try:
            self._c.issue(what, offset, nbytes, keep, issue, written)
        except BaseException:
            window.writes -= 1
            raise

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self._issue(
            "write",
            offset,
            len(data),
            data,
            lambda cb: self._c.handle.aio_pwrite(data, offset, completion=cb),
        )

    def _zero(self, offset: int, length: int) -> None:
        """Zero a range with NBD_CMD_WRITE_ZEROES (may punch holes), split at the server max."""
        while length > 0:
            step = min(length, self._c.max_request)
            if self._c.can_zero:
                # No NBD_CMD_FLAG_NO_HOLE: the server may unmap, which keeps images sparse.
                self._issue("write-zeroes", offset, 0, None, self._zero_request(step, offset))
            else:
                self._pwrite(bytes(step), offset)
            offset += step
            length -= step

    def _zero_request(self, length: int, offset: int) -> Issue:
        def issue(cb: Callable[[Any], int]) -> object:
            return self._c.handle.aio_zero(length, offset, completion=cb)

        return issue

    def _write_data(self, data: bytes, offset: int) -> None:
        step = self._c.max_request
        if len(data) <= step:
            self._pwrite(data, offset)
            return
        view = memoryview(data)
        for start in range(0, len(data), step):
            self._pwrite(view[start : start + step], offset + start)

    # -- public operations ----------------------------------------------------------

    def write_chunks(
        self,
        chunks: Iterable[tuple[int, bytes | None]],
        chunk_size: int,
        *,
        target_is_zero: bool,
        progress: Progress | None = None,
        after_chunk: Callable[[int], None] | None = None,
    ) -> WriteStats:
        """Write ``(offset, data | None)`` chunks in order; ``None`` means a chunk of zeroes.

        With ``target_is_zero`` (a fresh image) zero chunks are not sent at all; otherwise
        runs of zero chunks become as few WRITE_ZEROES requests as the server allows.
        A data chunk that happens to be all zero is treated as a zero chunk.
        ``after_chunk(end_offset)`` runs once each chunk's requests are issued.
        """
        self._stats = stats = WriteStats()
        self._target_is_zero = target_is_zero
        self._run = None
        zeros = b""
        # Offsets must only grow: a chunk written again later could land after the read-back
        # of its window checked it, and would never be verified.
        end = 0
        for offset, data in chunks:
            if offset % chunk_size:
                raise NbdWriteError(
                    f"disk {self.disk}: chunk offset {offset} is not a multiple of {chunk_size}"
                )
            if offset < end:
                raise NbdWriteError(
                    f"disk {self.disk}: chunk offset {offset} comes after offset {end}: the"
                    " chunks must be given in order, each once"
                )
            length = min(chunk_size, self.size - offset) if data is None else len(data)
            if length <= 0 or offset + length > self.size:
                raise NbdWriteError(
                    f"disk {self.disk}: chunk at offset {offset} ({length} bytes) does not fit"
                    f" the {self.size}-byte target: was the image created with the backup's size?"
                )
            if data is not None:
                if len(zeros) != len(data):
                    zeros = bytes(len(data))
                if data == zeros:
                    data = None
            stats.chunks += 1
            end = offset + length
            if data is None:
                if self._run is not None and self._run[1] != offset:
                    self._close_zero_run()
                start = offset if self._run is None else self._run[0]
                self._run = (start, offset + length)
            else:
                self._close_zero_run()
                self._write_data(data, offset)
                stats.bytes_written += len(data)
            if progress is not None:
                progress("write", offset + length, self.size)
            if after_chunk is not None:
                after_chunk(offset + length)
        self._close_zero_run()
        self._c.drain()
        return stats

    def _close_zero_run(self) -> None:
        """Send (or, on a zero target, just count) the open run of zero chunks."""
        if self._run is None:
            return
        start, end = self._run
        self._run = None
        if self._target_is_zero:
            self._stats.bytes_skipped += end - start
        else:
            self._zero(start, end - start)
            self._stats.bytes_zeroed += end - start

    def write_and_verify(
        self,
        chunks: Iterable[tuple[int, bytes | None]],
        chunk_size: int,
        expected: Sequence[str | None],
        digest: Callable[[bytes], str],
        *,
        target_is_zero: bool,
        window: int = DEFAULT_WINDOW,
        progress: Progress | None = None,
    ) -> tuple[WriteStats, int]:
        """Write the disk and verify it, pipelined in windows of ``window`` bytes.

        Each window is written, flushed (NBD_CMD_FLUSH once its writes completed: a flush
        covers only completed writes), then read back and checked against ``expected``,
        while the next windows are being written::

            window   0        1        2        3
            write    |=====|  |=====|  |=====|  |=====|
            flush          F        F        F        F
            verify          |=====|  |=====|  |=====|  |=====|

        Returns the write statistics and the bytes verified (the whole disk).
        """
        readback = ReadBack(self._c, self.disk, expected, chunk_size, digest, progress)
        chunks_per = max(1, window // chunk_size)
        total = len(expected)
        current = Window(0, min(chunks_per, total))
        readback.add(current)
        self._window = current

        def boundary(end_offset: int) -> None:
            nonlocal current
            if -(-end_offset // chunk_size) >= current.end:
                # Zeroes of a run open at the boundary belong to this window's writes.
                self._close_zero_run()
                current.closed = True
                self._window = None
                if current.end < total:
                    current = Window(current.end, min(current.end + chunks_per, total))
                    readback.add(current)
                    self._window = current
            readback.pump(block=False)

        try:
            stats = self.write_chunks(
                chunks, chunk_size, target_is_zero=target_is_zero, progress=progress,
                after_chunk=boundary,
            )  # fmt: skip
            self._window = None
            if not readback.all_closed():
                raise NbdWriteError(
                    f"disk {self.disk}: the backup gave chunks up to offset"
                    f" {current.first * chunk_size} only, the disk has {self.size} bytes"
                )
            readback.pump(block=True)
        finally:
            self._window = None
            readback.close()
        return stats, readback.verified

    def flush(self) -> None:
        """NBD_CMD_FLUSH: everything written is on stable storage at the server."""
        self._c.drain()
        if not self._c.can_flush:
            return
        try:
            self._c.handle.flush()
        except nbd.Error as err:
            raise NbdWriteError(f"disk {self.disk}: NBD flush failed: {err}") from err

    def verify(
        self,
        expected: Sequence[str | None],
        chunk_size: int,
        digest: Callable[[bytes], str],
        *,
        progress: Progress | None = None,
    ) -> int:
        """Read every chunk back and compare with ``expected`` (digest, or None for zeroes).

        Call after ``flush``. Returns the bytes verified; ``VerifyError`` names the disk
        and the first bad offset.
        """
        self._c.drain()
        readback = ReadBack(self._c, self.disk, expected, chunk_size, digest, progress)
        chunks_per = max(1, DEFAULT_WINDOW // chunk_size)
        for first in range(0, len(expected), chunks_per):
            readback.add(
                Window(first, min(first + chunks_per, len(expected)), True, state="flushed")
            )
        try:
            readback.pump(block=True)
        finally:
            readback.close()
        return readback.verified
