"""Set-up of the real-guest tests: a booted Linux guest, configs with and without its agent."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.guest import GuestFactory, LinuxGuest
from tests.fixtures.qemu import MiB
from vmvault.storage.repository import init_repository, open_repository
from vmvault.worker.config import FleetConfig, parse_config

CHUNK = 1 * MiB


@dataclass
class GuestEnv:
    """A booted guest named ``vm``, a file:// repository, and a state_dir for its backups."""

    guest: LinuxGuest
    repo_url: str
    state_dir: Path
    tmp: Path

    def config(self, agent: bool = True, **domain: Any) -> FleetConfig:
        """The fleet config; ``agent`` names the guest's QGA socket, ``domain`` adds keys."""
        dom: dict[str, Any] = {"host": "hv1", "qmp": str(self.guest.qmp_path), **domain}
        if agent:
            dom["guest_agent"] = str(self.guest.qga_path)
        return parse_config(
            {
                "repository": {"url": self.repo_url},
                "state_dir": str(self.state_dir),
                "domains": {"vm": dom},
            },
            "test",
        )

    def restore_raw(self, backup_id: str, name: str) -> Path:
        """Disk ``vda`` of a backup as a raw file, read from the repository."""
        dest = self.tmp / f"{name}.raw"
        with open_repository(self.repo_url) as repo:
            manifest = repo.load_manifest("vm", backup_id)
            with dest.open("wb") as out:
                out.truncate(manifest.disk("vda").virtual_size)
                for offset, data in repo.read_disk(manifest, "vda"):
                    if data is not None:
                        out.seek(offset)
                        out.write(data)
        return dest

    def manifest_extra(self, backup_id: str) -> dict[str, Any]:
        with open_repository(self.repo_url) as repo:
            return dict(repo.load_manifest("vm", backup_id).extra)


@pytest.fixture
def guest_env(linux_guest_factory: GuestFactory, tmp_path: Path) -> Iterator[GuestEnv]:
    guest = linux_guest_factory()
    repo_url = f"file://{tmp_path / 'repo'}"
    init_repository(repo_url, chunk_size=CHUNK).close()
    state_dir = Path(tempfile.mkdtemp(prefix="vmvs"))  # the NBD socket path must be short
    try:
        yield GuestEnv(guest, repo_url, state_dir, tmp_path)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
