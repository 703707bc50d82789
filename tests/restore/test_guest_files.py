"""``vmvault files`` end to end: a partitioned ext4 disk, backed up, read in a real appliance.

The disk is made without mounting anything on this host: ``mkfs.ext4 -d`` fills a
filesystem image from a directory, ``sfdisk`` writes a GPT into the disk image, and the
filesystem is placed at its partition's offset. The incremental changes the filesystem
with ``debugfs -w`` (a 3 MiB file rewritten, a small one changed), so only the blocks
that changed are dirty, as in a guest. Both backups go through the format 2 writer (the
worker's), into a file:// repository; the CLI then reads them through nbdkit and a
libguestfs appliance (TCG), and what it returns must be byte-exact with each version.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.fixtures.common import require_binary
from tests.storage.format2_driver import Disk, back_up
from vmvault.storage.format import Manifest
from vmvault.storage.region import SUB_BLOCK
from vmvault.storage.repository import init_repository

MiB = 1024 * 1024
DOMAIN = "vm"  # what format2_driver.back_up names the domain
PART_START = 1 * MiB
FS_SIZE = 32 * MiB
DISK_SIZE = PART_START + FS_SIZE + 1 * MiB  # room for the backup GPT


@dataclass
class Backed:
    config: Path
    full: Manifest
    incremental: Manifest
    # guest path → content, per backup
    v1: dict[str, bytes]
    v2: dict[str, bytes]


@pytest.fixture
def appliance(guestfs_appliance: None) -> None:
    """libguestfs starts an appliance here (tests/fixtures/guestfs.py), else skip/fail."""


def _mkfs(tree: Path, image: Path) -> None:
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-L",
            "guestroot",
            "-d",
            str(tree),
            str(image),
            f"{FS_SIZE // 1024}k",
        ],
        check=True,
        capture_output=True,
    )


def _debugfs(image: Path, *commands: str) -> None:
    for command in commands:
        out = subprocess.run(
            ["debugfs", "-w", "-R", command, str(image)], capture_output=True, text=True
        )
        assert out.returncode == 0 and "rror" not in out.stderr.replace("debugfs ", ""), out


def _disk_bytes(fs_image: Path, base: bytearray | None) -> bytearray:
    raw = bytearray(DISK_SIZE) if base is None else bytearray(base)
    raw[PART_START : PART_START + FS_SIZE] = fs_image.read_bytes()
    return raw


def _partitioned(tmp: Path) -> bytearray:
    disk = tmp / "gpt.img"
    with disk.open("wb") as f:
        f.truncate(DISK_SIZE)
    script = f"label: gpt\nstart={PART_START // 512}, size={FS_SIZE // 512}, type=linux\n"
    subprocess.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(disk)],
        input=script.encode(),
        check=True,
        capture_output=True,
    )
    return bytearray(disk.read_bytes())


@pytest.fixture(scope="module")
def backed(tmp_path_factory: pytest.TempPathFactory) -> Backed:
    for tool in ("mkfs.ext4", "debugfs", "sfdisk", "nbdkit"):
        require_binary(tool)
    return build_backed(tmp_path_factory.mktemp("files"))


def build_backed(tmp: Path) -> Backed:
    """The repository with a full and an incremental of the disk, and its config."""
    rng = random.Random(1313)
    tree = tmp / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    v1 = {
        "/hello.txt": b"hello from the guest\n",
        "/big.bin": rng.randbytes(3 * MiB),
        "/sub/nested.txt": b"nested line\n" * 100,
        "/sub/deeper/tiny": b"x",
    }
    for path, data in v1.items():
        (tree / path.lstrip("/")).write_bytes(data)
    os.chmod(tree / "sub" / "nested.txt", 0o640)
    os.symlink("/etc/passwd", tree / "escape")
    os.symlink("../../../../etc", tree / "sub" / "up")
    os.symlink("sub", tree / "to-sub")
    fs = tmp / "fs.img"
    _mkfs(tree, fs)

    repo = init_repository(f"file://{tmp}/repo", chunk_size=1 * MiB)
    disk = Disk(_disk_bytes(fs, _partitioned(tmp)))
    full = back_up(repo, disk, None, rng, domain=DOMAIN)

    # The guest rewrites big.bin and appends to hello.txt.
    v2 = dict(v1)
    v2["/big.bin"] = rng.randbytes(3 * MiB)
    v2["/hello.txt"] = v1["/hello.txt"] + b"second version\n"
    for path in ("/big.bin", "/hello.txt"):
        (tmp / "new").write_bytes(v2[path])
        _debugfs(fs, f"rm {path}")
        _debugfs(fs, f"write {tmp / 'new'} {path}")
    new = _disk_bytes(fs, disk.data)
    for at in range(0, DISK_SIZE, SUB_BLOCK):
        if new[at : at + SUB_BLOCK] != disk.data[at : at + SUB_BLOCK]:
            disk.write(at, bytes(new[at : at + SUB_BLOCK]))
    assert disk.dirty and len(disk.dirty) * SUB_BLOCK < DISK_SIZE // 2
    incremental = back_up(repo, disk, full, rng, domain=DOMAIN)
    repo.close()

    config = tmp / "vmvault.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "repository": {"url": f"file://{tmp}/repo"},
                "state_dir": str(tmp / "state"),
                "domains": {DOMAIN: {"host": "hv1", "qmp": str(tmp / "vm.qmp")}},
            }
        )
    )
    return Backed(config, full, incremental, v1, v2)


def _files(backed: Backed, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vmvault", "--config", str(backed.config), "files", DOMAIN]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture
def out_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "out"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_ls_shows_the_partitioned_ext4_tree_with_links_as_links(
    appliance: None, backed: Backed
) -> None:
    run = _files(backed, "--backup", backed.full.backup_id, "--disk", "vda", "ls", "/", "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["backup_id"] == backed.full.backup_id
    assert doc["filesystems"] == {"/": "/dev/sda1"}
    entries = {e["name"]: e for e in doc["entries"]}
    assert {"hello.txt", "big.bin", "sub", "escape", "lost+found"} <= set(entries)
    assert entries["big.bin"]["type"] == "file"
    assert entries["big.bin"]["size"] == 3 * MiB
    assert entries["sub"]["type"] == "directory"
    assert entries["escape"]["type"] == "symlink"
    assert entries["escape"]["target"] == "/etc/passwd"

    # A link to a directory named on the command line is listed as that directory.
    run = _files(backed, "--backup", backed.full.backup_id, "--disk", "vda", "ls", "to-sub")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    nested = next(line for line in lines if line.endswith(" nested.txt"))
    assert nested.startswith("-rw-r-----") and f" {len(backed.v1['/sub/nested.txt'])} " in nested
    assert any(line.startswith("l") and line.endswith("up -> ../../../../etc") for line in lines)


def test_get_returns_each_backups_version_byte_exact(
    appliance: None, backed: Backed, out_dir: Path
) -> None:
    # big.bin was rewritten by the incremental; hello.txt's second version is checked by
    # the tree test (each run starts an appliance: ~15 s here).
    for manifest, version in ((backed.full, backed.v1), (backed.incremental, backed.v2)):
        target = out_dir / manifest.backup_id
        run = _files(
            backed, "--backup", manifest.backup_id, "--disk", "vda",
            "get", "/big.bin", "--to", str(target), "--json",
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        doc = json.loads(run.stdout)
        assert doc["files"] == 1 and doc["bytes"] == 3 * MiB
        assert (target / "big.bin").read_bytes() == version["/big.bin"]
    assert backed.v1["/big.bin"] != backed.v2["/big.bin"]


def test_get_of_a_directory_copies_the_tree_and_never_follows_links(
    appliance: None, backed: Backed, out_dir: Path
) -> None:
    # The newest backup (no --backup): the incremental.
    run = _files(backed, "--disk", "vda", "get", "/", "--to", str(out_dir), "--json")
    assert run.returncode == 0, run.stderr
    root = out_dir / "root"
    for path, data in backed.v2.items():
        assert (root / path.lstrip("/")).read_bytes() == data, path
    assert (root / "sub" / "nested.txt").stat().st_mode & 0o777 == 0o640
    links = (("escape", "/etc/passwd"), ("sub/up", "../../../../etc"), ("to-sub", "sub"))
    for link, target in links:
        assert (root / link).is_symlink()
        assert os.readlink(root / link) == target
    doc = json.loads(run.stdout)
    assert doc["symlinks"] == 3 and doc["files"] == len(backed.v2)

    # A local link in the way, pointing outside: refused, then --force replaces the
    # link itself; the file it points to is never written.
    victim = out_dir / "victim"
    victim.write_bytes(b"not the guest's")
    (root / "hello.txt").unlink()
    (root / "hello.txt").symlink_to(victim)
    again = _files(backed, "--disk", "vda", "get", "/hello.txt", "--to", str(root))
    assert again.returncode == 1
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
    assert (root / "hello.txt").is_symlink()
    forced = _files(backed, "--disk", "vda", "get", "/hello.txt", "--to", str(root), "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (root / "hello.txt").is_symlink()
    assert (root / "hello.txt").read_bytes() == backed.v2["/hello.txt"]
    assert victim.read_bytes() == b"not the guest's"


def test_unknown_path_disk_and_backup_are_one_line_errors(
    appliance: None, backed: Backed, out_dir: Path
) -> None:
    run = _files(backed, "--disk", "vda", "get", "/no/such/file", "--to", str(out_dir))
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "no such file or directory" in lines[0], run.stderr
    assert "/no/such/file" in lines[0]
    assert not out_dir.exists()

    run = _files(backed, "--disk", "vdz", "ls")
    assert run.returncode == 1 and "has no disk 'vdz'" in run.stderr, run.stderr
    run = _files(backed, "--backup", "20990101T000000.000000Z-00000000", "--disk", "vda", "ls")
    assert run.returncode == 1 and "no backup" in run.stderr, run.stderr


# --- several filesystems, xfs, and a filesystem on the whole disk ------------------------

XFS_SIZE = 64 * MiB  # below mkfs.xfs's 300 MB floor: allowed by its QA variables


@dataclass
class Multi:
    config: Path
    xfs_files: dict[str, bytes]


def _mkfs_xfs(tmp: Path, files: dict[str, bytes], image: Path) -> None:
    """An xfs image filled from a prototype file (mkfs.xfs -p), nothing mounted."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]
    for name, data in files.items():
        src = tmp / f"src-{name}"
        src.write_bytes(data)
        lines.append(f"{name} ---644 0 0 {src}")
    lines += ["$", "$"]
    (tmp / "proto").write_text("\n".join(lines) + "\n")
    with image.open("wb") as f:
        f.truncate(XFS_SIZE)
    env = {**os.environ, "TEST_DEV": "1", "TEST_DIR": "1", "QA_CHECK_FS": "1"}
    cmd = ["mkfs.xfs", "-q", "-f", "-p", str(tmp / "proto"), str(image)]
    subprocess.run(cmd, check=True, capture_output=True, env=env)


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> Multi:
    for tool in ("mkfs.ext4", "mkfs.xfs", "sfdisk", "nbdkit"):
        require_binary(tool)
    tmp = tmp_path_factory.mktemp("multi")
    rng = random.Random(7)
    xfs_files = {"xfs.txt": b"on xfs\n", "blob.bin": rng.randbytes(1 * MiB + 123)}
    xfs = tmp / "xfs.img"
    _mkfs_xfs(tmp, xfs_files, xfs)
    tree = tmp / "tree"
    tree.mkdir()
    (tree / "ext.txt").write_bytes(b"on ext4\n")
    ext = tmp / "ext.img"
    _mkfs(tree, ext)

    # "two": GPT, partition 1 ext4, partition 2 xfs. "plain": xfs on the whole disk.
    start2 = PART_START + FS_SIZE
    size = start2 + XFS_SIZE + 1 * MiB
    gpt = tmp / "two.img"
    with gpt.open("wb") as f:
        f.truncate(size)
    script = (
        f"label: gpt\nstart={PART_START // 512}, size={FS_SIZE // 512}, type=linux\n"
        f"start={start2 // 512}, size={XFS_SIZE // 512}, type=linux\n"
    )
    subprocess.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(gpt)],
        input=script.encode(),
        check=True,
        capture_output=True,
    )
    two = bytearray(gpt.read_bytes())
    two[PART_START:start2] = ext.read_bytes()
    two[start2 : start2 + XFS_SIZE] = xfs.read_bytes()

    repo = init_repository(f"file://{tmp}/repo", chunk_size=1 * MiB)
    back_up(repo, Disk(two), None, rng, domain="two")
    back_up(repo, Disk(bytearray(xfs.read_bytes())), None, rng, domain="plain")
    repo.close()
    config = tmp / "vmvault.yaml"
    domains = {d: {"host": "hv1", "qmp": str(tmp / f"{d}.qmp")} for d in ("two", "plain")}
    config.write_text(
        yaml.safe_dump(
            {
                "repository": {"url": f"file://{tmp}/repo"},
                "state_dir": str(tmp / "state"),
                "domains": domains,
            }
        )
    )
    return Multi(config, xfs_files)


def _files_of(config: Path, domain: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vmvault", "--config", str(config), "files", domain]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=600)


def test_several_filesystems_need_filesystem_and_xfs_reads_byte_exact(
    appliance: None, multi: Multi, out_dir: Path
) -> None:
    run = _files_of(multi.config, "two", "--disk", "vda", "ls")
    assert run.returncode == 1
    error = run.stderr.strip().splitlines()[-1]
    assert "several filesystems" in error and "--filesystem" in error, run.stderr
    assert "/dev/sda1 (ext4)" in error and "/dev/sda2 (xfs)" in error

    run = _files_of(
        multi.config, "two", "--disk", "vda", "--filesystem", "/dev/sda2",
        "get", "/blob.bin", "--to", str(out_dir),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (out_dir / "blob.bin").read_bytes() == multi.xfs_files["blob.bin"]

    run = _files_of(multi.config, "two", "--disk", "vda", "--filesystem", "/dev/sdb1", "ls")
    assert run.returncode == 1 and "has no filesystem /dev/sdb1" in run.stderr, run.stderr


def test_a_filesystem_on_the_whole_disk(appliance: None, multi: Multi) -> None:
    run = _files_of(multi.config, "plain", "--disk", "vda", "ls", "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["filesystems"] == {"/": "/dev/sda"}
    sizes = {e["name"]: e["size"] for e in doc["entries"] if e["type"] == "file"}
    assert sizes == {name: len(data) for name, data in multi.xfs_files.items()}
