"""file:// repositories are private: objects (``key`` included) 0600, directories 0700."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.storage.conftest import CHUNK, Target
from tests.storage.helpers import write_full
from vmvault.storage.locks import Lease


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The umask most services run with (022): it alone would leave 0644/0755."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        out[path.relative_to(root).as_posix()] = stat.S_IMODE(path.lstat().st_mode)
    return out


def test_objects_are_0600_and_directories_0700(tmp_path: Path, usual_umask: None) -> None:
    # The repository root and a missing parent of it are made by the first put.
    root = tmp_path / "missing" / "repo"
    target = Target("file", f"file://{root}", root=root)
    repo = target.init(b"pw")
    write_full(repo, "vm", {"vda": os.urandom(2 * CHUNK)})
    lease = Lease(repo.backend, "shared", "test", 600).acquire()
    try:
        modes = _modes(root)
        modes["missing"] = stat.S_IMODE((tmp_path / "missing").stat().st_mode)
        files = {k for k in modes if (root / k).is_file()}
    finally:
        lease.release()
    dirs = set(modes) - files
    assert {"key", "config"} <= files
    assert any(k.startswith("chunks/") for k in files) and any(
        k.startswith("locks/") for k in files
    )
    assert {k: oct(m) for k, m in modes.items() if k in files and m != 0o600} == {}
    assert {k: oct(m) for k, m in modes.items() if k in dirs and m != 0o700} == {}
    assert {".", "missing", "chunks", "backups", "backups/vm"} <= dirs


def test_an_existing_root_keeps_its_mode(tmp_path: Path, usual_umask: None) -> None:
    """vmvault never chmods what the operator made (e.g. a group-readable root)."""
    root = tmp_path / "repo"
    root.mkdir(mode=0o750)
    os.chmod(root, 0o750)
    Target("file", f"file://{root}", root=root).init()
    assert stat.S_IMODE(root.stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "config").stat().st_mode) == 0o600
