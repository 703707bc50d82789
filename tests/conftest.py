"""Test-suite wiring: the real-part fixtures are plugins every test can use, and the
few plain fixtures that tests of several folders share."""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.qemu",
    "tests.fixtures.guest",
    "tests.fixtures.guestfs",
    "tests.fixtures.libvirt",
    "tests.fixtures.notify",
    "tests.fixtures.redis",
    "tests.fixtures.s3",
]


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short state_dir: the NBD socket lives under it (unix paths < 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vmvs"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
