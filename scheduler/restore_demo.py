"""The restore step of ``vmvault demo``: newest backup into a paused incoming-mode QEMU, compared.

The demo's VM keeps running, so the restored QEMU is a clone next to it: its own QMP
socket and image directory, started from a launch description built like the demo VM's
command line. The restored images are compared with the VM's own disks
(``qemu-img compare``); the VM has not been written since its newest backup.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from vmvault.scheduler import blank_vm
from vmvault.worker import qemu_img
from vmvault.worker.config import LaunchConfig
from vmvault.worker.errors import WorkerError
from vmvault.worker.restore import RestoreResult, run_restore

if TYPE_CHECKING:
    from vmvault.scheduler.demo import Demo


class RestoreDemoError(WorkerError):
    """The demo's restore did not give back the VM's disks bit for bit. Not retryable."""


def clone_launch(disks: list[str]) -> LaunchConfig:
    """A launch description of the demo's blank VM, images and QMP socket as placeholders."""
    return LaunchConfig(argv=blank_vm.launch_argv(disks))


def _identical(source: Path, restored: Path) -> bool:
    try:
        return qemu_img.identical(source, restored)
    except qemu_img.QemuImgError as err:
        raise RestoreDemoError(str(err)) from err


def restore_newest_step(demo: Demo) -> None:
    """Demo step: restore the newest backup into a paused incoming-mode QEMU and compare."""
    from vmvault.scheduler.demo import DOMAIN

    workdir = demo.vm.workdir
    started = time.monotonic()
    result: RestoreResult = run_restore(
        demo.config,
        DOMAIN,
        incoming=True,
        to_dir=workdir / "restored",
        qmp=workdir / "restored.qmp",
        launch=clone_launch(sorted(demo.vm.disks)),
    )
    assert result.qemu is not None
    try:
        total = sum(d.virtual_size for d in result.disks)
        written = sum(d.bytes_written for d in result.disks)
        demo.say(
            f"restored backup {result.backup_id} into a paused incoming-mode QEMU"
            f" (pid {result.qemu_pid}, QMP {result.qmp}): {total / 2**20:.0f} MiB of disks,"
            f" {written / 2**20:.1f} MiB of data written over NBD and read back verified in"
            f" {result.duration_s:.2f}s"
        )
        compared = time.monotonic()
        for disk in result.disks:
            if not _identical(demo.vm.disks[disk.name], disk.path):
                raise RestoreDemoError(
                    f"disk {disk.name}: restored image {disk.path} differs from the VM's disk"
                )
        demo.say(
            "verified: the restored disks equal the VM's disks bit for bit"
            f" (qemu-img compare, {time.monotonic() - compared:.2f}s); checkpoint"
            f" {result.checkpoint} makes the next backup of the restored VM incremental"
        )
    finally:
        result.qemu.kill()
    demo.report["restore"] = {
        **result.to_json(),
        "bit_exact": True,
        "step_duration_s": round(time.monotonic() - started, 3),
    }
