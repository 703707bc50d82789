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
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlparse

from vmvault.storage.errors import (
    BackendUnavailableError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    StorageError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# An object body: one bytes-like object, or pieces stored as their concatenation.
Blob = bytes | bytearray | memoryview
Data = Blob | Sequence[Blob]

_FLUSH_THREADS = 8


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


# --------------------------------------------------------------------------- file://


class FileBackend:
    """A directory tree. Writes are atomic: temp file, fsync, then rename (or link).

    ``put(..., if_absent=True)`` publishes with ``link(2)``, which fails with EEXIST
    instead of replacing: the file-system equivalent of S3's ``If-None-Match: *``.

    Files are created 0600 and directories 0700 (whatever the umask allows of that):
    backups hold whole disks, and even encrypted ones show names and sizes. Existing
    files and directories (a root the operator made) keep their modes.
    """

    _TMP_PREFIX = ".tmp-"
    _FILE_MODE = 0o600
    _DIR_MODE = 0o700

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root
        # Directories holding deferred puts: their new names become durable in flush().
        # Chunk uploads defer: one directory fsync per flush instead of one per chunk.
        self._dirty: set[Path] = set()
        self._dirty_lock = threading.Lock()
        # One flush at a time: a flush that finds nothing dirty must still wait for one
        # in progress, which may be syncing this caller's chunk directories.
        self._flush_lock = threading.Lock()

    def _path(self, key: str) -> Path:
        # Keys are built by the repository from validated names; refuse anything
        # that could still step outside the root (defence in depth).
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") or "\x00" in p for p in parts):
            raise StorageError(f"refusing unsafe object key {key!r}")
        return self.root.joinpath(*parts)

    def get(self, key: str, max_size: int | None = None) -> bytes:
        try:
            with self._path(key).open("rb") as f:
                if max_size is None:
                    return f.read()
                size = os.fstat(f.fileno()).st_size
                if size > max_size:
                    raise _too_large(key, self.url, size, max_size)
                data = f.read(size + 1)
                if len(data) > size:
                    # Grown since the fstat (never one of ours: objects are renamed into
                    # place whole): read on, up to the cap.
                    data += f.read(max_size + 1 - len(data))
                    if len(data) > max_size:
                        raise _too_large(key, self.url, len(data), max_size)
                return data
        except FileNotFoundError:
            raise ObjectNotFoundError(f"object {key!r} not found in {self.url}") from None
        except OSError as err:
            raise StorageError(f"cannot read {key!r} in {self.url}: {err.strerror}") from err

    def put(self, key: str, data: Data, if_absent: bool = False, defer_sync: bool = False) -> bool:
        path = self._path(key)
        try:
            tmp = path.parent / f"{self._TMP_PREFIX}{secrets.token_hex(8)}"
            for attempt in range(3):
                self._makedirs(path.parent)
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._FILE_MODE)
                    break
                except FileNotFoundError:
                    # A concurrent delete() removed the (empty) directory after our
                    # mkdir: make it again.
                    if attempt == 2:
                        raise
            try:
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                    _drop_cache(fd)
                finally:
                    os.close(fd)
                if if_absent:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                else:
                    os.replace(tmp, path)
                    tmp = None  # type: ignore[assignment]
            finally:
                if tmp is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            if defer_sync:
                with self._dirty_lock:
                    self._dirty.add(path.parent)
            else:
                _fsync_dir(path.parent)
            return True
        except OSError as err:
            raise StorageError(f"cannot write {key!r} in {self.url}: {err.strerror}") from err

    def _makedirs(self, path: Path) -> None:
        """``mkdir -p`` with 0700 for every directory it makes (``Path.mkdir`` and
        ``os.makedirs`` give missing parents the default mode)."""
        missing: list[Path] = []
        while not path.is_dir():
            missing.append(path)
            if path.parent == path:
                break
            path = path.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, self._DIR_MODE)
            except FileExistsError:
                if not d.is_dir():
                    raise

    def flush(self) -> None:
        with self._flush_lock:
            self._flush()

    def _flush(self) -> None:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        try:
            if len(dirty) > 1:
                # Up to 256 chunk directories: each fsync waits for the device, and
                # parallel ones share journal commits and cache flushes (measured: 4x
                # faster for 256 directories with 8 threads).
                with ThreadPoolExecutor(_FLUSH_THREADS, thread_name_prefix="flush") as pool:
                    list(pool.map(_fsync_dir, sorted(dirty)))
            else:
                for d in dirty:
                    _fsync_dir(d)
        except OSError as err:
            with self._dirty_lock:
                self._dirty |= dirty
            raise StorageError(f"cannot sync {self.url}: {err.strerror}") from err

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as err:
            raise StorageError(f"cannot delete {key!r} in {self.url}: {err.strerror}") from err
        # Drop now-empty directories up to (not including) the repository root, so
        # pruned backups leave no litter. A concurrent writer re-creates what it needs.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self.root
        start = self.root / prefix.rstrip("/") if prefix else self.root
        if prefix.endswith("/") and not start.is_dir():
            return  # no such directory, so no key under it
        # The prefix may end mid-name ("chunks/a"): walk its directory and filter.
        walk_root = start if start.is_dir() else start.parent
        inside = walk_root == self.root or self.root in walk_root.parents
        if not inside or not walk_root.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(walk_root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(self._TMP_PREFIX):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(base).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def sweep_litter(self, older_than: datetime, dry_run: bool = False) -> Litter:
        """Remove temp files last written before ``older_than``, then empty directories.

        A temp file younger than that may belong to a live writer: it stays. A directory
        goes when it is empty and either older than ``older_than`` or emptied by this
        sweep (removing its entries changed its mtime). Only the key spaces vmvault
        writes (``_LITTER_DIRS``) are walked, and their top directories stay: anything
        else under the root (``lost+found`` of a mount point) is not ours.
        """
        litter = Litter()
        cutoff = older_than.timestamp()
        for name in sorted(os.listdir(self.root)) if self.root.is_dir() else []:
            if name.startswith(self._TMP_PREFIX):
                self._sweep_temp(self.root / name, cutoff, dry_run, litter)
        for top in self._LITTER_DIRS:
            base = self.root / top
            if base.is_dir():
                self._sweep_tree(base, cutoff, dry_run, litter)
        return litter

    _LITTER_DIRS = ("chunks", "backups", "locks")

    def _sweep_temp(self, path: Path, cutoff: float, dry_run: bool, litter: Litter) -> bool:
        """Remove one temp file if old enough; True when it is gone (or would be)."""
        try:
            st = path.lstat()
        except FileNotFoundError:
            return True  # its writer finished (renamed or removed it) meanwhile
        if st.st_mtime >= cutoff:
            litter.temp_files_in_grace += 1
            return False
        if not dry_run:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                raise StorageError(f"cannot remove {path} in {self.url}: {err.strerror}") from err
        litter.temp_files_deleted += 1
        return True

    def _sweep_tree(self, base: Path, cutoff: float, dry_run: bool, litter: Litter) -> None:
        gone: set[str] = set()  # directories removed (or that a dry run would remove)
        # Bottom-up, so a directory is looked at after everything below it.
        for dirpath, dirnames, filenames in os.walk(base, topdown=False):
            left = 0
            emptied = False
            for name in filenames:
                if name.startswith(self._TMP_PREFIX) and self._sweep_temp(
                    Path(dirpath) / name, cutoff, dry_run, litter
                ):
                    emptied = True
                else:
                    left += 1
            for name in dirnames:
                if os.path.join(dirpath, name) in gone:
                    emptied = True
                else:
                    left += 1
            if left or dirpath == str(base):
                continue
            try:
                old = os.stat(dirpath).st_mtime < cutoff
            except FileNotFoundError:
                gone.add(dirpath)
                continue
            if not (old or emptied):
                continue
            if not dry_run:
                try:
                    os.rmdir(dirpath)
                except FileNotFoundError:
                    pass
                except OSError:
                    continue  # a writer put something there meanwhile: it stays
            gone.add(dirpath)
            litter.empty_dirs_removed += 1

    def close(self) -> None:
        pass


def _too_large(key: str, url: str, size: int, limit: int) -> ObjectTooLargeError:
    return ObjectTooLargeError(
        f"object {key!r} in {url} is {size} bytes, more than the {limit} it may have: "
        "damaged or not written by vmvault; it was not read"
    )


def _write_all(fd: int, data: Data) -> None:
    for piece in (data,) if isinstance(data, bytes | bytearray | memoryview) else data:
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view) :]


def _drop_cache(fd: int) -> None:
    """Drop the page-cache copy of a file just fsync'd: its pages are clean now.

    Repository objects are written once and not read back by the writer. Dropped pages
    are reused by the next put, while fresh page-cache pages are costly to fill here
    (measured on a 2-core VM: 8 threads writing 4 MiB files with fsync took 1.4-2.1
    CPU-s per GiB, 0.5-0.6 with the drop). Advice only: failures do not matter.
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the directory that holds the new name."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- s3://

# Error codes that mean "the service is busy, back off": retry them. Every other 4xx
# means a bug or a configuration problem and is reported at once.
_THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "SlowDown",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "ConditionalRequestConflict",
    }
)


class S3Backend:
    """An S3 bucket and key prefix, through boto3.

    One client is shared by all threads (boto3 clients are thread-safe); its
    connection pool is sized to the repository's concurrency so uploads never queue
    for a socket. botocore's own retries are off: ``_call`` retries transient
    failures (throttling, 5xx, connection errors) with backoff, and nothing else.
    """

    def __init__(
        self,
        url: str,
        bucket: str,
        prefix: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        concurrency: int = 8,
        retry: RetryPolicy | None = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.url = url
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.retry = retry or RetryPolicy()
        config = Config(
            max_pool_connections=max(10, concurrency + 4),
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            # botocore >= 1.36 computes and checks a CRC32 of every body by default. Every
            # object already carries its own check (chunks are named by the digest of their
            # plaintext and re-hashed on read; indexes and manifests are digested, and GCM
            # authenticates encrypted ones), so the CRC only costs CPU on the data path.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        # Region: the config's, else the AWS chain's (AWS_DEFAULT_REGION, profile), else
        # us-east-1, which S3-compatible stores accept.
        self._client: Any = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region or session.region_name or "us-east-1",
            config=config,
        )

    def _call(self, what: str, op: Callable[[], T]) -> T:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        last: Exception | None = None
        for attempt in range(self.retry.attempts):
            try:
                return op()
            except ClientError as err:
                status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
                code = str(err.response.get("Error", {}).get("Code", ""))
                if code == "NoSuchBucket":
                    raise _no_bucket(self.bucket, self.url) from err
                if not (status >= 500 or status == 429 or code in _THROTTLING_CODES):
                    raise
                last = err
            except (HTTPClientError, BotoConnectionError, IncompleteReadError) as err:
                # Refused, reset, timed out, or a body cut short.
                last = err
            except (NoCredentialsError, PartialCredentialsError) as err:
                raise StorageError(
                    f"no AWS credentials for {self.url} ({err}): set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or an AWS profile (AWS_PROFILE, "
                    "~/.aws/credentials), or give the host an instance role"
                ) from err
            except BotoCoreError as err:
                # Anything else botocore refuses (bad parameters, a broken profile): not
                # transient, and it must not escape as a traceback.
                raise StorageError(f"{what} on {self.url} failed: {err}") from err
            if attempt == self.retry.attempts - 1:
                break
            delay = self.retry.delay(attempt)
            log.debug("%s on %s failed (%s); retry in %.2fs", what, self.url, last, delay)
            time.sleep(delay)
        raise BackendUnavailableError(
            f"{what} on {self.url} kept failing after {self.retry.attempts} attempts: {last}"
        ) from last

    def _key(self, key: str) -> str:
        return self.prefix + key

    def get(self, key: str, max_size: int | None = None) -> bytes:
        from botocore.exceptions import ClientError

        def op() -> bytes:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = resp["Body"]
            if max_size is None:
                data: bytes = body.read()
                return data
            # The size is in the response headers: refuse before reading the body. The
            # HTTP layer then reads exactly Content-Length bytes (and fails on fewer).
            size = resp.get("ContentLength")
            if size is not None and int(size) > max_size:
                body.close()
                raise _too_large(key, self.url, int(size), max_size)
            data = body.read() if size is not None else body.read(max_size + 1)
            if len(data) > max_size:
                raise _too_large(key, self.url, len(data), max_size)
            return data

        try:
            return self._call(f"GET {key}", op)
        except ClientError as err:
            if _status(err) == 404 or _code(err) in ("NoSuchKey", "NotFound"):
                raise ObjectNotFoundError(f"object {key!r} not found in {self.url}") from None
            raise _client_error(f"GET {key!r}", self.url, err) from err

    def put(self, key: str, data: Data, if_absent: bool = False, defer_sync: bool = False) -> bool:
        """``defer_sync`` is moot: S3 acknowledges a PUT once the object is durable."""
        from botocore.exceptions import ClientError

        body = data if isinstance(data, bytes | bytearray | memoryview) else b"".join(data)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": body}
        if if_absent:
            # Conditional create (RFC 7232 If-None-Match on PUT): the store refuses
            # with 412 when the key exists, so a chunk is never overwritten.
            kwargs["IfNoneMatch"] = "*"
        try:
            self._call(f"PUT {key}", lambda: self._client.put_object(**kwargs))
            return True
        except ClientError as err:
            if if_absent and _status(err) == 412:
                return False
            raise _client_error(f"PUT {key!r}", self.url, err) from err

    def flush(self) -> None:
        pass

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call(
                f"HEAD {key}",
                lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(key)),
            )
            return True
        except ClientError as err:
            if _status(err) == 404:
                return False
            raise _client_error(f"HEAD {key!r}", self.url, err) from err

    def delete(self, key: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self._call(
                f"DELETE {key}",
                lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(key)),
            )
        except ClientError as err:
            if _status(err) == 404:
                return
            raise _client_error(f"DELETE {key!r}", self.url, err) from err

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        from botocore.exceptions import ClientError

        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key(prefix)}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                page: dict[str, Any] = self._call(
                    f"LIST {prefix}", partial(self._client.list_objects_v2, **kwargs)
                )
            except ClientError as err:
                raise _client_error(f"LIST {prefix!r}", self.url, err) from err
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) :]
                yield ObjectInfo(key, int(obj["Size"]), obj["LastModified"].astimezone(UTC))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def sweep_litter(self, older_than: datetime, dry_run: bool = False) -> Litter:
        """Nothing to do: a PUT is atomic, and no multipart upload is ever started."""
        return Litter()

    def close(self) -> None:
        self._client.close()


def _client_error(what: str, url: str, err: Any) -> StorageError:
    """A one-line error for a non-retryable S3 answer, with a hint for the usual causes."""
    status, code = _status(err), _code(err)
    if status == 403:
        hint = "access denied: check the AWS credentials and the bucket policy"
    else:
        hint = str(err)
    return StorageError(f"{what} in {url} failed ({status} {code}): {hint}")


def _no_bucket(bucket: str, url: str) -> StorageError:
    return StorageError(
        f"bucket {bucket!r} does not exist (repository {url}): create it (vmvault does not "
        "create buckets) or fix repository.url and endpoint_url"
    )


# botocore's own rule for bucket names (AWS itself wants 3-63 lowercase characters;
# S3-compatible stores are laxer). Checked up front for a clear message.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/prefix``; ``StorageError`` says what is wrong."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"bad s3 URL {url!r}: use s3://bucket/prefix")
    bucket = unquote(parsed.netloc)
    if not _BUCKET_RE.fullmatch(bucket):
        raise StorageError(
            f"bad bucket name {bucket!r} in {url!r}: use letters, digits, '.', '-' and '_' "
            "(no spaces)"
        )
    return bucket, unquote(parsed.path)


def _status(err: Any) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(err: Any) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


# --------------------------------------------------------------------------- by scheme


def _open_file(url: str, **_: Any) -> Backend:
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise StorageError(f"bad file URL {url!r}: use file:///absolute/path")
    return FileBackend(url, Path(unquote(parsed.path)))


def _open_s3(
    url: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
) -> Backend:
    bucket, prefix = parse_s3_url(url)
    return S3Backend(url, bucket, prefix, endpoint_url, region, concurrency, retry)


BACKENDS: dict[str, Callable[..., Backend]] = {"file": _open_file, "s3": _open_s3}


def open_backend(
    url: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
) -> Backend:
    """The backend for ``url``'s scheme (``file://`` or ``s3://``)."""
    scheme = urlparse(url).scheme
    factory = BACKENDS.get(scheme)
    if factory is None:
        raise StorageError(f"unsupported repository URL {url!r}: use file:// or s3://")
    if scheme == "file":
        if endpoint_url or region:
            raise StorageError("endpoint_url/region apply to s3:// repositories only")
        return factory(url)
    return factory(
        url, endpoint_url=endpoint_url, region=region, concurrency=concurrency, retry=retry
    )
