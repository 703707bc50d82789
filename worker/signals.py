"""SIGTERM and SIGINT as exceptions, deferred inside critical sections.

A job is stopped by an exception so that its teardown runs: ``SIGINT`` already raises
``KeyboardInterrupt``; ``SIGTERM`` (``systemctl stop``, ``kill``, a Celery shutdown)
would end the process on the spot and leave fleecing running in the guest's QEMU.
:func:`signals_as_exceptions` makes SIGTERM raise :class:`Terminated` instead.

Some steps must not be cut in half: between ``stop`` and ``cont`` of the guest, or while a
teardown undoes what a job set up. Inside :func:`critical` both signals are remembered
and raised when the outermost critical block ends. (Blocking them with
``pthread_sigmask`` does not work for this: Python runs its handlers in the main thread
whichever thread the kernel delivered the signal to.) Only SIGKILL can still cut such a
step; what it leaves behind is found by the reaper (``worker/cleanup.py``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class Terminated(BaseException):
    """The process got SIGTERM: the job stops and tears down. Not an error of the job."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_depth = 0
_pending: list[int] = []


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    if _depth > 0:
        if signum not in _pending:
            _pending.append(signum)
        return
    _raise_for(signum)


@contextmanager
def signals_as_exceptions(
    signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
) -> Iterator[None]:
    """While the block runs, SIGTERM raises ``Terminated`` and SIGINT ``KeyboardInterrupt``
    (those of ``signums``), deferred inside :func:`critical`. A no-op outside the main
    thread (signal handlers can only be installed there, and only there do they run)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    for wanted in signums:
        previous[wanted] = signal.signal(wanted, _handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def critical() -> Iterator[None]:
    """Defer SIGTERM/SIGINT until the outermost critical block ends, then raise them."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending:
            first = _pending[0]
            _pending.clear()
            _raise_for(first)
