"""Shared set-up of the backup tests: a VM, a config pointing at it, a file:// repository."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.qemu import MiB, QemuVm, VmFactory
from vmvault.storage.format import Manifest
from vmvault.storage.repository import Repository, init_repository, open_repository
from vmvault.worker.config import FleetConfig, parse_config

CHUNK = 1 * MiB


@dataclass
class BackupEnv:
    """A running VM named ``vm`` plus a config and an initialised repository for it."""

    vm: QemuVm
    config: FleetConfig
    repo_url: str
    tmp: Path

    def repo(self) -> Repository:
        return open_repository(self.repo_url)

    def restored(self, manifest: Manifest, disk: str) -> bytes:
        """A disk's content as the repository holds it for ``manifest``."""
        size = manifest.disk(disk).virtual_size
        out = bytearray(size)
        with self.repo() as repo:
            for offset, data in repo.read_disk(manifest, disk):
                if data is not None:
                    out[offset : offset + len(data)] = data
        return bytes(out)

    def capture(self, disk: str) -> bytes:
        return self.vm.capture(disk, self.tmp / f"ref-{disk}.raw").read_bytes()

    def assert_matches(self, manifest: Manifest, refs: dict[str, bytes]) -> None:
        for disk, ref in refs.items():
            got = self.restored(manifest, disk)
            assert len(got) == len(ref), disk
            if got != ref:
                first = next(i for i in range(len(ref)) if got[i] != ref[i])
                raise AssertionError(f"disk {disk}: backup differs from reference at {first}")

    def manifest(self, backup_id: str) -> Manifest:
        with self.repo() as repo:
            return repo.load_manifest("vm", backup_id)


def make_config(vm: QemuVm, repo_url: str, state_dir: Path) -> FleetConfig:
    return parse_config(
        {
            "repository": {"url": repo_url},
            "state_dir": str(state_dir),
            "domains": {"vm": {"host": "hv1", "qmp": str(vm.qmp_path)}},
        },
        "test",
    )


@pytest.fixture
def backup_env(qemu_vm_factory: VmFactory, tmp_path: Path, state_dir: Path) -> BackupEnv:
    vm = qemu_vm_factory(disk_sizes=[16 * MiB, 8 * MiB], name="vm")
    repo_url = f"file://{tmp_path / 'repo'}"
    init_repository(repo_url, chunk_size=CHUNK).close()
    return BackupEnv(vm, make_config(vm, repo_url, state_dir), repo_url, tmp_path)
