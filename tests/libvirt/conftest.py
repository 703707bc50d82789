"""Shared set-up of the libvirt tests: a libvirt domain, a config naming it, a repository."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.libvirt import LibvirtVm, LibvirtVmFactory, MiB
from vmvault.storage.repository import init_repository
from vmvault.worker.config import FleetConfig, parse_config

CHUNK = 1 * MiB


@dataclass
class LibvirtEnv:
    """A running libvirt domain ``lv`` with two disks, its config and a file:// repository."""

    vm: LibvirtVm
    config: FleetConfig
    tmp: Path

    def capture(self) -> dict[str, bytes]:
        """Every disk's guest-visible content now."""
        return {d: self.vm.capture(d, self.tmp / f"ref-{d}.raw") for d in self.vm.disks}


def libvirt_config(uri: str, name: str, repo_url: str, state_dir: Path) -> FleetConfig:
    return parse_config(
        {
            "repository": {"url": repo_url},
            "state_dir": str(state_dir),
            "domains": {"lv": {"host": "hv1", "libvirt": {"uri": uri, "name": name}}},
        },
        "test",
    )


@pytest.fixture
def libvirt_env(
    libvirt_vm_factory: LibvirtVmFactory, tmp_path: Path, state_dir: Path
) -> LibvirtEnv:
    vm = libvirt_vm_factory(disk_sizes=[16 * MiB, 8 * MiB], name="lvdom")
    repo_url = f"file://{tmp_path / 'repo'}"
    init_repository(repo_url, chunk_size=CHUNK).close()
    config = libvirt_config(vm.daemon.uri, vm.name, repo_url, state_dir)
    return LibvirtEnv(vm, config, tmp_path)
