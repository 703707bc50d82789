"""Helpers of the restore tests: repositories, fleet configs and backups made from raw images.

``write_backup`` stores raw disk images through the storage writer API exactly as a
backup does (data chunks, zero chunks), so restore can be tested without a running
backup job; the chain tests use the real ``run_backup`` against a real QEMU.
"""

from __future__ import annotations

import json
import random
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmvault.scheduler import blank_vm
from vmvault.storage.format import Manifest
from vmvault.storage.repository import Repository, init_repository
from vmvault.worker import qemu_img
from vmvault.worker.config import FleetConfig, parse_config

KiB = 1024
MiB = 1024 * KiB
CHUNK = 256 * KiB


def make_image(path: Path, size: int, seed: int, holes: list[tuple[int, int]]) -> Path:
    """A raw image of random-ish data with zeroed ``(offset, length)`` holes."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    for offset, length in holes:
        data[offset : offset + length] = bytes(length)
    path.write_bytes(data)
    return path


def write_backup(
    repo: Repository,
    domain: str,
    images: dict[str, Path],
    parent: Manifest | None = None,
    checkpoint: str | None = "20260101T000000Z-abc123",
) -> Manifest:
    """Store ``images`` (raw files) as one committed backup; zero chunks stored as zero."""
    writer = repo.open_backup(
        domain, parent, "incremental" if parent else "full", "test", checkpoint
    )
    cs = repo.chunk_size
    for name, path in images.items():
        size = path.stat().st_size
        disk = writer.open_disk(name, size, "qcow2")
        with path.open("rb") as src:
            for offset in range(0, size, cs):
                data = src.read(cs)
                if data.count(0) == len(data):
                    disk.put_zero(offset, cs if offset + cs <= size else size - offset)
                else:
                    disk.put_chunk(offset, data)
        disk.finish()
    return writer.commit()


@pytest.fixture
def file_repo(tmp_path: Path) -> Repository:
    repo = init_repository(f"file://{tmp_path}/repo", chunk_size=CHUNK)
    return repo


ConfigFactory = Callable[..., FleetConfig]


@pytest.fixture
def fleet_config(tmp_path: Path) -> ConfigFactory:
    """``make(repo_url, domains={...}, **repository_options)`` → a validated FleetConfig."""

    def make(
        repo_url: str, domains: dict[str, Any] | None = None, **repository: Any
    ) -> FleetConfig:
        state = tmp_path / "state"
        state.mkdir(exist_ok=True)
        data = {
            "repository": {"url": repo_url, **repository},
            "state_dir": str(state),
            "domains": domains or {"web1": {"host": "hv1", "qmp": str(tmp_path / "web1.qmp")}},
        }
        return parse_config(data, "test.yaml")

    return make


def images_equal(a: Path, b: Path, fmt_a: str = "raw", fmt_b: str = "qcow2") -> bool:
    """Same virtual size and ``qemu-img compare`` says identical content.

    ``-U`` lets it read an image a running QEMU holds. (Not ``-s``: that also compares
    allocation, and a sparse restore of written zeroes is allocated differently.)
    """
    if qemu_img.virtual_size(a, fmt_a) != qemu_img.virtual_size(b, fmt_b):
        return False
    return qemu_img.identical(a, b, fmt_a, fmt_b)


def allocated_bytes(image: Path) -> int:
    """Data bytes allocated in a qcow2 (``qemu-img map``), to check sparseness."""
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"])


def short_tmp() -> Path:
    """A short directory for unix sockets (tmp_path is often too long for sun_path)."""
    return Path(tempfile.mkdtemp(prefix="vmv"))


def launch_argv() -> list[str]:
    """A launch description with one qcow2 disk ``vda``: TCG, no guest OS."""
    return blank_vm.launch_argv(["vda"])
