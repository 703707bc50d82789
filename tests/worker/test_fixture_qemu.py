"""The ``qemu_vm`` fixture: a write through the guest path is visible over NBD and in captures."""

from __future__ import annotations

from pathlib import Path

import nbd
import pytest

from tests.fixtures.qemu import KiB, MiB, QemuVm, VmFactory


def test_write_is_visible_in_nbd_read_and_capture(qemu_vm: QemuVm, tmp_path: Path) -> None:
    vm = qemu_vm
    vm.write("vda", 4 * MiB, 64 * KiB, pattern=0x5A)
    vm.write("vdb", 1 * MiB, 4 * KiB, pattern=0x33)
    vm.write("vda", 0, 128 * KiB, pattern=0x11)
    vm.discard("vda", 0, 64 * KiB)
    vm.zero("vda", 64 * KiB, 32 * KiB)

    sock = vm.sockdir / "nbd.sock"
    vm.ctl.nbd_server_start(sock)
    vm.ctl.block_export_add("e-vda", vm.disks["vda"].node, "vda", [])
    handle = nbd.NBD()
    try:
        handle.set_export_name("vda")
        handle.connect_unix(str(sock))
        assert handle.get_size() == 16 * MiB
        assert handle.pread(64 * KiB, 4 * MiB) == b"\x5a" * (64 * KiB)
        assert handle.pread(4 * KiB, 4 * MiB + 64 * KiB) == b"\0" * (4 * KiB)
        head = handle.pread(128 * KiB, 0)
        assert head == b"\0" * (96 * KiB) + b"\x11" * (32 * KiB)
    finally:
        handle.shutdown()
    vm.ctl.block_export_del("e-vda")
    vm.ctl.nbd_server_stop()

    ref = vm.capture("vdb", tmp_path / "vdb.raw").read_bytes()
    assert len(ref) == 8 * MiB
    assert ref[1 * MiB : 1 * MiB + 4 * KiB] == b"\x33" * (4 * KiB)
    assert ref.count(b"\x33") == 4 * KiB


def test_kill_and_restart_keep_the_disks(qemu_vm: QemuVm, tmp_path: Path) -> None:
    vm = qemu_vm
    vm.write("vdb", 2 * MiB, 64 * KiB, pattern=0x77)
    vm.flush("vdb")
    vm.kill()
    assert not vm.running
    vm.restart()
    assert vm.ctl.query_status() in ("running", "prelaunch", "paused")
    ref = vm.capture("vdb", tmp_path / "vdb.raw").read_bytes()
    assert ref[2 * MiB : 2 * MiB + 64 * KiB] == b"\x77" * (64 * KiB)
    vm.quit()
    assert not vm.running


def test_a_failed_guest_write_raises(qemu_vm_factory: VmFactory) -> None:
    """qemu-io reports through QEMU's stdout as well as the monitor: a failure is seen."""
    vm = qemu_vm_factory(disk_sizes=[1 * MiB], name="vm")
    vm.write("vda", 0, 4096)
    with pytest.raises(RuntimeError, match="qemu-io"):
        vm.write("vda", 2 * MiB, 4096)
