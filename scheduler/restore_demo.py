"""The restore step of ``vmvault demo``: newest backup into a paused incoming-mode QEMU, compared.

The demo's VM keeps running, so the restored QEMU is a clone next to it: its own QMP
socket and image directory, started from a launch description built like the demo VM's
command line. The restored images are compared with the VM's own disks
(``qemu-img compare``); the VM has not been written since its newest backup.
"""

from __future__ import annotations

import subprocess
import time
from typing import TYPE_CHECKING, Any

from vmvault.worker.config import LaunchConfig
from vmvault.worker.errors import WorkerError
from vmvault.worker.restore import RestoreResult, run_restore

if TYPE_CHECKING:
    from vmvault.scheduler.demo import Demo


class RestoreDemoError(WorkerError):
    """The demo's restore did not give back the VM's disks bit for bit. Not retryable."""


def clone_launch(disks: list[str]) -> LaunchConfig:
    """A launch description like the demo VM's: TCG, no guest OS, one qcow2 per disk."""
    argv = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-nodefaults",
            "-display", "none", "-m", "64", "-qmp", "unix:{qmp},server=on,wait=off"]  # fmt: skip
    for name in disks:
        argv += ["-blockdev", f"driver=file,filename={{disk:{name}}},node-name=file-{name}",
                 "-blockdev", f"driver=qcow2,file=file-{name},node-name=fmt-{name}",
                 "-device", f"virtio-blk-pci,drive=fmt-{name},id={name}"]  # fmt: skip
    return LaunchConfig(argv=argv)


def _identical(source: Any, restored: Any) -> bool:
    proc = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(source), str(restored)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode not in (0, 1):
        raise RestoreDemoError(f"qemu-img compare failed: {proc.stderr.strip()}")
    return proc.returncode == 0


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
