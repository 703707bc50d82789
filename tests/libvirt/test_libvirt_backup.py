"""Backups of a domain libvirt manages, against a real libvirtd and QEMU (TCG)."""

from __future__ import annotations

import libvirt
import pytest

from tests.fixtures.libvirt import KiB, MiB
from tests.libvirt.conftest import LibvirtEnv
from vmvault.worker import qemu_img
from vmvault.worker.backup import BackupResult, IncrementalUnavailableError, run_backup
from vmvault.worker.libvirt_backup import checkpoint_name
from vmvault.worker.libvirt_domain import LibvirtSetupError
from vmvault.worker.restore import run_restore


def restore_raw(env: LibvirtEnv, backup_id: str) -> dict[str, bytes]:
    """Restore ``backup_id`` to files and read each disk back raw."""
    target = env.tmp / f"restored-{backup_id}"
    run_restore(env.config, "lv", backup_id=backup_id, to_dir=target)
    out: dict[str, bytes] = {}
    for disk in env.vm.disks:
        raw = env.tmp / f"restored-{backup_id}-{disk}.raw"
        qemu_img.to_raw(target / f"{disk}.qcow2", raw, "qcow2")
        out[disk] = raw.read_bytes()
    return out


def _assert_in_step(env: LibvirtEnv, result: BackupResult) -> None:
    """``virsh checkpoint-list`` shows exactly the newest backup's checkpoint."""
    assert env.vm.checkpoints() == [checkpoint_name(result.checkpoint)]


def test_full_incremental_crash_full_and_restore_every_backup(libvirt_env: LibvirtEnv) -> None:
    env, vm = libvirt_env, libvirt_env.vm
    vm.write("vda", 0, 1 * MiB, 0x11)
    vm.write("vdb", 3 * MiB, 64 * KiB, 0x22)
    full = run_backup(env.config, "lv")
    refs = {full.backup_id: env.capture()}
    assert (full.kind, full.reason) == ("full", "first backup of domain lv")
    _assert_in_step(env, full)

    vm.write("vda", 5 * MiB, 128 * KiB, 0x33)
    vm.write("vdb", 0, 64 * KiB, 0x44)
    inc = run_backup(env.config, "lv")
    refs[inc.backup_id] = env.capture()
    assert inc.kind == "incremental" and inc.parent == full.backup_id
    # Only what the guest wrote since the full backup was read.
    assert {d.name: d.dirty_bytes for d in inc.disks} == {"vda": 128 * KiB, "vdb": 64 * KiB}
    _assert_in_step(env, inc)

    vm.write("vda", 9 * MiB, 64 * KiB, 0x55)
    vm.kill()  # unclean QEMU exit: the checkpoint's bitmap is lost
    vm.start()
    after = run_backup(env.config, "lv")
    refs[after.backup_id] = env.capture()
    assert after.kind == "full"
    assert "inconsistent" in after.reason and inc.backup_id in after.reason
    _assert_in_step(env, after)

    vm.write("vdb", 6 * MiB, 64 * KiB, 0x66)
    last = run_backup(env.config, "lv")
    refs[last.backup_id] = env.capture()
    assert last.kind == "incremental" and last.parent == after.backup_id
    _assert_in_step(env, last)

    for backup_id, ref in refs.items():
        assert restore_raw(env, backup_id) == ref, backup_id
    assert vm.job_type() == 0  # no job left behind
    assert not any((env.config.state_dir / "scratch").glob("*/*"))


def test_lost_checkpoint_metadata_gives_a_full_backup_with_the_reason(
    libvirt_env: LibvirtEnv,
) -> None:
    env, vm = libvirt_env, libvirt_env.vm
    first = run_backup(env.config, "lv")
    # As if the domain had been redefined without its checkpoint metadata.
    point = vm.dom.checkpointLookupByName(checkpoint_name(first.checkpoint))
    point.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    vm.write("vda", 0, 64 * KiB, 0x77)
    second = run_backup(env.config, "lv")
    assert second.kind == "full"
    assert f"libvirt has no checkpoint {checkpoint_name(first.checkpoint)}" in second.reason
    assert restore_raw(env, second.backup_id) == env.capture()


def test_mode_incremental_refuses_when_libvirt_lost_the_checkpoint(
    libvirt_env: LibvirtEnv,
) -> None:
    env, vm = libvirt_env, libvirt_env.vm
    run_backup(env.config, "lv")
    vm.kill()
    vm.start()
    with pytest.raises(IncrementalUnavailableError, match="inconsistent"):
        run_backup(env.config, "lv", mode="incremental")
    assert vm.job_type() == 0


def test_shut_off_domain_is_read_from_its_images_and_the_chain_goes_on(
    libvirt_env: LibvirtEnv,
) -> None:
    env, vm = libvirt_env, libvirt_env.vm
    vm.write("vda", 0, 1 * MiB, 0x31)
    online = run_backup(env.config, "lv")
    vm.write("vdb", 2 * MiB, 64 * KiB, 0x32)
    vm.shutdown()
    off = run_backup(env.config, "lv")
    ref_off = env.capture()
    assert (off.state, off.kind) == ("shut-off", "full")
    assert off.checkpoint == online.checkpoint  # nothing wrote since: the chain goes on
    assert restore_raw(env, off.backup_id) == ref_off
    with pytest.raises(IncrementalUnavailableError, match="shut off"):
        run_backup(env.config, "lv", mode="incremental")

    vm.start()
    vm.write("vda", 8 * MiB, 64 * KiB, 0x33)
    back = run_backup(env.config, "lv")
    assert back.kind == "incremental" and back.parent == off.backup_id
    # Changes since the online backup's checkpoint: a superset of those since the shut-off one.
    assert {d.name: d.dirty_bytes for d in back.disks} == {"vda": 64 * KiB, "vdb": 64 * KiB}
    assert restore_raw(env, back.backup_id) == env.capture()
    assert vm.checkpoints() == [checkpoint_name(back.checkpoint)]


def test_a_domain_libvirt_lacks_or_a_disk_it_lacks_is_named(libvirt_env: LibvirtEnv) -> None:
    env = libvirt_env
    lv = env.config.domains["lv"]
    assert lv.libvirt is not None
    ghost = lv.model_copy(update={"libvirt": lv.libvirt.model_copy(update={"name": "ghost"})})
    config = env.config.model_copy(update={"domains": {"lv": ghost}})
    with pytest.raises(
        LibvirtSetupError, match=r"has no domain 'ghost': check domains\.lv\.libvirt\.name"
    ) as info:
        run_backup(config, "lv")
    assert not info.value.retryable
    config = env.config.model_copy(
        update={"domains": {"lv": lv.model_copy(update={"disks": ["vda", "vdz"]})}}
    )
    with pytest.raises(LibvirtSetupError, match="has no disk vdz"):
        run_backup(config, "lv")
    assert env.vm.job_type() == 0 and env.vm.checkpoints() == []
