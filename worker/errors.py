"""Errors of the worker package: one base, subclasses say whether a retry can help."""

from typing import ClassVar


class WorkerError(Exception):
    """Base of every worker error (QMP, NBD, backup, restore). Not retryable unless noted."""

    # Whether running the same job again later can succeed: data, so the job frame and
    # callers can ask (``err.retryable``) instead of reading docstrings.
    retryable: ClassVar[bool] = False


class RestoreError(WorkerError):
    """A restore could not be done as asked (bad request or a failed step). Not retryable."""


class ServeError(WorkerError):
    """``vmvault serve`` could not start or keep its NBD server (nbdkit missing or exited,
    socket path taken). Not retryable as it stands: the message says what to change."""


class FilesError(WorkerError):
    """``vmvault files`` could not list or fetch as asked: no such path or filesystem, a
    file in the way, or the libguestfs appliance failed. Not retryable as it stands: the
    message says what to change or install."""
