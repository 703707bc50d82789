"""Names of a backup's temporary QEMU objects and files, and removal of a dead job's leftovers.

Every temporary thing a backup sets up carries a recognisable name, so the next job on
the domain, or the worker's reaper, can find what a job killed with SIGKILL left behind
and remove it:

    QEMU object / file   name                            removed with
    NBD export           vmv-e-<disk>                    block-export-del
    snapshot view        vmv-a-<disk>                    blockdev-del
    fleecing filter      vmv-c-<disk> (guest's root)     qom-set drive back, blockdev-del
    scratch node         vmv-s-<disk>                    blockdev-del
    fleece block job     vmv-j-<disk> (older vmvault)    block-job-cancel
    export bitmaps       vmvault.tmp-<job>[c]            block-dirty-bitmap-remove
    NBD server socket    <state_dir>/run/<domain>.nbd    nbd-server-stop
    paused guest         <state_dir>/run/<domain>.paused cont (when QEMU still says paused)
    frozen guest FS      <state_dir>/run/<domain>.frozen guest-fsfreeze-thaw (worker/freeze.py)
    scratch files        <state_dir>/scratch/<domain>/*

Checkpoint bitmaps (``vmvault-<id>^<parent>``) are not leftovers: they stay valid.
Nothing here checks that the job which made these is dead: callers hold the domain's
lock (``worker/locks.py``), which the kernel frees when its holder dies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmvault.worker.checkpoints import interrupted_checkpoint_actions, is_temp_bitmap, parse_chain
from vmvault.worker.qmp import QmpCommandError, QmpSession

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


def paused_marker(state_dir: Path, domain: str) -> Path:
    """Exists while a backup has the guest paused (``worker/fleece.py``)."""
    return run_dir(state_dir) / f"{domain}.paused"


def frozen_marker(state_dir: Path, domain: str) -> Path:
    """Exists while a backup may have the guest's file systems frozen (``worker/freeze.py``)."""
    return run_dir(state_dir) / f"{domain}.frozen"


def job_marker(state_dir: Path, domain: str) -> Path:
    """Exists from before a backup changes anything in QEMU until its teardown is done:
    after a SIGKILL it tells the reaper that this domain has leftovers."""
    return run_dir(state_dir) / f"{domain}.backup"


def write_marker(path: Path) -> None:
    """Durably create a marker naming this process (before the state it announces)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def has_leftovers(state_dir: Path, domain: str) -> bool:
    """Did a backup of ``domain`` end without its teardown (a marker is still there)?"""
    return any(
        marker(state_dir, domain).exists() for marker in (job_marker, paused_marker, frozen_marker)
    )


@dataclass
class Leftovers:
    """What :func:`remove_leftovers` found and removed (for logs and tests)."""

    exports: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    bitmaps: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    nbd_server: bool = False
    resumed: bool = False

    def __bool__(self) -> bool:
        return bool(
            self.exports
            or self.devices
            or self.jobs
            or self.nodes
            or self.bitmaps
            or self.files
            or self.nbd_server
            or self.resumed
        )


# Fleecing nodes are deleted parents first: the snapshot view, the filter, the scratch.
_NODE_ORDER = {"vmv-a-": 0, "vmv-c-": 1, "vmv-s-": 2}


def remove_leftovers(session: QmpSession, state_dir: Path) -> Leftovers:
    """Remove a dead job's temporary QEMU objects and files; resume a guest it left paused."""
    found = Leftovers()
    marker = paused_marker(state_dir, session.domain)
    if marker.exists():
        # Resume first: the guest must not wait for the rest of the clean-up. Only
        # "paused" is ours to undo; any other state was set by someone else since.
        if session.query_status() == "paused":
            session.execute("cont")
            found.resumed = True
        marker.unlink(missing_ok=True)
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
    # Parents before children: a device cannot go back to its disk while the filter in
    # front of it has a parent of its own (the snapshot view), and nodes are deleted
    # view → filter → scratch.
    ours = sorted(
        (n.node_name for n in session.named_block_nodes() if _ours(n.node_name)),
        key=lambda name: _NODE_ORDER.get(name[:6], len(_NODE_ORDER)),
    )
    for name in [n for n in ours if n.startswith("vmv-a-")]:
        session.blockdev_del(name)
        found.nodes.append(name)
    for qdev, original in _devices_on_filters(session):
        session.set_drive(qdev, original)
        found.devices.append(qdev)
    for job in session.block_jobs():
        if _ours(str(job["device"])):
            session.block_job_cancel(str(job["device"]))
            found.jobs.append(str(job["device"]))
    for name in [n for n in ours if not n.startswith("vmv-a-")]:
        session.blockdev_del(name)
        found.nodes.append(name)
    for node in session.named_block_nodes():
        for bitmap in node.bitmaps:
            if is_temp_bitmap(bitmap.name):
                session.bitmap_remove(node.node_name, bitmap.name)
                found.bitmaps.append(bitmap.name)
        # A job killed between the two halves of its checkpoint left two recording
        # bitmaps: sealing it keeps the chain whole, and the next backup incremental.
        sealing = interrupted_checkpoint_actions(parse_chain(node.node_name, node.bitmaps))
        if sealing:
            session.transaction(sealing)
            found.bitmaps += [str(a["data"]["name"]) + " (sealed)" for a in sealing]
    scratch = scratch_dir(state_dir, session.domain)
    if scratch.exists():
        found.files = sorted(p.name for p in scratch.iterdir())
        shutil.rmtree(scratch, ignore_errors=True)
    job_marker(state_dir, session.domain).unlink(missing_ok=True)
    if found:
        log.warning("domain %s: removed leftovers of an earlier job: %s", session.domain, found)
    return found


def _devices_on_filters(session: QmpSession) -> list[tuple[str, str]]:
    """``(qdev, original node)`` of every guest device whose root is a vmvault filter.

    The filter's ``file`` child is the node the device had before; QEMU's block graph
    (``x-debug-query-block-graph``, QEMU 3.0+) is the one place that names it.
    """
    on_filter = [
        str(dev["qdev"])
        for dev in session.query_block()
        if dev.get("qdev") and _root(dev).startswith("vmv-c-")
    ]
    if not on_filter:
        return []
    graph = session.execute("x-debug-query-block-graph")
    by_id = {n["id"]: n for n in graph["nodes"]}
    roots: dict[str, str] = {}  # backend name (qdev) -> its root node name
    files: dict[str, str] = {}  # filter node name -> its file child's node name
    for edge in graph["edges"]:
        parent, child = by_id[edge["parent"]], by_id[edge["child"]]
        if parent["type"] == "block-backend" and edge["name"] == "root":
            roots[parent["name"]] = child["name"]
        elif edge["name"] == "file" and str(parent["name"]).startswith("vmv-c-"):
            files[parent["name"]] = child["name"]
    pairs = []
    for qdev in on_filter:
        original = files.get(roots.get(qdev, ""), "")
        if original:
            pairs.append((qdev, original))
        else:
            log.warning(
                "domain %s: cannot tell which node %s had: left as is", session.domain, qdev
            )
    return pairs


def _root(device: dict[str, Any]) -> str:
    """The node name at the root of a ``query-block`` device ('' when it has no medium)."""
    return str(device.get("inserted", {}).get("node-name", ""))
