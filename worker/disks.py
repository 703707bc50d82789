"""Domain inspection: the writable disks of a running QEMU, their format nodes and bitmaps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vmvault.worker.config import is_valid_name
from vmvault.worker.errors import WorkerError
from vmvault.worker.qmp import DirtyBitmapInfo, QmpSession

_PERIPHERAL = "/machine/peripheral/"


class DiskSelectionError(WorkerError):
    """The domain's disks do not match the config (missing disk, unusable name). Not retryable."""


@dataclass(frozen=True)
class DiskInfo:
    """One guest disk: name (device id, else node name), format node, size and bitmaps."""

    name: str
    node: str
    format: str
    filename: str
    virtual_size: int
    bitmaps: tuple[DirtyBitmapInfo, ...]
    qdev: str = ""  # QOM path of the guest device: where fleecing inserts its filter
    allocated: int = 0  # bytes the image file occupies (an upper bound of its data)

    def bitmap(self, name: str) -> DirtyBitmapInfo | None:
        return next((b for b in self.bitmaps if b.name == name), None)


def _disk_name(qdev: str, node: str) -> str:
    # qdev is "/machine/peripheral/<id>/virtio-backend" when the device has an id.
    if qdev.startswith(_PERIPHERAL):
        return qdev[len(_PERIPHERAL) :].split("/", 1)[0]
    return node


def node_bitmaps(
    session: QmpSession, nodes: Sequence[str]
) -> dict[str, tuple[DirtyBitmapInfo, ...]]:
    """The bitmaps of the named format nodes.

    Looked up by node name because while a backup job runs, the device's root node is the
    job's copy-before-write filter, which carries no bitmaps of its own.
    """
    found = {n.node_name: n.bitmaps for n in session.named_block_nodes() if n.node_name in nodes}
    missing = sorted(set(nodes) - set(found))
    if missing:
        raise DiskSelectionError(
            f"domain {session.domain!r}: block node(s) {', '.join(missing)} went away"
        )
    return found


def list_disks(session: QmpSession, allow: Sequence[str] | None = None) -> list[DiskInfo]:
    """The domain's writable disks (``query-block`` + flat ``query-named-block-nodes``).

    ``allow`` is the config's optional allow-list; naming a disk the domain lacks is an error.
    """
    nodes = {n.node_name: n for n in session.named_block_nodes()}
    disks: list[DiskInfo] = []
    for dev in session.query_block():
        inserted = dev.get("inserted")
        if not inserted or inserted.get("ro"):
            continue  # empty drive or CD-ROM / read-only disk: nothing to back up
        node_name = str(inserted.get("node-name", ""))
        name = _disk_name(str(dev.get("qdev", "")), node_name) or str(dev.get("device", ""))
        if allow is not None and name not in allow:
            continue
        if not is_valid_name(name):
            raise DiskSelectionError(
                f"domain {session.domain!r}: disk {name!r} has no usable name "
                "(give its device an id like 'vda')"
            )
        node = nodes.get(node_name)
        qdev = str(dev.get("qdev", ""))
        if not qdev:
            raise DiskSelectionError(
                f"domain {session.domain!r}: disk {name!r} is not attached to a guest device: "
                "leave it out with domains.<name>.disks"
            )
        image = inserted.get("image", {})
        disks.append(
            DiskInfo(
                name=name,
                node=node_name,
                format=str(inserted.get("drv", "")),
                filename=str(inserted.get("file", "")),
                virtual_size=int(image.get("virtual-size", 0)),
                bitmaps=node.bitmaps if node is not None else (),
                qdev=qdev,
                allocated=int(image.get("actual-size", 0)),
            )
        )
    if allow is not None:
        missing = sorted(set(allow) - {d.name for d in disks})
        if missing:
            raise DiskSelectionError(
                f"domain {session.domain!r}: configured disk(s) {', '.join(missing)} not found "
                f"among its writable disks ({', '.join(d.name for d in disks) or 'none'})"
            )
    if not disks:
        raise DiskSelectionError(f"domain {session.domain!r} has no writable disks to back up")
    return sorted(disks, key=lambda d: d.name)
