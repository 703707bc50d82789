"""Errors of the scheduler package (CLI, planning, enqueueing)."""

from typing import ClassVar


class SchedulerError(Exception):
    """Base of every scheduler/CLI error. Not retryable unless a subclass says so."""

    # Whether running the same job again later can succeed: data, so the job frame and
    # callers can ask (``err.retryable``) instead of reading docstrings.
    retryable: ClassVar[bool] = False
