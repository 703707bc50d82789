"""``s3://bucket/prefix``: a repository in an S3 bucket (boto3, imported only when opened)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from vmvault.storage.backends.base import (
    Backend,
    Data,
    Litter,
    ObjectInfo,
    RetryPolicy,
    short_range,
    too_large,
)
from vmvault.storage.errors import BackendUnavailableError, ObjectNotFoundError, StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")


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
                raise too_large(key, self.url, int(size), max_size)
            data = body.read() if size is not None else body.read(max_size + 1)
            if len(data) > max_size:
                raise too_large(key, self.url, len(data), max_size)
            return data

        try:
            return self._call(f"GET {key}", op)
        except ClientError as err:
            if _status(err) == 404 or _code(err) in ("NoSuchKey", "NotFound"):
                raise ObjectNotFoundError(f"object {key!r} not found in {self.url}") from None
            raise _client_error(f"GET {key!r}", self.url, err) from err

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        from botocore.exceptions import ClientError

        def op() -> bytes:
            resp = self._client.get_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Range=f"bytes={offset}-{offset + length - 1}",
            )
            data: bytes = resp["Body"].read(length + 1)
            return data

        try:
            data = self._call(f"GET {key} (range)", op)
        except ClientError as err:
            if _status(err) == 404 or _code(err) in ("NoSuchKey", "NotFound"):
                raise ObjectNotFoundError(f"object {key!r} not found in {self.url}") from None
            if _status(err) == 416:  # the range starts past the end
                raise short_range(key, self.url, offset, length, 0) from None
            raise _client_error(f"GET {key!r} (range)", self.url, err) from err
        if len(data) != length:
            raise short_range(key, self.url, offset, length, len(data))
        return data

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


def open_s3(
    url: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
) -> Backend:
    """The backend of ``s3://bucket/prefix``."""
    bucket, prefix = parse_s3_url(url)
    return S3Backend(url, bucket, prefix, endpoint_url, region, concurrency, retry)
