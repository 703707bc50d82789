"""SIGTERM and SIGINT as exceptions, deferred inside critical sections.

A job is stopped by an exception so that its teardown runs: ``SIGINT`` already raises
``KeyboardInterrupt``; ``SIGTERM`` (``systemctl stop``, ``kill``, a Celery shutdown)
would end the process on the spot and leave fleecing running in the guest's QEMU.
:func:`signals_as_exceptions` makes SIGTERM raise :class:`Terminated` instead.

Some steps must not be cut in half: between ``stop`` and ``cont`` of the guest, while a
teardown undoes what a job set up, or inside a call into C that calls back into Python
(a libnbd completion callback, or the event loop of a QMP command: an exception raised
there is swallowed or leaves the call half done). Inside :func:`critical` both signals
are remembered and raised when the outermost critical block ends. (Blocking them with
``pthread_sigmask`` does not work for this: Python runs its handlers in the main thread
whichever thread the kernel delivered the signal to.) Inside :func:`finishing` a job
that has committed its result completes: a signal then only gets a log line. Only
SIGKILL can still cut such a step; what it leaves behind is found by the reaper
(``worker/reaper.py``).
"""

from __future__ import annotations

import logging
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
_finishing = 0

log = logging.getLogger(__name__)


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
        if _depth == 0 and _pending and not _finishing:
            first = _pending[0]
            _pending.clear()
            _raise_for(first)


@contextmanager
def finishing() -> Iterator[None]:
    """The job has committed its result: SIGTERM/SIGINT no longer stop it, it completes.

    Stopping now would have nothing to undo; the signal is logged and dropped.
    """
    global _finishing
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _finishing += 1
    try:
        with critical():
            yield
    finally:
        _finishing -= 1
        if _finishing == 0 and _pending and _depth == 0:
            names = ", ".join(signal.Signals(n).name for n in _pending)
            _pending.clear()
            log.warning("%s came after the job committed its result: it completed", names)
