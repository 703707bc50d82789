"""Storage test wiring: every repository test runs against file:// and the real S3 server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmvault.storage.backends import Backend, RetryPolicy, open_backend
from vmvault.storage.backends.mem import forget
from vmvault.storage.repository import Repository, init_repository, open_repository

# Small chunks keep test disks tiny; cheap scrypt keeps unlocking fast (the default
# cost is exercised by test_encryption).
CHUNK = 64 * 1024
FAST_SCRYPT = 2**12


@dataclass
class Target:
    """Where a test's repository lives, and how to open it."""

    kind: str
    url: str
    endpoint_url: str | None = None
    root: Path | None = None  # file:// only: the directory

    def init(self, passphrase: bytes | None = None, **kw: Any) -> Repository:
        kw.setdefault("chunk_size", CHUNK)
        kw.setdefault("scrypt_n", FAST_SCRYPT)
        return init_repository(
            self.url, endpoint_url=self.endpoint_url, passphrase=passphrase, **kw
        )

    def open(self, passphrase: bytes | None = None, **kw: Any) -> Repository:
        return open_repository(
            self.url, endpoint_url=self.endpoint_url, passphrase=passphrase, **kw
        )

    def backend(self, retry: RetryPolicy | None = None) -> Backend:
        return open_backend(self.url, endpoint_url=self.endpoint_url, retry=retry)


@pytest.fixture(params=["file", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """A place for one fresh repository: a temp dir, or a fresh bucket on SeaweedFS.

    (Not ``mem://``: repository tests hand the repository to child processes.)
    """
    yield _target(request, tmp_path)


@pytest.fixture(params=["mem", "file", "s3"])
def backend_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """Every backend, for the shared backend suite (tests/storage/test_backends.py)."""
    target = _target(request, tmp_path)
    yield target
    if target.kind == "mem":
        forget(target.url)


def _target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "mem":
        return Target("mem", f"mem://{request.node.nodeid}")
    if request.param == "file":
        return Target("file", f"file://{tmp_path}/repo", root=tmp_path / "repo")
    s3 = request.getfixturevalue("s3_server")
    return Target("s3", s3.repo_url("repo"), endpoint_url=s3.endpoint_url)


@pytest.fixture
def file_target(tmp_path: Path) -> Target:
    return Target("file", f"file://{tmp_path}/repo", root=tmp_path / "repo")
