"""Backups of shut-off domains: their images opened by ``qemu-storage-daemon``, which speaks QMP.

When a domain's QEMU is not running (nothing listens on its QMP socket) and its config
says where its images are (``launch.image_dir``, the images ``<disk>.qcow2`` for the
``{disk:NAME}`` placeholders of ``launch.argv``, the same convention ``restore
--incoming`` uses), the backup opens them itself::

    qemu-storage-daemon --blockdev file + qcow2 per disk (read-write, image locks taken)
                        --monitor on <state_dir>/run/<domain>.qsd (0700 directory)
      → the checkpoint transaction, as for a running domain (worker/checkpoints.py)
      → NBD export of each format node with the export bitmap (nothing writes: no fleecing)
      → pull, commit (the backup path of worker/backup.py)
      → quit: QEMU stores the persistent checkpoint bitmaps in the qcow2 files

So the chain goes on: the next backup, online or not, is incremental. An image that a
running process holds (the domain started under another QMP socket, a ``qemu-img`` at
work) cannot be locked: the backup is refused, naming the image. The daemon gets SIGTERM
when the backup's process dies, even by SIGKILL (``PR_SET_PDEATHSIG``): it closes the
images cleanly instead of holding their locks with nobody to stop it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from vmvault.worker import checkpoints as cp
from vmvault.worker.cleanup import run_dir
from vmvault.worker.config import DomainConfig
from vmvault.worker.disks import DiskInfo
from vmvault.worker.errors import WorkerError
from vmvault.worker.qmp import QmpError, QmpSession, socket_is_listening

log = logging.getLogger(__name__)

_START_TIMEOUT = 20.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_MAX_ID = 31


class ShutOffBackupError(WorkerError):
    """A shut-off domain's images cannot be opened (missing, locked by a running process,
    qemu-storage-daemon failing). The message names the image; retryable once it is free."""

    retryable = True


def is_shut_off(dom: DomainConfig) -> bool:
    """Back up from the images: nothing listens on the QMP socket and the images are known."""
    launch = dom.launch
    if launch is None or launch.image_dir is None or dom.qmp is None:
        return False
    return not socket_is_listening(dom.qmp)


def image_paths(dom: DomainConfig, allow: list[str] | None) -> dict[str, Path]:
    """``<launch.image_dir>/<disk>.qcow2`` of every disk of ``launch.argv`` (or ``allow``)."""
    assert dom.launch is not None and dom.launch.image_dir is not None
    names = [n for n in dom.launch.disk_names() if allow is None or n in allow]
    missing = sorted(set(allow or []) - set(names))
    if missing:
        raise ShutOffBackupError(
            f"configured disk(s) {', '.join(missing)} have no {{disk:NAME}} in launch.argv"
        )
    if not names:
        raise ShutOffBackupError("launch.argv names no disks ({disk:NAME} placeholders)")
    return {name: dom.launch.image_dir / f"{name}.qcow2" for name in names}


def _node(kind: str, disk: str) -> str:
    name = f"qsd-{kind}-{disk}"
    if len(name) <= _MAX_ID:
        return name
    return f"qsd-{kind}-{hashlib.sha256(disk.encode()).hexdigest()[:16]}"


def monitor_path(state_dir: Path, domain: str) -> Path:
    return run_dir(state_dir) / f"{domain}.qsd"


@contextmanager
def storage_daemon(
    domain: str, images: dict[str, Path], state_dir: Path, timeout: float
) -> Iterator[QmpSession]:
    """``qemu-storage-daemon`` on ``images``; yields a QMP session to it; always stops it
    with ``quit`` (persistent bitmaps are written to the images then)."""
    binary = shutil.which("qemu-storage-daemon")
    if binary is None:
        raise ShutOffBackupError("qemu-storage-daemon not found: install qemu-system-common")
    for name, path in images.items():
        if not path.is_file():
            raise ShutOffBackupError(
                f"domain {domain!r} is shut off and its disk {name} image {path} does not "
                "exist: check launch.image_dir"
            )
    sock = monitor_path(state_dir, domain)
    sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(sock.parent, 0o700)
    sock.unlink(missing_ok=True)
    argv = [binary]
    for name, path in images.items():
        argv += [
            "--blockdev",
            f"driver=file,node-name={_node('f', name)},filename={_escape(path)}",
            "--blockdev",
            f"driver=qcow2,node-name={_node('q', name)},file={_node('f', name)}",
        ]
    argv += [
        "--chardev",
        f"socket,id=vmvmon,path={_escape(sock)},server=on,wait=off",
        "--monitor",
        "chardev=vmvmon",
    ]
    log_path = run_dir(state_dir) / f"{domain}.qsd.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not socket_is_listening(sock):
            if proc.poll() is not None:
                raise _start_failure(domain, log_path, images)
            if time.monotonic() > deadline:
                raise ShutOffBackupError(
                    f"domain {domain!r}: qemu-storage-daemon did not open its monitor within "
                    f"{_START_TIMEOUT:.0f}s (log: {log_path})"
                )
            time.sleep(0.02)
        session = QmpSession(domain, sock, timeout)
        session.connect()
        try:
            yield session
        finally:
            with contextlib.suppress(QmpError):
                session.execute("quit")
            session.close()
    finally:
        _stop(proc)
        sock.unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the backup's process dies, even by SIGKILL.

    A daemon left behind would hold the image locks, and the domain could not start.
    SIGTERM makes it close the images cleanly (the bitmaps are stored).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _escape(path: Path) -> str:
    """A path as a QEMU option value: commas doubled."""
    return str(path).replace(",", ",,")


def _start_failure(domain: str, log_path: Path, images: dict[str, Path]) -> ShutOffBackupError:
    text = log_path.read_text(errors="replace").strip()
    if "lock" in text.lower():
        held = next((str(p) for p in images.values() if str(p) in text), "an image")
        return ShutOffBackupError(
            f"domain {domain!r}: {held} is locked by a running process (is the domain running "
            f"under another QMP socket than the configured one?): {text.splitlines()[-1]}"
        )
    return ShutOffBackupError(f"domain {domain!r}: qemu-storage-daemon failed: {text}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(10)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def list_images(session: QmpSession, images: dict[str, Path]) -> list[DiskInfo]:
    """The daemon's disks as :class:`DiskInfo` (no guest device: nothing writes to them)."""
    nodes = {n.node_name: n for n in session.named_block_nodes()}
    disks = []
    for name, path in sorted(images.items()):
        node = nodes[_node("q", name)]
        disks.append(
            DiskInfo(
                name=name,
                node=node.node_name,
                format=node.driver,
                filename=str(path),
                virtual_size=node.virtual_size,
                bitmaps=node.bitmaps,
                allocated=os.stat(path).st_blocks * 512,
            )
        )
    return disks


def checkpoint_and_export(
    session: QmpSession,
    disks: list[DiskInfo],
    chains: dict[str, cp.DiskChain],
    new_id: str,
    since: str | None,
    nbd_socket: Path,
    probe_name: Callable[[str], str],
    on_undo: Callable[[str, Callable[[], None]], None],
) -> str | None:
    """The checkpoint (both halves at once: nothing writes) and the NBD exports.

    Each disk's format node is exported as ``<disk>`` (what the backup reads) and as its
    probe: with no snapshot to break, the probe of a shut-off disk reads the image itself.
    Returns the export bitmap's name (incremental) or None.
    """
    temp = f"{cp.TEMP_PREFIX}{os.getpid()}" if since is not None else None
    actions: list[dict[str, Any]] = []
    for disk in disks:
        actions += cp.begin_checkpoint_actions(chains[disk.name], new_id)
    session.transaction(actions)
    actions = []
    for disk in disks:
        actions += cp.seal_checkpoint_actions(chains[disk.name])
        if temp is not None and since is not None:
            actions += cp.export_bitmap_actions(chains[disk.name], since, temp)
    session.transaction(actions)
    if temp is not None:
        for disk in disks:
            on_undo(f"remove bitmap {temp}", partial(session.bitmap_remove, disk.node, temp))
    nbd_socket.unlink(missing_ok=True)
    session.nbd_server_start(nbd_socket)
    on_undo("remove NBD socket", lambda: nbd_socket.unlink(missing_ok=True))
    on_undo("nbd-server-stop", partial(session.nbd_server_stop))
    os.chmod(nbd_socket, 0o600)
    for disk in disks:
        bitmaps = [{"node": disk.node, "name": temp}] if temp else []
        export_id = _node("e", disk.name)
        session.block_export_add(export_id, disk.node, disk.name, bitmaps)
        on_undo(f"block-export-del {export_id}", partial(session.block_export_del, export_id))
        probe_id = _node("p", disk.name)
        session.block_export_add(probe_id, disk.node, probe_name(disk.name), [])
        on_undo(f"block-export-del {probe_id}", partial(session.block_export_del, probe_id))
    return temp
