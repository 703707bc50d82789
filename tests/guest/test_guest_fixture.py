"""The test guest itself: boots Linux under TCG, writes through ext4, readable from the host."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.guest import (
    GuestFactory,
    e2fsck_clean,
    ext4_files,
    needs_recovery,
    to_raw,
)
from tests.fixtures.guest_image import guest_image


def test_guest_boots_writes_and_its_files_read_back_on_the_host(
    linux_guest_factory: GuestFactory, tmp_path: Path
) -> None:
    guest = linux_guest_factory()
    print(f"guest boot under TCG: {guest.boot_seconds:.1f} s")
    assert "/dev/vda /mnt/data ext4 rw" in guest.shell("cat /proc/mounts")
    assert guest.shell("pidof qemu-ga").strip()
    guest.start_writer("w")
    guest.wait_fsynced(5)
    guest.stop_writer("w")
    written = guest.fsynced()
    guest.poweroff()

    raw = to_raw(guest.disks["vda"].path, tmp_path / "vda.raw")
    assert not needs_recovery(raw)  # a clean unmount
    clean, report = e2fsck_clean(raw)
    assert clean, report
    on_disk = ext4_files(raw, "/w")
    assert len(written) >= 5
    assert {name: on_disk.get(name) for name in written} == written


def test_boot_files_are_cached_by_input_digest(linux_guest_factory: GuestFactory) -> None:
    """The session built them once; asking again returns the same files, unchanged."""
    first = guest_image()
    stamp = first.initrd.stat().st_mtime_ns
    again = guest_image()
    assert again == first and again.initrd.stat().st_mtime_ns == stamp
