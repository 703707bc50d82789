"""The blank VM: QEMU (TCG, no guest OS) with virtio-blk qcow2 disks and QMP sockets.

The one VM definition that ``vmvault demo`` (scheduler/demo.py, its restore clone in
scheduler/restore_demo.py) and the test suite (tests/fixtures/qemu.py, the launch
descriptions of the restore tests) start. Disk ``vda`` has the file node ``file-vda``,
the format node ``fmt-vda`` and the device id ``vda``; guest-like writes go through
:func:`qdev` (HMP ``qemu-io -d``), so dirty bitmaps see them as they see a guest's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

QEMU_SYSTEM = "qemu-system-x86_64"
MACHINE = ["-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64"]


def format_node(disk: str) -> str:
    """The qcow2 (format) node name of ``disk``."""
    return f"fmt-{disk}"


def qdev(disk: str) -> str:
    """The QOM path of ``disk``'s block backend, for ``qemu-io -d``."""
    return f"/machine/peripheral/{disk}/virtio-backend"


def disk_args(disk: str, filename: str) -> list[str]:
    """File node, qcow2 node and virtio-blk device of one disk (``filename`` may be a
    launch placeholder such as ``{disk:vda}``)."""
    return [
        "-blockdev", f"driver=file,filename={filename},node-name=file-{disk},discard=unmap",
        "-blockdev", f"driver=qcow2,file=file-{disk},node-name={format_node(disk)},discard=unmap",
        "-device", f"virtio-blk-pci,drive={format_node(disk)},id={disk}",
    ]  # fmt: skip


def argv(
    disks: Mapping[str, str],
    qmp_sockets: Iterable[str],
    name: str | None = None,
    binary: str = QEMU_SYSTEM,
) -> list[str]:
    """The whole command line: ``disks`` maps device id to image file name; one
    ``-qmp`` server per entry of ``qmp_sockets`` (a path, or ``{qmp}`` in a launch)."""
    args = [binary, *MACHINE]
    if name is not None:
        args += ["-name", name]
    for sock in qmp_sockets:
        args += ["-qmp", f"unix:{sock},server=on,wait=off"]
    for disk, filename in disks.items():
        args += disk_args(disk, filename)
    return args


def launch_argv(disks: Iterable[str], *extra_qmp: str, name: str | None = None) -> list[str]:
    """A ``launch.argv`` for the blank VM: images as ``{disk:<name>}`` placeholders, the
    domain's QMP socket as ``{qmp}``, plus ``extra_qmp`` monitors (a test's own)."""
    return argv({d: f"{{disk:{d}}}" for d in disks}, ["{qmp}", *extra_qmp], name=name)
