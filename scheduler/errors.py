"""Errors of the scheduler package (CLI, planning, enqueueing)."""


class SchedulerError(Exception):
    """Base of every scheduler/CLI error. Not retryable unless a subclass says so."""
