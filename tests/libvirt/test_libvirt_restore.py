"""Restore into a shut-off libvirt domain: images at its XML's paths, checkpoints redefined."""

from __future__ import annotations

import pytest

from tests.fixtures.libvirt import KiB, MiB
from tests.libvirt.conftest import LibvirtEnv
from vmvault.worker.backup import run_backup
from vmvault.worker.errors import RestoreError
from vmvault.worker.libvirt_backup import checkpoint_name
from vmvault.worker.restore import run_restore


def test_restore_into_the_domain_then_the_next_backup_is_incremental(
    libvirt_env: LibvirtEnv,
) -> None:
    env, vm = libvirt_env, libvirt_env.vm
    vm.write("vda", 0, 1 * MiB, 0x21)
    full = run_backup(env.config, "lv")
    ref = env.capture()
    vm.write("vda", 2 * MiB, 1 * MiB, 0x22)
    vm.write("vdb", 0, 1 * MiB, 0x23)
    run_backup(env.config, "lv")

    with pytest.raises(RestoreError, match="is running: shut it off first"):
        run_restore(env.config, "lv", backup_id=full.backup_id, incoming=True)
    vm.shutdown()
    result = run_restore(env.config, "lv", backup_id=full.backup_id, incoming=True, boot=True)
    assert result.mode == "libvirt" and result.booted and vm.running
    assert {d.name: d.path for d in result.disks} == vm.disks  # the XML's paths
    assert env.capture() == ref
    # libvirt agrees with the restored images: one checkpoint, the restored backup's.
    assert vm.checkpoints() == [checkpoint_name(full.checkpoint)]
    assert not list(env.vm.workdir.glob("*.pre-restore")) + list(env.vm.workdir.glob("*.partial"))

    vm.write("vdb", 4 * MiB, 64 * KiB, 0x24)
    after = run_backup(env.config, "lv")
    assert after.kind == "incremental" and after.parent == full.backup_id
    assert {d.name: d.dirty_bytes for d in after.disks} == {"vda": 0, "vdb": 64 * KiB}
    ref_after = env.capture()
    vm.shutdown()
    run_restore(env.config, "lv", backup_id=after.backup_id, incoming=True)
    assert not vm.running  # no --boot: left shut off
    assert env.capture() == ref_after
    assert vm.checkpoints() == [checkpoint_name(after.checkpoint)]
