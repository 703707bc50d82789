"""Errors of the storage package: one base, subclasses say whether a retry can help."""


class StorageError(Exception):
    """Base of every repository error. Not retryable unless a subclass says so."""
