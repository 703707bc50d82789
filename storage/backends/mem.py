"""``mem://name``: a repository in this process's memory, for fast unit tests.

Objects live in a process-wide table per name, so a repository opened twice by URL (a
writer, then a reader) sees the same objects, as with a directory or a bucket. Puts are
atomic and immediately "durable"; nothing is left behind to sweep. Never configured
for real backups: the fleet config accepts only file:// and s3:// (``check_url``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

from vmvault.storage.backends.base import (
    Backend,
    Data,
    Litter,
    ObjectInfo,
    short_range,
    too_large,
)
from vmvault.storage.errors import ObjectNotFoundError, StorageError

_STORES: dict[str, dict[str, tuple[bytes, datetime]]] = {}
_STORES_LOCK = threading.Lock()


class MemBackend:
    """A dict of key → (body, modified), shared by every backend opened on the same name."""

    def __init__(self, url: str, objects: dict[str, tuple[bytes, datetime]]) -> None:
        self.url = url
        self._objects = objects
        self._lock = _STORES_LOCK

    def get(self, key: str, max_size: int | None = None) -> bytes:
        with self._lock:
            found = self._objects.get(key)
        if found is None:
            raise ObjectNotFoundError(f"object {key!r} not found in {self.url}")
        body = found[0]
        if max_size is not None and len(body) > max_size:
            raise too_large(key, self.url, len(body), max_size)
        return body

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        body = self.get(key)
        data = body[offset : offset + length]
        if len(data) != length:
            raise short_range(key, self.url, offset, length, len(data))
        return data

    def put(self, key: str, data: Data, if_absent: bool = False, defer_sync: bool = False) -> bool:
        if not key:
            raise StorageError(f"unsafe object key {key!r} for {self.url}")
        pieces = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
        body = b"".join(bytes(piece) for piece in pieces)
        with self._lock:
            if if_absent and key in self._objects:
                return False
            self._objects[key] = (body, datetime.now(UTC))
        return True

    def flush(self) -> None:
        """Nothing to do: every put is complete when it returns."""

    def exists(self, key: str) -> bool:
        with self._lock:
            return key in self._objects

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._lock:
            listed = [
                ObjectInfo(key, len(body), modified)
                for key, (body, modified) in self._objects.items()
                if key.startswith(prefix)
            ]
        yield from sorted(listed, key=lambda info: info.key)

    def sweep_litter(self, older_than: datetime, dry_run: bool = False) -> Litter:
        """Nothing to do: a put leaves no temporary object."""
        return Litter()

    def close(self) -> None:
        """The objects stay for the next backend opened on this name (see ``forget``)."""


def open_mem(url: str, **_: Any) -> Backend:
    """The backend of ``mem://name`` (created empty on first use)."""
    name = urlparse(url).netloc + urlparse(url).path
    if not name:
        raise StorageError(f"bad mem URL {url!r}: use mem://name")
    with _STORES_LOCK:
        objects = _STORES.setdefault(name, {})
    return MemBackend(url, objects)


def forget(url: str) -> None:
    """Drop every object of ``mem://name`` (a test's teardown)."""
    with _STORES_LOCK:
        _STORES.pop(urlparse(url).netloc + urlparse(url).path, None)
