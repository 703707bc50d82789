"""Backups of a real QEMU domain: full → incremental → incremental, bit-exact, chain trimmed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.fixtures.qemu import KiB, MiB, VmFactory
from tests.worker.conftest import CHUNK, BackupEnv, make_config
from vmvault.storage.repository import init_repository
from vmvault.worker.backup import run_backup
from vmvault.worker.checkpoints import parse_chain
from vmvault.worker.cleanup import nbd_socket_path
from vmvault.worker.disks import DiskSelectionError, list_disks
from vmvault.worker.qmp import open_session


def test_full_then_incrementals_are_bit_exact(backup_env: BackupEnv) -> None:
    env, vm = backup_env, backup_env.vm
    vm.write("vda", 0, 3 * MiB, pattern=0x11)
    vm.write("vdb", 5 * MiB, 64 * KiB, pattern=0x22)
    refs = {d: env.capture(d) for d in ("vda", "vdb")}
    seen: list[tuple[str, int, int]] = []
    modes: set[int] = set()

    def watch(phase: str, done: int, total: int) -> None:
        seen.append((phase, done, total))
        sock = nbd_socket_path(env.config.state_dir, "vm")
        modes.add(stat.S_IMODE(sock.stat().st_mode))
        modes.add(stat.S_IMODE(sock.parent.stat().st_mode))

    full = run_backup(env.config, "vm", progress=watch)
    assert modes == {0o600, 0o700}  # the export is reachable by its owner only
    assert full.kind == "full" and full.reason == "first backup of domain vm"
    assert full.parent is None
    assert seen and seen[-1][1] == seen[-1][2] == 24 * MiB
    # Only the sub-blocks block status does not report as zeros are read (format 2).
    assert {d.name: d.bytes_read for d in full.disks} == {"vda": 3 * MiB, "vdb": 64 * KiB}
    env.assert_matches(env.manifest(full.backup_id), refs)

    vm.write("vda", 10 * MiB + 4 * KiB, 4 * KiB, pattern=0x33)
    vm.discard("vda", 0, 1 * MiB)
    refs = {d: env.capture(d) for d in ("vda", "vdb")}
    inc1 = run_backup(env.config, "vm")
    assert inc1.kind == "incremental" and inc1.parent == full.backup_id
    by_name = {d.name: d for d in inc1.disks}
    assert by_name["vdb"].dirty_bytes == 0 and by_name["vdb"].bytes_read == 0
    # 64 KiB bitmap granularity: the 4 KiB write dirties one 64 KiB block, the discard 1 MiB.
    assert by_name["vda"].dirty_bytes == 64 * KiB + 1 * MiB
    # The 64 KiB dirty sub-block alone; the discarded range is a zero extent: not read.
    assert by_name["vda"].bytes_read == 64 * KiB
    env.assert_matches(env.manifest(inc1.backup_id), refs)

    vm.write("vdb", 0, 8 * MiB, pattern=0x44)
    refs = {d: env.capture(d) for d in ("vda", "vdb")}
    inc2 = run_backup(env.config, "vm", mode="incremental")
    assert inc2.kind == "incremental" and inc2.parent == inc1.backup_id
    env.assert_matches(env.manifest(inc2.backup_id), refs)

    # Only the newest checkpoint is left, recording; no temporary objects remain.
    with open_session("vm", vm.qmp_path) as qmp:
        for disk in list_disks(qmp):
            chain = parse_chain(disk.node, disk.bitmaps)
            assert chain.ids == [inc2.checkpoint] and chain.appendable
            assert [b.name for b in disk.bitmaps] == [chain.order[0].name]
        assert qmp.block_exports() == [] and qmp.block_jobs() == []
        assert not any(n.node_name.startswith("vmv-") for n in qmp.named_block_nodes())
    assert not any((env.config.state_dir / "scratch" / "vm").glob("*"))


def test_allow_list_selects_disks(backup_env: BackupEnv) -> None:
    env = backup_env
    dom = env.config.domains["vm"]
    only_vdb = env.config.model_copy(
        update={"domains": {"vm": dom.model_copy(update={"disks": ["vdb"]})}}
    )
    env.vm.write("vdb", 0, 64 * KiB, pattern=0x66)
    result = run_backup(only_vdb, "vm")
    assert [d.name for d in result.disks] == ["vdb"]
    assert _checkpoint_bitmaps(env, "vda") == []  # vda is not part of this domain's backups
    wrong = env.config.model_copy(
        update={"domains": {"vm": dom.model_copy(update={"disks": ["vdz"]})}}
    )
    with pytest.raises(DiskSelectionError, match="vdz not found"):
        run_backup(wrong, "vm")


def _checkpoint_bitmaps(env: BackupEnv, disk: str) -> list[str]:
    node = next(n for n in env.vm.ctl.named_block_nodes() if n.node_name == env.vm.disks[disk].node)
    return [b.name for b in node.bitmaps if b.name.startswith("vmvault-")]


def test_disk_tail_not_a_multiple_of_chunk_or_granularity(
    qemu_vm_factory: VmFactory, tmp_path: Path, state_dir: Path
) -> None:
    """A short last chunk (and a partial last bitmap block) is backed up, full and incremental."""
    size = 3 * MiB + 24 * KiB  # neither 1 MiB chunks nor 64 KiB bitmap blocks divide it
    vm = qemu_vm_factory(disk_sizes=[size], name="vm")
    repo_url = f"file://{tmp_path / 'repo'}"
    init_repository(repo_url, chunk_size=CHUNK).close()
    env = BackupEnv(vm, make_config(vm, repo_url, state_dir), repo_url, tmp_path)
    vm.write("vda", size - 8 * KiB, 8 * KiB, pattern=0x61)
    full = run_backup(env.config, "vm")
    assert full.disks[0].bytes_read == 24 * KiB  # only the short tail chunk has data
    env.assert_matches(env.manifest(full.backup_id), {"vda": env.capture("vda")})

    vm.write("vda", size - 4 * KiB, 4 * KiB, pattern=0x62)
    inc = run_backup(env.config, "vm", mode="incremental")
    assert inc.disks[0].bytes_read == 24 * KiB
    env.assert_matches(env.manifest(inc.backup_id), {"vda": env.capture("vda")})


def test_two_repositories_back_up_one_domain_incrementally(
    backup_env: BackupEnv, tmp_path: Path
) -> None:
    """An off-site repository next to the local one: each stays incremental, both exact."""
    env, vm = backup_env, backup_env.vm
    offsite_url = f"file://{tmp_path / 'offsite'}"
    init_repository(offsite_url, chunk_size=CHUNK).close()
    offsite = BackupEnv(
        vm, make_config(vm, offsite_url, env.config.state_dir), offsite_url, tmp_path
    )
    vm.write("vda", 0, 2 * MiB, pattern=0x71)
    assert run_backup(env.config, "vm").kind == "full"
    assert run_backup(offsite.config, "vm").kind == "full"
    for round_ in range(3):
        vm.write("vda", (4 + round_) * MiB, 64 * KiB, pattern=0x72 + round_)
        vm.write("vdb", round_ * MiB, 64 * KiB, pattern=0x75 + round_)
        refs = {d: env.capture(d) for d in ("vda", "vdb")}
        for target in (env, offsite):
            result = run_backup(target.config, "vm")
            assert result.kind == "incremental", result.reason
            target.assert_matches(target.manifest(result.backup_id), refs)
    # Each trim left the other repository's newest checkpoint: two per disk, no more.
    assert len(_checkpoint_bitmaps(env, "vda")) == 2
