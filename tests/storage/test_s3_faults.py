"""S3 endpoint faults: 503 SlowDown for a while, endpoint down and back, down for good,
and a 4xx that must not be retried. A loopback proxy in front of SeaweedFS injects them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.s3 import S3Bucket
from tests.storage.conftest import CHUNK, FAST_SCRYPT
from tests.storage.helpers import image, read_back, write_full
from tests.storage.proxy import FlakyProxy
from vmvault.storage.backends import RetryPolicy
from vmvault.storage.errors import BackendUnavailableError, StorageError
from vmvault.storage.repository import init_repository, open_repository

# Enough attempts to outlast a 1 s outage whatever the jitter draws (>= 2.5 s of sleep).
FAST_RETRY = RetryPolicy(attempts=30, base_delay=0.05, max_delay=0.3)


@pytest.fixture
def proxy(s3_server: S3Bucket) -> Iterator[FlakyProxy]:
    p = FlakyProxy(s3_server.server.s3_port)
    try:
        yield p
    finally:
        p.close()


def _later(seconds: float, action: object) -> threading.Timer:
    timer = threading.Timer(seconds, action)  # type: ignore[arg-type]
    timer.start()
    return timer


def test_503_for_a_while_is_ridden_out(s3_server: S3Bucket, proxy: FlakyProxy) -> None:
    url = s3_server.repo_url()
    repo = init_repository(
        url,
        endpoint_url=proxy.endpoint_url,
        chunk_size=CHUNK,
        retry=FAST_RETRY,
        passphrase=b"p",
        scrypt_n=FAST_SCRYPT,
    )
    data = image(6 * CHUNK, 21)
    proxy.throttle()
    timer = _later(1.0, lambda: setattr(proxy, "mode", "pass"))
    try:
        m = write_full(repo, "vm", {"vda": data})
    finally:
        timer.cancel()
    assert proxy.failures > 0
    assert read_back(repo, m, "vda") == data


def test_endpoint_down_then_back(s3_server: S3Bucket, proxy: FlakyProxy) -> None:
    url = s3_server.repo_url()
    init_repository(url, endpoint_url=proxy.endpoint_url, chunk_size=CHUNK)
    proxy.go_down()
    started = time.monotonic()
    timer = _later(1.0, proxy.come_back)
    try:
        repo = open_repository(url, endpoint_url=proxy.endpoint_url, retry=FAST_RETRY)
        m = write_full(repo, "vm", {"vda": image(3 * CHUNK, 3)})
    finally:
        timer.cancel()
    assert time.monotonic() - started >= 1.0
    assert repo.list_manifests("vm")[0].backup_id == m.backup_id


def test_endpoint_down_for_good_fails_with_retryable_error(
    s3_server: S3Bucket, proxy: FlakyProxy
) -> None:
    proxy.go_down()
    started = time.monotonic()
    retry = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.1)
    with pytest.raises(BackendUnavailableError, match="kept failing after 3 attempts"):
        open_repository(s3_server.repo_url(), endpoint_url=proxy.endpoint_url, retry=retry)
    assert time.monotonic() - started < 5


def test_client_errors_are_not_retried(
    s3_server: S3Bucket, proxy: FlakyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError) as info:
        open_repository(s3_server.repo_url(), endpoint_url=proxy.endpoint_url, retry=FAST_RETRY)
    assert not isinstance(info.value, BackendUnavailableError)
    assert "access denied: check the AWS credentials" in str(info.value)
    assert proxy.requests == 1
