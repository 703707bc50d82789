"""Names of a backup's temporary QEMU objects and files, and removal of a dead job's leftovers.

Every temporary thing a backup sets up carries a recognisable name, so the next job on
the domain can find what a worker killed with SIGKILL left behind and remove it first:

    QEMU object         name                         removed with
    NBD export          vmv-e-<disk>                 block-export-del
    fleece block job    vmv-j-<disk>                 block-job-cancel
    scratch node        vmv-s-<disk>                 blockdev-del
    export bitmap       vmvault.tmp-<job>            block-dirty-bitmap-remove
    NBD server socket   <state_dir>/run/<domain>.nbd nbd-server-stop
    scratch files       <state_dir>/scratch/<domain>/*.qcow2

Checkpoint bitmaps (``vmvault-<id>^<parent>``) are not leftovers: they stay valid.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from worker.checkpoints import is_temp_bitmap
from worker.qmp import QmpCommandError, QmpSession

log = logging.getLogger(__name__)

# QEMU limits node names and ids to 31 characters.
_MAX_ID = 31


def qemu_id(kind: str, disk: str) -> str:
    """A QEMU node/job/export id for one disk: ``vmv-<kind>-<disk>`` (hashed when too long)."""
    name = f"vmv-{kind}-{disk}"
    if len(name) <= _MAX_ID:
        return name
    return f"vmv-{kind}-{hashlib.sha256(disk.encode()).hexdigest()[:16]}"


def _ours(name: str) -> bool:
    return name.startswith("vmv-")


def run_dir(state_dir: Path) -> Path:
    return state_dir / "run"


def nbd_socket_path(state_dir: Path, domain: str) -> Path:
    return run_dir(state_dir) / f"{domain}.nbd"


def scratch_dir(state_dir: Path, domain: str) -> Path:
    return state_dir / "scratch" / domain


@dataclass
class Leftovers:
    """What :func:`remove_leftovers` found and removed (for logs and tests)."""

    exports: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    bitmaps: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    nbd_server: bool = False

    def __bool__(self) -> bool:
        return bool(
            self.exports or self.jobs or self.nodes or self.bitmaps or self.files or self.nbd_server
        )


def remove_leftovers(session: QmpSession, state_dir: Path) -> Leftovers:
    """Remove a previous job's temporary exports, jobs, nodes, bitmaps and files, in that order."""
    found = Leftovers()
    for export in session.block_exports():
        if _ours(str(export["id"])):
            session.block_export_del(str(export["id"]))
            found.exports.append(str(export["id"]))
    sock = nbd_socket_path(state_dir, session.domain)
    if found.exports or sock.exists():
        try:
            session.nbd_server_stop()
            found.nbd_server = True
        except QmpCommandError:
            pass  # not running: the socket file is stale
        sock.unlink(missing_ok=True)
    for job in session.block_jobs():
        if _ours(str(job["device"])):
            session.block_job_cancel(str(job["device"]))
            found.jobs.append(str(job["device"]))
    for node in session.named_block_nodes():
        if _ours(node.node_name):
            session.blockdev_del(node.node_name)
            found.nodes.append(node.node_name)
    for node in session.named_block_nodes():
        for bitmap in node.bitmaps:
            if is_temp_bitmap(bitmap.name):
                session.bitmap_remove(node.node_name, bitmap.name)
                found.bitmaps.append(bitmap.name)
    scratch = scratch_dir(state_dir, session.domain)
    if scratch.exists():
        found.files = sorted(p.name for p in scratch.iterdir())
        shutil.rmtree(scratch, ignore_errors=True)
    if found:
        log.warning("domain %s: removed leftovers of an earlier job: %s", session.domain, found)
    return found
