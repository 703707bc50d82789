"""The backend interface: the six object operations every backend offers, and their types.

See the package docstring (storage/backends/__init__.py) for the contract of each call.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from vmvault.storage.errors import CorruptObjectError, ObjectTooLargeError

# An object body: one bytes-like object (chunks come straight from NBD reads), or pieces
# stored as their concatenation.
Blob = bytes | bytearray | memoryview
Data = Blob | Sequence[Blob]


@dataclass
class Litter:
    """What ``sweep_litter`` found: temp files removed and kept (young), directories removed."""

    temp_files_deleted: int = 0
    temp_files_in_grace: int = 0
    empty_dirs_removed: int = 0


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: key relative to the repository root, size, last-modified (UTC)."""

    key: str
    size: int
    modified: datetime


class Backend(Protocol):
    """What the repository needs from an object store."""

    url: str

    def get(self, key: str, max_size: int | None = None) -> bytes: ...

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of an object; ``CorruptObjectError`` when the
        object is shorter (format 2 reads a chunk's table, a chunk's body or one fragment
        of a pack this way)."""
        ...

    def put(
        self, key: str, data: Data, if_absent: bool = False, defer_sync: bool = False
    ) -> bool: ...

    def flush(self) -> None: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def sweep_litter(self, older_than: datetime, dry_run: bool = False) -> Litter: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for transient failures (S3 only).

    The defaults wait about 25 s in total on average (up to ~50 s) before giving up.
    """

    attempts: int = 10
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


def short_range(key: str, url: str, offset: int, length: int, got: int) -> CorruptObjectError:
    return CorruptObjectError(
        f"object {key!r} in {url} is truncated: {got} bytes at offset {offset}, expected {length}"
    )


def too_large(key: str, url: str, size: int, limit: int) -> ObjectTooLargeError:
    return ObjectTooLargeError(
        f"object {key!r} in {url} is {size} bytes, more than the {limit} it may have: "
        "damaged or not written by vmvault; it was not read"
    )
