"""Restore into a domain libvirt manages: its image paths, its checkpoint metadata, its start.

The data path is that of a restore to files (worker/restore.py): fresh images written
next to the domain's as ``<image>.partial``, verified, then renamed over the images its
XML names, the old ones moved aside until every disk is in place (the restore journal
puts them back if the restore dies). libvirt's side, with the domain shut off::

    images' paths        ← the inactive domain XML (<disk><source file=…>, by target)
    old checkpoints      → metadata deleted (their bitmaps went with the old images)
    checkpoint vmvault-<id of the restored backup>
                         → redefined (VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE) over the
                           bitmap the restore wrote into each image: the next backup is
                           incremental from the restored one, and libvirt agrees
    --boot               → virDomainCreate
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from vmvault.worker import checkpoints as cp
from vmvault.worker.errors import RestoreError
from vmvault.worker.libvirt_domain import LibvirtDomain, parse_disks


def image_paths(lv: LibvirtDomain, disks: Sequence[str]) -> dict[str, Path]:
    """Where the shut-off domain keeps each of ``disks``; refuses a running domain."""
    if lv.is_active():
        raise RestoreError(
            f"libvirt domain {lv.domain!r} is running: shut it off first (virsh shutdown); "
            "a running domain is never restored into"
        )
    found = {d.name: d for d in parse_disks(lv.xml(inactive=True))}
    missing = [name for name in disks if name not in found]
    if missing:
        raise RestoreError(
            f"libvirt domain {lv.domain!r} has no disk {', '.join(missing)} in its XML (its "
            f"disks: {', '.join(sorted(found)) or 'none'}): restore to files (--to DIR) instead"
        )
    for name in disks:
        if found[name].format != "qcow2":
            raise RestoreError(
                f"libvirt domain {lv.domain!r} disk {name} is {found[name].format}, restores "
                "write qcow2: change its <driver type> to qcow2 or restore to files"
            )
    return {name: found[name].path for name in disks}


def reset_checkpoints(lv: LibvirtDomain, checkpoint: str | None, disks: Sequence[str]) -> None:
    """libvirt's checkpoint metadata to match the restored images: the old checkpoints'
    metadata goes, the restored backup's checkpoint is redefined over its bitmaps."""
    for name in sorted(lv.checkpoints()):
        lv.delete_checkpoint_metadata(name)
    if checkpoint is not None:
        taken = cp.checkpoint_time(checkpoint.removeprefix(cp.PREFIX))
        created = int(taken.timestamp()) if taken is not None else int(time.time())
        lv.redefine_checkpoint(checkpoint, disks, created)
