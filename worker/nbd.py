"""The NBD engine: connecting, polling and bounded waits with libnbd.

The reader (worker/nbd_read.py), the writer (worker/nbd_write.py) and the read-back
verifier (worker/nbd_verify.py) sit on top of it. It uses only libnbd calls present in 1.14
(Debian 12) and still in 1.22 (Debian 13).

Every wait is bounded (``io_timeout``): a frozen server (a QEMU stopped with SIGSTOP, a
hung host) ends in :class:`NbdTimeoutError` naming the export, never in a job that waits
forever. Blocking calls (``pread``, ``block_status``) cannot time out by themselves:
a :class:`Watchdog` thread shuts the socket down under a call that waited too long, which
makes libnbd fail it at once. Asynchronous requests go through :class:`AioConnection`,
which bounds what is in flight and keeps each buffer referenced until its completion
callback ran (libnbd(3), "Completion callbacks").
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd

from vmvault.worker.errors import WorkerError
from vmvault.worker.signals import critical

BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1  # NBD spec, base:allocation: unallocated
STATE_ZERO = 2  # NBD spec, base:allocation: NBD_STATE_ZERO, "the extent will read as zeroes"
DIRTY = 1  # qemu:dirty-bitmap:<name>: bit 0 set = dirty
# How long any one NBD request (or the connection handshake) may wait for the server.
DEFAULT_IO_TIMEOUT = 120.0
# qemu-nbd and QEMU's NBD server advertise a 32 MiB maximum block size; anything larger
# must be split (NBD spec, "Block size constraints"). Used when the server sends none.
DEFAULT_MAX_REQUEST = 32 * 1024 * 1024


def dirty_context(bitmap: str) -> str:
    """The NBD meta context that exposes a QEMU dirty bitmap."""
    return f"qemu:dirty-bitmap:{bitmap}"


class NbdError(WorkerError):
    """Reading a disk over NBD failed (server gone, I/O error). Retryable."""

    retryable = True


class NbdTimeoutError(NbdError):
    """The NBD server did not answer within the I/O timeout (frozen or overloaded). Retryable."""


class NbdWriteError(NbdError):
    """An NBD connection or request failed while restoring a disk. Retryable (a new restore)."""


def connect_unix(h: Any, path: Path, timeout: float, what: str) -> None:
    """Connect ``h`` to the unix socket ``path`` and finish the handshake within ``timeout``.

    ``connect_unix`` would wait forever for a server that accepted the connection (the
    kernel does that for it) but never answers, like a QEMU stopped with SIGSTOP.
    """
    h.aio_connect_unix(str(path))
    deadline = time.monotonic() + timeout
    while h.aio_is_connecting():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NbdTimeoutError(
                f"{what}: NBD server on {path} did not complete the handshake within "
                f"{timeout:.0f}s (is its QEMU frozen?)"
            )
        h.poll(max(1, int(min(remaining, 1.0) * 1000)))
    if not h.aio_is_ready():
        raise NbdError(f"{what}: NBD connection to {path} failed: {nbd.get_error()}")


def poll(h: Any, timeout: float, what: str) -> None:
    """One ``poll`` of an aio handle; :class:`NbdTimeoutError` after ``timeout`` without any
    event (no reply, no room to send) from the server."""
    # Completion callbacks run Python inside libnbd's poll: an exception raised there
    # (a signal handler's) would be swallowed and leave the request unretired.
    with critical():
        ready = h.poll(max(1, int(timeout * 1000)))
    if ready == 0:
        raise NbdTimeoutError(
            f"{what}: the NBD server did not answer within {timeout:.0f}s "
            "(is its QEMU frozen or overloaded?)"
        )


class Watchdog:
    """Cuts the connection of a blocking call that has waited longer than ``timeout``.

    ``shutdown(2)`` on the handle's socket wakes the thread blocked in libnbd, whose call
    then fails; :meth:`waiting` turns that failure into :class:`NbdTimeoutError`.
    """

    def __init__(self, timeout: float, what: str) -> None:
        self.timeout = timeout
        self.what = what
        self._lock = threading.Lock()
        self._waits: dict[int, tuple[float, int]] = {}
        self._fired: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def waiting(self, h: Any, doing: str) -> Iterator[None]:
        key = id(h)
        with self._lock:
            self._waits[key] = (time.monotonic() + self.timeout, h.aio_get_fd())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nbd-watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        except nbd.Error as err:
            with self._lock:
                fired = key in self._fired
            if fired:
                raise NbdTimeoutError(
                    f"{self.what}: {doing} got no answer within {self.timeout:.0f}s "
                    "(is its QEMU frozen or overloaded?)"
                ) from err
            raise
        finally:
            with self._lock:
                self._waits.pop(key, None)
                self._fired.discard(key)

    def _run(self) -> None:
        tick = min(1.0, self.timeout / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                late = [(k, fd) for k, (deadline, fd) in self._waits.items() if now > deadline]
                for key, _ in late:
                    self._fired.add(key)
                    self._waits.pop(key)
            for _, fd in late:
                cut_socket(fd)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def cut_socket(fd: int) -> None:
    """Shut a connected socket down for both directions (the fd itself stays libnbd's)."""
    with contextlib.suppress(OSError):
        dup = socket.socket(fileno=os.dup(fd))
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()


def release(handle: Any) -> None:
    """Free a libnbd handle. NBD.close() exists from libnbd 1.16; before that the handle
    closes when freed."""
    closer = getattr(handle, "close", None)
    if closer is not None:
        closer()


def _error_value(err: Any) -> int:
    # libnbd passes the completion error as a mutable int (ctypes.c_int in 1.14).
    value = getattr(err, "value", err)
    return int(value)


Issue = Callable[[Callable[[Any], int]], object]
"""Sends one aio request given its completion callback (``h.aio_pwrite(..., completion=cb)``)."""


class AioConnection:
    """One connected libnbd handle and its asynchronous requests in flight.

    :meth:`issue` sends a request once there is room (at most ``max_in_flight`` requests
    and ``max_bytes`` bytes in flight) and keeps its buffer referenced until completion;
    a completion that reports an error is remembered and raised (as ``error``) by the next
    :meth:`poll_once`, :meth:`drain` or :meth:`check`. The export's size, request limit
    and capabilities are read once, at construction.
    """

    def __init__(
        self,
        handle: Any,
        label: str,
        io_timeout: float,
        max_in_flight: int,
        max_bytes: int,
        error: type[NbdError] = NbdError,
    ) -> None:
        self.handle = handle
        self.label = label
        self.io_timeout = io_timeout
        self._max_in_flight = max_in_flight
        self._max_bytes = max_bytes
        self._error = error
        # Buffers of requests still in flight, and the first error a completion saw.
        self._pending: dict[int, tuple[int, Any]] = {}
        self._inflight_bytes = 0
        self._next_tag = 0
        self._failure: str | None = None
        self.size: int = handle.get_size()
        maximum = handle.get_block_size(nbd.SIZE_MAXIMUM)
        self.max_request = min(maximum, DEFAULT_MAX_REQUEST) if maximum > 0 else DEFAULT_MAX_REQUEST
        self.can_zero = bool(handle.can_zero())
        self.can_flush = bool(handle.can_flush())
        self.can_status = bool(handle.can_meta_context(BASE_ALLOCATION))

    @property
    def busy(self) -> bool:
        """True while any request is in flight."""
        return bool(self._pending)

    def issue(
        self,
        what: str,
        offset: int,
        nbytes: int,
        keep: Any,
        issue: Issue,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """Send one request once there is room; ``keep`` (its buffer) stays referenced
        until its completion, which then runs ``on_done``."""
        while self._pending and (
            len(self._pending) >= self._max_in_flight
            or self._inflight_bytes + nbytes > self._max_bytes
        ):
            self.poll_once()
        tag = self._next_tag
        self._next_tag += 1

        def done(err: Any) -> int:
            # Runs inside libnbd: an exception escaping here would be swallowed and the
            # request never retired, so every failure is recorded for ``check`` instead.
            try:
                size, _ = self._pending.pop(tag)
                self._inflight_bytes -= size
                code = _error_value(err)
                if code and self._failure is None:
                    self._failure = (
                        f"{self.label}: NBD {what} at offset {offset} failed: {os.strerror(code)}"
                    )
                if on_done is not None:
                    on_done()
            except BaseException as exc:
                if self._failure is None:
                    self._failure = f"{self.label}: NBD {what} at offset {offset}: {exc!r}"
            # 1 = retire the command: nobody calls aio_command_completed for it.
            return 1

        self._pending[tag] = (nbytes, keep)
        self._inflight_bytes += nbytes
        try:
            issue(done)
        except nbd.Error as err:
            self._pending.pop(tag, None)
            self._inflight_bytes -= nbytes
            raise self._error(
                f"{self.label}: NBD {what} of {nbytes} bytes at offset {offset}: {err}"
            ) from err

    def check(self) -> None:
        """Raise the first failure a completion reported, once."""
        if self._failure is not None:
            message, self._failure = self._failure, None
            raise self._error(message)

    def poll_once(self) -> None:
        """Wait (bounded) for the server, run the completions that arrived, then ``check``."""
        try:
            poll(self.handle, self.io_timeout, self.label)
        except NbdError as err:
            raise self._error(str(err)) from err
        except nbd.Error as err:
            raise self._error(f"{self.label}: NBD connection failed: {err}") from err
        self.check()

    def drain(self) -> None:
        """Wait until nothing is in flight; raise the first failure."""
        while self._pending:
            self.poll_once()
        self.check()

    def close(self) -> None:
        """Let requests still in flight finish, disconnect (NBD_CMD_DISC) when possible,
        and always release the handle. Errors here are dropped: the job's own error (if
        any) says what went wrong."""
        try:
            while self._pending:
                poll(self.handle, self.io_timeout, self.label)
            if self.handle.aio_is_ready():
                self.handle.shutdown()
        except (nbd.Error, NbdError):
            pass
        finally:
            self._pending.clear()
            self._inflight_bytes = 0
            release(self.handle)
