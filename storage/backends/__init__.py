"""Storage backends: one small object-store interface, chosen by URL scheme.

A backend stores opaque objects under ``/``-separated keys relative to the
repository root. It knows nothing about chunks or manifests; the repository
layer decides what the bytes mean. Every backend offers exactly:

    get(key, max_size=None) -> bytes       ObjectNotFoundError if absent;
                                           ObjectTooLargeError, without reading the
                                           body, if it has more than max_size bytes
    put(key, data, if_absent=False, defer_sync=False) -> bool
                                           data: bytes-like, or a sequence of pieces
                                           stored as their concatenation
                                           False when if_absent and the key existed;
                                           defer_sync: durable only after flush()
    flush()                                make every deferred put durable
    exists(key) -> bool
    delete(key)                            absent keys are fine
    list(prefix) -> Iterator[ObjectInfo]   every key under prefix, any depth
    sweep_litter(older_than, dry_run) -> Litter
                                           remove what killed writers left that is not an
                                           object (see below)
    close()

Why ``sweep_litter`` exists: a file:// put writes a temporary file and renames it into
place, and creates directories on the way. A writer killed in between leaves a temp
file (``.tmp-*``) or an empty directory. Neither is an object: a temp file has no key
(listing it would show readers half-written bytes) and directories are not objects, so
GC cannot name them through the six object operations. Only the backend knows its own
litter. S3 leaves none (a PUT is atomic and vmvault never starts multipart uploads),
so its ``sweep_litter`` does nothing.

One file per backend, chosen by URL scheme from :data:`BACKENDS`:

    base.py   the interface (``Backend``) and its types (``Blob``, ``Data``, ...)
    file.py   ``file:///path``        a directory tree (the embedded default)
    s3.py     ``s3://bucket/prefix``  boto3, imported only when a backend is opened
    mem.py    ``mem://name``          process memory, for fast unit tests only

Every backend runs the same suite (tests/storage/test_backends.py).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlparse

from vmvault.storage.backends.base import (
    Backend,
    Blob,
    Data,
    Litter,
    ObjectInfo,
    RetryPolicy,
)
from vmvault.storage.backends.file import FileBackend, file_url_root, open_file
from vmvault.storage.backends.mem import MemBackend, open_mem
from vmvault.storage.backends.s3 import S3Backend, open_s3, parse_s3_url
from vmvault.storage.errors import StorageError

__all__ = [
    "BACKENDS",
    "Backend",
    "Blob",
    "Data",
    "FileBackend",
    "Litter",
    "MemBackend",
    "ObjectInfo",
    "RetryPolicy",
    "S3Backend",
    "check_url",
    "open_backend",
    "parse_s3_url",
]

BACKENDS: dict[str, Callable[..., Backend]] = {"file": open_file, "s3": open_s3, "mem": open_mem}


def check_url(url: str) -> str:
    """``url`` when it can name a configured repository (``file://`` or ``s3://``).

    The one check behind both the fleet config and ``open_backend``; its
    ``StorageError`` says what to write instead. (``mem://`` is for tests, never configured.)
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        file_url_root(url)
    elif parsed.scheme == "s3":
        parse_s3_url(url)
    else:
        raise StorageError(f"unsupported repository URL {url!r}: use file:// or s3://")
    return url


def open_backend(
    url: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
) -> Backend:
    """The backend for ``url``'s scheme (``file://`` or ``s3://``; ``mem://`` in tests)."""
    scheme = urlparse(url).scheme
    if scheme != "mem":
        check_url(url)
    factory = BACKENDS[scheme]
    if scheme != "s3":
        if endpoint_url or region:
            raise StorageError("endpoint_url/region apply to s3:// repositories only")
        return factory(url)
    return factory(
        url, endpoint_url=endpoint_url, region=region, concurrency=concurrency, retry=retry
    )
