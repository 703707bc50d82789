"""Errors of the worker package: one base, subclasses say whether a retry can help."""


class WorkerError(Exception):
    """Base of every worker error (QMP, NBD, backup, restore). Not retryable unless noted."""
