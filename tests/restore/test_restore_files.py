"""Restores to qcow2 files through qemu-nbd: content, sparseness, selection, bad input, faults."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from tests.restore.conftest import (
    CHUNK,
    ConfigFactory,
    MiB,
    allocated_bytes,
    images_equal,
    make_image,
    short_tmp,
    write_backup,
)
from vmvault.storage.errors import BackupNotFoundError, StorageError
from vmvault.storage.format import chunk_key
from vmvault.storage.repository import Repository
from vmvault.worker.launch import LaunchError
from vmvault.worker.locks import DomainBusyError, domain_lock
from vmvault.worker.restore import RestoreTargetExistsError, run_restore


@pytest.fixture
def two_backups(
    tmp_path: Path, file_repo: Repository
) -> tuple[Repository, dict[str, dict[str, Path]], list[str]]:
    """Backups b0 (vda 4 MiB + 64 KiB tail, vdb 2 MiB) and b1 (vda changed)."""
    src = tmp_path / "src"
    src.mkdir()
    refs: dict[str, dict[str, Path]] = {}
    vda0 = make_image(src / "vda0.raw", 4 * MiB + 64 * 1024, 1, [(CHUNK, 3 * CHUNK)])
    vdb0 = make_image(src / "vdb0.raw", 2 * MiB, 2, [(0, 2 * MiB - CHUNK)])
    b0 = write_backup(file_repo, "web1", {"vda": vda0, "vdb": vdb0})
    vda1 = make_image(src / "vda1.raw", 4 * MiB + 64 * 1024, 3, [(2 * MiB, 2 * MiB)])
    b1 = write_backup(file_repo, "web1", {"vda": vda1, "vdb": vdb0}, parent=b0)
    refs[b0.backup_id] = {"vda": vda0, "vdb": vdb0}
    refs[b1.backup_id] = {"vda": vda1, "vdb": vdb0}
    return file_repo, refs, [b0.backup_id, b1.backup_id]


def _record(seen: list[tuple[str, int, int]], phase: str, done: int, total: int) -> None:
    seen.append((phase, done, total))


def test_restore_each_backup_bit_exact_and_sparse(
    tmp_path: Path, two_backups: tuple[Repository, dict[str, dict[str, Path]], list[str]],
    fleet_config: ConfigFactory,
) -> None:  # fmt: skip
    repo, refs, ids = two_backups
    config = fleet_config(repo.url)
    for backup_id in ids:
        out = tmp_path / f"out-{backup_id[-4:]}"
        seen: list[tuple[str, int, int]] = []
        result = run_restore(
            config, "web1", backup_id=backup_id, to_dir=out,
            progress=functools.partial(_record, seen),
        )  # fmt: skip
        assert result.backup_id == backup_id
        assert [d.name for d in result.disks] == ["vda", "vdb"]
        for disk in result.disks:
            assert disk.verified and disk.path == out / f"{disk.name}.qcow2"
            assert images_equal(refs[backup_id][disk.name], disk.path)
            # Sparse: only the data chunks are allocated in the qcow2.
            assert allocated_bytes(disk.path) == disk.bytes_written
        assert sorted(p.name for p in out.iterdir()) == ["vda.qcow2", "vdb.qcow2"]
        assert seen and seen[-1][1] == seen[-1][2]
    # The newest backup is the default; vdb is mostly zero, so little is written.
    newest = run_restore(config, "web1", to_dir=tmp_path / "newest")
    assert newest.backup_id == ids[1]
    assert newest.disks[1].bytes_written == CHUNK


def test_restored_image_carries_the_checkpoint_bitmap(
    tmp_path: Path, two_backups: tuple[Repository, dict[str, dict[str, Path]], list[str]],
    fleet_config: ConfigFactory,
) -> None:  # fmt: skip
    repo, _, _ = two_backups
    result = run_restore(fleet_config(repo.url), "web1", to_dir=tmp_path / "o", disks=["vdb"])
    assert [d.name for d in result.disks] == ["vdb"]
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(result.disks[0].path)],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    assert [b["name"] for b in bitmaps] == ["vmvault-20260101T000000Z-abc123"]
    assert result.checkpoint == "vmvault-20260101T000000Z-abc123"
    assert "auto" in bitmaps[0]["flags"]  # enabled: records the writes after the restore


def test_pick_by_time(
    tmp_path: Path, two_backups: tuple[Repository, dict[str, dict[str, Path]], list[str]],
    fleet_config: ConfigFactory,
) -> None:  # fmt: skip
    repo, _, ids = two_backups
    config = fleet_config(repo.url)
    manifests = repo.list_manifests("web1")
    at = manifests[0].created + (manifests[1].created - manifests[0].created) / 2
    assert run_restore(config, "web1", at=at, to_dir=tmp_path / "a").backup_id == ids[0]
    with pytest.raises(BackupNotFoundError, match=r"no backup at or before .* the first one is"):
        run_restore(config, "web1", at=manifests[0].created - timedelta(seconds=1), to_dir=tmp_path)
    with pytest.raises(BackupNotFoundError, match=r"no backup '20990101T000000\.000000Z-deadbeef'"):
        run_restore(config, "web1", backup_id="20990101T000000.000000Z-deadbeef", to_dir=tmp_path)


def test_no_backup_yet_and_unknown_disk(
    tmp_path: Path, two_backups: tuple[Repository, dict[str, dict[str, Path]], list[str]],
    fleet_config: ConfigFactory,
) -> None:  # fmt: skip
    repo, _, _ = two_backups
    config = fleet_config(
        repo.url, domains={"db1": {"host": "h", "qmp": "/q"}, "web1": {"host": "h", "qmp": "/q"}}
    )
    with pytest.raises(BackupNotFoundError, match="holds no backup of it yet"):
        run_restore(config, "db1", to_dir=tmp_path / "x")
    with pytest.raises(Exception, match="has no disk 'vdz'"):
        run_restore(config, "web1", to_dir=tmp_path / "x", disks=["vdz"])


def test_existing_target_refused_unless_force(
    tmp_path: Path, two_backups: tuple[Repository, dict[str, dict[str, Path]], list[str]],
    fleet_config: ConfigFactory,
) -> None:  # fmt: skip
    repo, refs, ids = two_backups
    config = fleet_config(repo.url)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vda.qcow2").write_bytes(b"precious")
    with pytest.raises(RestoreTargetExistsError, match=r"vda.qcow2 already exists.*--force"):
        run_restore(config, "web1", to_dir=out)
    assert (out / "vda.qcow2").read_bytes() == b"precious"
    result = run_restore(config, "web1", to_dir=out, force=True)
    assert images_equal(refs[ids[1]]["vda"], result.disks[0].path)


def test_corrupt_and_missing_chunk_fail_with_location(
    tmp_path: Path, two_backups: tuple[Repository, dict[str, dict[str, Path]], list[str]],
    fleet_config: ConfigFactory,
) -> None:  # fmt: skip
    repo, _, ids = two_backups
    config = fleet_config(repo.url)
    manifest = repo.load_manifest("web1", ids[0])
    digests = repo.chunk_names(manifest, "vda")
    root = Path(repo.url.removeprefix("file://"))
    # vda chunk 4 (offset 1 MiB) is data only in b0; damage it.
    victim = root / chunk_key(str(digests[4]))
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")
    out = tmp_path / "out"
    with pytest.raises(StorageError, match=f"disk vda offset {4 * CHUNK}") as info:
        run_restore(config, "web1", backup_id=ids[0], to_dir=out)
    assert ids[0] in str(info.value)
    # Nothing that looks restored is left behind.
    assert list(out.iterdir()) == []
    victim.unlink()
    with pytest.raises(StorageError, match=f"disk vda offset {4 * CHUNK}"):
        run_restore(config, "web1", backup_id=ids[0], to_dir=out)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("wrong_size", [False, True], ids=["same-size", "short"])
def test_chunk_with_wrong_content_is_blamed_on_the_repository(
    tmp_path: Path, two_backups: tuple[Repository, dict[str, dict[str, Path]], list[str]],
    fleet_config: ConfigFactory, wrong_size: bool,
) -> None:  # fmt: skip
    """A well-formed object holding other data: only the digest tells, and restore says where.

    Chunks are not re-hashed on the way in (the read-back checks them); the failure must
    still be the repository's CorruptObjectError with disk and offset, not a disk error.
    """
    repo, _, ids = two_backups
    config = fleet_config(repo.url)
    manifest = repo.load_manifest("web1", ids[0])
    digests = repo.chunk_names(manifest, "vda")
    root = Path(repo.url.removeprefix("file://"))
    key = chunk_key(str(digests[4]))
    other = bytes([0x5A]) * (CHUNK // 2 if wrong_size else CHUNK)
    # A format 2 chunk keeps its digest table (the part named by the chunk's name).
    stored = (root / key).read_bytes()
    table_end = 4 + int.from_bytes(stored[:4], "little")
    (root / key).write_bytes(stored[:table_end] + repo.codec.seal(key, other))
    out = tmp_path / "out"
    with pytest.raises(StorageError, match=f"disk vda offset {4 * CHUNK}: .*does not match"):
        run_restore(config, "web1", backup_id=ids[0], to_dir=out)
    assert list(out.iterdir()) == []


def test_restore_refused_while_domain_locked(
    tmp_path: Path, two_backups: tuple[Repository, dict[str, dict[str, Path]], list[str]],
    fleet_config: ConfigFactory,
) -> None:  # fmt: skip
    repo, _, _ = two_backups
    config = fleet_config(repo.url)
    with (
        domain_lock(config.state_dir, "web1", job="backup"),
        pytest.raises(DomainBusyError, match="domain 'web1' is busy: a backup"),
    ):
        run_restore(config, "web1", to_dir=tmp_path / "o")
    assert not (tmp_path / "o" / "vda.qcow2").exists()
    assert run_restore(config, "web1", to_dir=tmp_path / "o").disks[0].verified


def test_incoming_restore_with_failing_qemu_shows_stderr_and_cleans_up(
    tmp_path: Path, two_backups: tuple[Repository, dict[str, dict[str, Path]], list[str]],
    fleet_config: ConfigFactory,
) -> None:  # fmt: skip
    repo, _, _ = two_backups
    argv = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
            "-qmp", "unix:{qmp},server=on,wait=off",
            "-drive", "file={disk:vda},format=qcow2,if=virtio",
            "-drive", "file={disk:vdb},format=qcow2,if=virtio,bogus-option=1"]  # fmt: skip
    sockdir = short_tmp()
    config = fleet_config(
        repo.url,
        domains={"web1": {"host": "h", "qmp": str(sockdir / "q"), "launch": {"argv": argv}}},
    )
    images = tmp_path / "images"
    try:
        with pytest.raises(LaunchError, match="QEMU exited with code 1") as info:
            run_restore(config, "web1", incoming=True, to_dir=images)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    assert "bogus-option" in str(info.value)  # QEMU's own stderr is in the message
    assert list(images.iterdir()) == []  # the fresh images were removed again


def test_restore_from_encrypted_repository(tmp_path: Path, fleet_config: ConfigFactory) -> None:
    """Verification uses the repository's keyed digest, so it works on encrypted repos too."""
    from vmvault.storage.repository import init_repository

    secret = tmp_path / "passphrase"
    secret.write_text("correct horse battery staple\n")
    url = f"file://{tmp_path}/enc"
    repo = init_repository(url, passphrase=b"correct horse battery staple", chunk_size=CHUNK,
                           scrypt_n=2**10)  # fmt: skip
    ref = make_image(tmp_path / "vda.raw", 2 * MiB, 9, [(0, CHUNK)])
    write_backup(repo, "web1", {"vda": ref})
    repo.close()
    config = fleet_config(url, passphrase_file=str(secret))
    result = run_restore(config, "web1", to_dir=tmp_path / "out")
    assert result.disks[0].verified
    assert images_equal(ref, result.disks[0].path)
