"""Errors of the storage package: one base, subclasses say whether a retry can help."""

from __future__ import annotations

from typing import ClassVar


class StorageError(Exception):
    """Base of every repository error. Not retryable unless a subclass says so."""

    # Whether running the same job again later can succeed: data, so the job frame and
    # callers can ask (``err.retryable``) instead of reading docstrings.
    retryable: ClassVar[bool] = False


class RepositoryNotFoundError(StorageError):
    """No repository at the URL (no ``config`` object). Not retryable: run ``vmvault init``."""


class RepositoryExistsError(StorageError):
    """``init`` found a repository already there. Not retryable: nothing was overwritten."""


class UnsupportedVersionError(StorageError):
    """The repository or an object was written by a newer format version. Upgrade vmvault."""


class PassphraseError(StorageError):
    """The passphrase is missing or wrong (or the key object was altered). Not retryable."""


class InvalidNameError(StorageError):
    """A domain, disk or backup id would escape its key space. Not retryable: fix the name."""


class ObjectNotFoundError(StorageError):
    """An object the repository needs is missing. Not retryable: run ``vmvault verify``."""


class CorruptObjectError(StorageError):
    """An object failed to parse, decrypt or match its digest. Not retryable: data damage."""


class BackupNotFoundError(StorageError):
    """No committed backup with that id (or domain). Not retryable: see ``vmvault list``."""


class BackendUnavailableError(StorageError):
    """The storage endpoint kept failing (down, 5xx, throttling) after retries. Retryable."""

    retryable = True


class RepositoryLockedError(StorageError):
    """Another process holds a conflicting repository lock (GC vs. backups). Retryable later."""

    retryable = True


class LeaseExpiredError(StorageError):
    """A backup's lease lapsed before commit, so GC may have run: retry the whole backup."""

    retryable = True


class WriterError(StorageError):
    """The writer API was misused (misaligned chunk, chunk given twice, missing chunk). A bug."""


class ConfigMismatchError(StorageError):
    """The repository's ``config`` contradicts its key object or the fleet config (encryption
    switched off, config edited after its key was made). Not retryable: possible tampering."""


class ObjectTooLargeError(CorruptObjectError):
    """An object is larger than anything of its kind may be; it was not read. Not retryable:
    data damage or tampering."""


class FormatUpgradeNeededError(StorageError):
    """A version 1 repository was asked to take a new backup. Not retryable: run
    ``vmvault upgrade`` (existing backups stay readable)."""


class CopyError(StorageError):
    """A copy between repositories cannot be made as asked (chunk sizes differ, the
    target is format version 1). Not retryable: choose or make another target."""
