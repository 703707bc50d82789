"""Fleecing: a frozen view of running disks whose failure breaks the backup, never a guest write.

For every disk of the domain, for the length of one backup::

    guest device ──root──▶ copy-before-write  vmv-c-<disk> ──file──▶ disk format node
                             ▲       │ target                        ▲
                             │       ▼                               │ backing
          snapshot-access vmv-a-<disk>   scratch qcow2 vmv-s-<disk> ─┘
                  │                          │
                  ▼                          ▼
          NBD "probe-<disk>"           NBD "<disk>" (what the backup reads)

Before a guest write lands, the copy-before-write filter copies the old data into the
scratch image under ``state_dir``; the scratch image reads everything it does not hold
from the disk (its backing), so it shows the disk as it was at one instant. Copies into
an image whose backing chain holds the source are serialised against reads of that
image (QEMU's block-copy treats it as fleecing), so a read never sees a half-copied
cluster.

Why the backup does not read through ``snapshot-access``: on QEMU 7.2 its reads and block
status are wrong when a request starts in a copied cluster and goes on past it (they
return zeroes; a zero-write after the freeze made the chaos test's backups torn). QEMU
10.0 is right; the scratch image is right on both. ``snapshot-access`` is still needed:
it is the one place that tells whether the snapshot broke, since the scratch image
would then silently show new data. Every read of it fails once a copy failed (sticky),
so one read of ``probe-<disk>`` after the pull proves the whole pull frozen.

Why not ``blockdev-backup sync=none`` (the first route in shared/DESIGN.md): the filter it
inserts uses ``on-cbw-error=break-guest-write``, and neither QEMU 7.2 nor 10.0 lets
``blockdev-backup`` choose otherwise. A full or failing ``state_dir`` then failed the
guest's writes while the backup reported success. A filter added with ``blockdev-add``
takes ``on-cbw-error=break-snapshot`` and ``cbw-timeout`` (QEMU 7.1+): a copy that fails
or is too slow marks the snapshot broken (reads of the export fail) and the guest write
goes on. Checked on QEMU 7.2: a 2 MiB scratch, 4 MiB overwritten by the guest: every
guest write landed, the export's reads failed.

The filter is put in front of the device with ``qom-set <qdev> drive`` (QEMU 6.0+), which
is not a ``transaction`` action. To keep one instant for all disks and the checkpoint
bitmaps, the guest is paused (``stop``) for the few milliseconds from the checkpoint
transaction to the last ``qom-set``, then resumed (``cont``). SIGTERM and SIGINT wait for
the ``cont`` (``worker/signals.py``); for SIGKILL in that window a marker file names the
paused domain, and the reaper or the next job resumes it (``worker/cleanup.py``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vmvault.worker.cleanup import paused_marker, qemu_id, write_marker
from vmvault.worker.qmp import QmpSession
from vmvault.worker.signals import critical

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleeceNodes:
    """The QEMU node names of one disk's fleecing graph."""

    scratch: str
    filter: str
    access: str

    @classmethod
    def of(cls, disk: str) -> FleeceNodes:
        return cls(qemu_id("s", disk), qemu_id("c", disk), qemu_id("a", disk))


def scratch_options(node: str, path: Path, disk_node: str) -> dict[str, object]:
    """``blockdev-add`` of the scratch image: an empty qcow2 whose backing is the disk."""
    return {
        "driver": "qcow2",
        "node-name": node,
        "file": {"driver": "file", "filename": str(path)},
        "backing": disk_node,
    }


def probe_export(disk: str) -> str:
    """The NBD export name of a disk's snapshot-access view (see the module docstring)."""
    return f"probe-{disk}"


def filter_options(
    nodes: FleeceNodes, disk_node: str, timeout: int, bitmap: str | None
) -> dict[str, object]:
    """``blockdev-add`` of the copy-before-write filter over ``disk_node``.

    ``bitmap`` (an incremental's export bitmap, chunk-aligned) limits both what is copied
    and what the snapshot lets be read to the regions the backup reads: the scratch then
    grows with at most those regions.
    """
    options: dict[str, object] = {
        "driver": "copy-before-write",
        "node-name": nodes.filter,
        "file": disk_node,
        "target": nodes.scratch,
        "on-cbw-error": "break-snapshot",
        "cbw-timeout": timeout,
    }
    if bitmap is not None:
        options["bitmap"] = {"node": disk_node, "name": bitmap}
    return options


def access_options(nodes: FleeceNodes) -> dict[str, object]:
    """``blockdev-add`` of the snapshot view that tells whether the snapshot broke."""
    return {"driver": "snapshot-access", "node-name": nodes.access, "file": nodes.filter}


@contextmanager
def paused_guest(session: QmpSession, state_dir: Path) -> Iterator[float]:
    """Pause a running guest for the block; yields the monotonic start of the pause.

    A guest that is not running (paused by its manager, not started yet) is left as it
    is. Signals wait for the ``cont``; the marker file outlives only a SIGKILL.
    """
    started = time.monotonic()
    with critical():
        if session.query_status() != "running":
            yield started
            return
        marker = paused_marker(state_dir, session.domain)
        write_marker(marker)
        session.execute("stop")
        try:
            yield started
        finally:
            session.execute("cont")
            marker.unlink(missing_ok=True)
            log.info(
                "domain %s: guest paused for %.1f ms",
                session.domain,
                (time.monotonic() - started) * 1000,
            )


def scratch_bytes(path: Path) -> int:
    """Bytes a (sparse) scratch file really occupies."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0
