"""Live restore (``vmvault restore DOMAIN --live``): the guest runs at once, its disks fill in.

    nbdkit (worker/serve.py) ──NBD, read-only──▶ backing of <disk>.qcow2.live (overlay)
         ▲ shared lease                              │ QEMU from launch.argv, werror/rerror=stop
    repository                                       │ blockdev-mirror {sync: full, speed,
                                                      │   copy-mode: write-blocking}
                                                      ▼
                                <disk>.qcow2.partial ─(complete, rename)─▶ <disk>.qcow2

Steps: choose the backup, take the repository's shared lease, start nbdkit on a unix
socket of the domain's own (``<state_dir>/run/vmvl-<domain>/nbd``), create per disk an
overlay ``<disk>.qcow2.live`` whose backing is the export and an empty standalone
``<disk>.qcow2.partial``, start the domain's QEMU paused (``-S``) from its launch
description on the overlays with ``werror=stop,rerror=stop`` added to its drives, add the
checkpoint bitmap to each overlay (before any guest write: it records exactly what the
guest changes), start a mirror of each overlay into its ``.partial`` and ``cont``. The
mirror copies backup + guest writes; guest writes made meanwhile reach both images
(``write-blocking``). When every mirror is in sync: ``stop``, ``block-job-complete`` (the
guest's disks switch to the ``.partial`` images), the checkpoint bitmaps merged onto
them, ``cont`` — a pause of a few milliseconds. Then the overlays are closed and deleted,
each ``.partial`` renamed to ``<disk>.qcow2``, the server stopped and the lease released.

Why a mirror and not ``block-stream``: stream puts a copy-on-read filter above the disk,
and QEMU 7.2's filter turns a failed allocation query of the backing into a read that
*succeeds without data* (block/copy-on-read.c, ``n == 0`` → ``break`` → ``return 0``):
with the server gone, guest reads of blocks not copied yet would return garbage and the
copy would write zeros (seen in tests). Through a mirror the reads fail with ``EIO``.

If nbdkit dies, a guest read of a block not copied yet fails and ``rerror=stop`` pauses
the guest (it never sees the error); the mirror (``on-source-error: stop``) pauses too.
This process restarts nbdkit on the same socket, waits until QEMU's NBD client has
reconnected (it retries with a backoff), resumes the mirrors and ``cont``s the guest.

Abandoned (this process killed or interrupted) after the guest started, the guest keeps
running: its writes are in the overlays, which need the backup as backing at the socket
path in their header. docs/restore.md says how to serve it again, finish or discard.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from vmvault.storage.progress import Progress
from vmvault.worker import qemu_img
from vmvault.worker.cleanup import qemu_id
from vmvault.worker.config import DomainConfig, FleetConfig
from vmvault.worker.errors import RestoreError, ServeError
from vmvault.worker.launch import (
    QemuProcess,
    connect_qmp,
    ensure_qmp_free,
    render_argv,
    start_qemu,
)
from vmvault.worker.locks import domain_lock
from vmvault.worker.qmp import QmpError, QmpSession
from vmvault.worker.restore import (
    _BITMAP_GRANULARITY,
    RestoreTargetExistsError,
    _check_targets,
    _fail,
    _format_node,
    _make_target_dir,
    check_target_dir,
    create_image,
    partial_path,
)
from vmvault.worker.restore_cleanup import (
    RestoreJournal,
    fsync_dir,
    make_private_dir,
    remove_leftovers_locked,
    run_dir,
)
from vmvault.worker.restore_select import (
    open_repo,
    restore_checkpoint_name,
    select_backup,
    select_disks,
)
from vmvault.worker.serve import (
    DEFAULT_CACHE_MIB,
    Listen,
    check_socket,
    release,
    start_nbdkit,
    take_lease,
)
from vmvault.worker.signals import critical

log = logging.getLogger(__name__)

# Also how long a dead server may go unnoticed: keep it short (see _stream).
POLL_INTERVAL = 0.1
# A server that died is started again after this pause (a crash loop must not spin).
RESTART_DELAY = 1.0
_MAX_SOCKET_PATH = 107
_ERROR_OPTIONS = "werror=stop,rerror=stop"
OVERLAY_SUFFIX = ".live"
_BUF_SIZE = 1024 * 1024


@dataclass
class LiveDisk:
    """One disk of a live restore: its image and how much of it was copied."""

    name: str
    path: Path
    virtual_size: int
    streamed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "virtual_size": self.virtual_size,
            "bytes_streamed": self.streamed,
        }


@dataclass
class LiveRestoreResult:
    """What a live restore did; ``to_json`` is the CLI's ``--json`` document."""

    backup_id: str
    domain: str
    disks: list[LiveDisk]
    socket: Path
    qmp: Path
    qemu_pid: int
    qemu_log: Path
    checkpoint: str | None = None
    speed: int = 0
    duration_s: float = 0.0
    guest_started_s: float = 0.0  # seconds from the start until the guest ran
    server_restarts: int = 0
    qemu: QemuProcess | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup_id,
            "domain": self.domain,
            "mode": "live",
            "disks": [d.to_json() for d in self.disks],
            "bytes_streamed": sum(d.streamed for d in self.disks),
            "speed": self.speed,
            "duration_s": round(self.duration_s, 3),
            "guest_started_s": round(self.guest_started_s, 3),
            "server_restarts": self.server_restarts,
            "checkpoint": self.checkpoint,
            "socket": str(self.socket),
            "qmp": str(self.qmp),
            "qemu_pid": self.qemu_pid,
            "qemu_log": str(self.qemu_log),
            "state": "running",
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LiveRestoreResult:
        """The result ``to_json`` gave (a queued live restore's, as the CLI receives it);
        without the QEMU handle: that process runs on the worker's host."""
        return cls(
            backup_id=doc["backup_id"],
            domain=doc["domain"],
            disks=[
                LiveDisk(d["name"], Path(d["path"]), d["virtual_size"], d["bytes_streamed"])
                for d in doc["disks"]
            ],
            socket=Path(doc["socket"]),
            qmp=Path(doc["qmp"]),
            qemu_pid=doc["qemu_pid"],
            qemu_log=Path(doc["qemu_log"]),
            checkpoint=doc["checkpoint"],
            speed=doc["speed"],
            duration_s=doc["duration_s"],
            guest_started_s=doc["guest_started_s"],
            server_restarts=doc["server_restarts"],
        )


def live_socket(state_dir: Path, domain: str) -> Path:
    """The export socket of ``domain``'s live restore, named in its overlays' headers.

    Stable per domain, so an abandoned restore can be served again where the images look.
    """
    path = run_dir(state_dir) / f"vmvl-{domain}" / "nbd"
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        path = Path("/tmp") / f"vmvl-{os.getuid()}-{domain}" / "nbd"
    return path


def stop_on_error(argv: list[str]) -> list[str]:
    """``argv`` with ``werror=stop,rerror=stop`` on every guest disk: a failed read of the
    backing pauses the guest instead of showing it an error (or anything else).

    Added to each ``-device`` that has a ``drive=`` and each ``-drive``, unless the launch
    description already sets them.
    """
    out: list[str] = []
    previous = ""
    for arg in argv:
        disk = previous == "-drive" or (previous == "-device" and "drive=" in arg)
        if disk and "werror=" not in arg and "rerror=" not in arg:
            arg = f"{arg},{_ERROR_OPTIONS}"
        out.append(arg)
        previous = arg
    return out


def backing_spec(listen: Listen, export: str) -> str:
    """The backing file name of an overlay on one export: the NBD URI, which QEMU opens
    with its own NBD client (``nbd+unix:///vda?socket=PATH``)."""
    return listen.uri(export)


def run_live_restore(
    config: FleetConfig,
    config_file: Path,
    domain: str,
    backup_id: str | None = None,
    at: datetime | None = None,
    to_dir: Path | None = None,
    force: bool = False,
    speed: int = 0,
    progress: Progress | None = None,
    *,
    cache_mib: int = DEFAULT_CACHE_MIB,
    on_running: Callable[[LiveRestoreResult], None] | None = None,
    restart_delay: float = RESTART_DELAY,
) -> LiveRestoreResult:
    """Start ``domain`` on overlays of a backup, copy the backup in, return when done.

    ``speed``: bytes per second per disk for the copy (0: unlimited). ``on_running`` is
    called once the guest runs (the copy has just begun). Images go to ``to_dir``, default
    ``launch.image_dir``, else ``<state_dir>/images/<domain>``.
    """
    started = time.monotonic()
    domain_cfg = config.domain(domain)
    if domain_cfg.launch is None:
        raise RestoreError(
            f"domain {domain!r} has no launch description: add domains.{domain}.launch.argv"
            " to the config (see docs/restore.md) to restore into the domain"
        )
    if speed < 0:
        raise RestoreError(f"--speed {speed}: give a rate of at least 0 bytes/s (0: unlimited)")
    target_dir = (to_dir or config.incoming_image_dir(domain)).absolute()
    with contextlib.ExitStack() as stack:
        repo = open_repo(config)
        stack.callback(repo.close)
        manifest = select_backup(repo, domain, backup_id, at)
        chosen = select_disks(manifest, None)
        paths = {d.name: target_dir / f"{d.name}.qcow2" for d in chosen}
        checkpoint = restore_checkpoint_name(manifest)  # warns when there is none
        stack.enter_context(domain_lock(config.state_dir, domain, job="restore"))
        remove_leftovers_locked(config.state_dir, domain)
        ensure_qmp_free(domain, domain_cfg.qmp_socket(domain))
        check_target_dir(target_dir)
        _check_targets(list(paths.values()), force)
        _check_overlays(list(paths.values()))
        socket = live_socket(config.state_dir, domain)
        if socket.parent.parent != Path("/tmp"):
            make_private_dir(socket.parent.parent)  # <state_dir>/run
        make_private_dir(socket.parent)
        listen = Listen(socket=socket)
        check_socket(listen)
        _make_target_dir(target_dir)
        lease = take_lease(repo, manifest)
        stack.callback(release, lease)
        names = [d.name for d in chosen]
        server = _Server(config_file, domain, manifest.backup_id, names, listen, cache_mib)
        stack.callback(server.stop)
        server.start()
        result = LiveRestoreResult(
            backup_id=manifest.backup_id,
            domain=domain,
            disks=[LiveDisk(d.name, paths[d.name], d.virtual_size) for d in chosen],
            socket=socket,
            qmp=domain_cfg.qmp_socket(domain),
            qemu_pid=0,
            qemu_log=config.state_dir / "logs" / f"{domain}.qemu.log",
            checkpoint=checkpoint,
            speed=speed,
        )
        qemu, session = _start(config, domain_cfg, result, listen)
        result.guest_started_s = time.monotonic() - started
        try:
            if on_running is not None:
                on_running(result)
            _copy(session, result, server, progress, restart_delay)
            _switch(session, result)
        except BaseException as err:
            _say_abandoned(result, err, qemu.alive())
            raise
        finally:
            session.close()
        _settle(result)
        log.info("live restore of %s: every disk copied, the backup is no longer needed", domain)
    # The server is stopped and the lease released (the stack above): the images stand alone.
    with contextlib.suppress(OSError):
        socket.parent.rmdir()
    result.duration_s = time.monotonic() - started
    result.qemu = qemu
    return result


class _Server:
    """nbdkit serving the backup, restartable on the same socket."""

    def __init__(
        self,
        config_file: Path,
        domain: str,
        backup_id: str,
        disks: list[str],
        listen: Listen,
        cache_mib: int,
    ) -> None:
        self._args = (config_file, domain, backup_id, disks, listen, cache_mib)
        self.listen = listen
        self._stack = contextlib.ExitStack()
        self._proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        self._proc, _tail = start_nbdkit(self._stack, *self._args)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else 0

    def restart(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        with critical():
            self._stack.close()
            self._proc = None


def overlay_path(final: Path) -> Path:
    """Where the guest runs during a live restore (backing: the backup's export)."""
    return final.with_name(final.name + OVERLAY_SUFFIX)


def _check_overlays(paths: list[Path]) -> None:
    for path in paths:
        overlay = overlay_path(path)
        if overlay.exists():
            # Never replaced, not even with --force: it may hold an abandoned guest's writes.
            raise RestoreTargetExistsError(
                f"{overlay} exists: a live restore of this domain was abandoned and its guest"
                " writes are in it; finish or discard it first (docs/restore.md, Live restore)"
            )


def _job_id(disk: str) -> str:
    return qemu_id("lr", disk)


def _target_node(disk: str) -> str:
    """The node of the restored image: the guest's disk from the switch on, so not named
    ``vmv-…`` (the backup's cleanup removes such nodes as its own leftovers)."""
    return qemu_id("lt", disk).replace("vmv-lt-", "restored-", 1)


def _start(
    config: FleetConfig, domain_cfg: DomainConfig, result: LiveRestoreResult, listen: Listen
) -> tuple[QemuProcess, QmpSession]:
    """Overlays and empty targets, QEMU paused on the overlays, bitmaps, mirrors, cont.

    Until the guest runs, a failure removes all of it (the journal names the targets; the
    overlays are removed here); once it runs, the overlays hold the guest's writes.
    """
    assert domain_cfg.launch is not None and listen.socket is not None
    domain = result.domain
    journal = RestoreJournal(config.state_dir, domain, "live")
    qemu: QemuProcess | None = None
    session: QmpSession | None = None
    overlays = {d.name: overlay_path(d.path) for d in result.disks}
    try:
        for disk in result.disks:
            partial = partial_path(disk.path)
            journal.add_disk(disk.name, disk.path, partial)
            create_image(partial, disk.virtual_size)
            # The overlay is journalled like a temporary image (``final`` is itself: there is
            # nothing to put back): a crash before the guest runs removes it too.
            journal.add_disk(disk.name, overlays[disk.name], overlays[disk.name])
            _create_overlay(overlays[disk.name], disk.virtual_size, backing_spec(listen, disk.name))
        argv = render_argv(
            domain, domain_cfg.launch, domain_cfg.qmp_socket(domain), overlays, incoming=False
        )
        argv = [*stop_on_error(argv), "-S"]
        record: Callable[[int], None] = lambda pid: journal.add_process("qemu", pid)  # noqa: E731
        qemu = start_qemu(
            domain, argv, domain_cfg.qmp_socket(domain), result.qemu_log, on_start=record
        )
        session = connect_qmp(qemu)
        for disk in result.disks:
            node = _format_node(session, domain, disk.name, overlays[disk.name])
            if result.checkpoint is not None:
                # Before any guest write: the bitmap holds exactly what the guest changes.
                session.bitmap_add(
                    node, result.checkpoint, persistent=True, granularity=_BITMAP_GRANULARITY
                )
            target = _target_node(disk.name)
            session.blockdev_add(
                {
                    "driver": "qcow2",
                    "node-name": target,
                    "discard": "unmap",
                    "file": {
                        "driver": "file",
                        "filename": str(partial_path(disk.path)),
                        "discard": "unmap",
                    },
                }
            )
            args: dict[str, object] = {
                "job-id": _job_id(disk.name),
                "device": node,
                "target": target,
                "sync": "full",
                # Guest writes reach the target before they complete: in sync once ready.
                "copy-mode": "write-blocking",
                "on-source-error": "stop",
                "on-target-error": "stop",
                # Kept once concluded: its error (or none) is read before it goes.
                "auto-dismiss": False,
            }
            if result.speed:
                args["speed"] = result.speed
                # One mirror iteration copies up to buf-size before the rate limit waits.
                args["buf-size"] = _BUF_SIZE
            session.execute("blockdev-mirror", args)
        # From here on the guest's writes live in the overlays: no undo (ours, the next
        # restore's, the reaper's) may remove them, so the journal goes before the guest runs.
        journal.remove()
        session.execute("cont")
    except BaseException:
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()
        if qemu is not None:
            qemu.kill()
        _fail(journal)  # the QEMU is dead: its overlays and targets go (the guest never ran)
        raise
    result.qemu_pid = qemu.pid
    log.info("live restore of %s: guest running, qemu pid %d", domain, qemu.pid)
    return qemu, session


def _say_abandoned(result: LiveRestoreResult, err: BaseException, alive: bool) -> None:
    """The copy stops here but the guest runs on: say where its data is and what to do."""
    overlays = ", ".join(str(overlay_path(d.path)) for d in result.disks)
    qemu = f"QEMU pid {result.qemu_pid} " + ("keeps running" if alive else "has exited")
    log.error(
        "live restore of %s abandoned (%s): %s; the guest's writes are in %s, which read"
        " the rest from backup %s at %s, served by nobody now (reads of blocks not copied"
        " yet pause the guest). Resume: vmvault serve %s --backup %s --socket %s (then QMP"
        " cont); or discard: stop the QEMU and delete those files and the .partial images"
        " (docs/restore.md, Live restore)",
        result.domain,
        err if str(err) else err.__class__.__name__,
        qemu,
        overlays,
        result.backup_id,
        result.socket,
        result.domain,
        result.backup_id,
        result.socket,
    )


def _create_overlay(path: Path, size: int, backing: str) -> None:
    path.unlink(missing_ok=True)
    try:
        # -u: the backing is not opened here (QEMU opens it, and reports a failure).
        qemu_img.run(
            ["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=off", "-u",
             "-b", backing, "-F", "raw", str(path), str(size)],
            f"creating overlay {path}",
            private=True,
        )  # fmt: skip
    except qemu_img.QemuImgError as err:
        raise RestoreError(str(err)) from err


def _copy(
    session: QmpSession,
    result: LiveRestoreResult,
    server: _Server,
    progress: Progress | None,
    restart_delay: float,
) -> None:
    """Until every mirror is in sync: progress, and recovery from a dead server."""
    jobs = {_job_id(d.name): d for d in result.disks}
    total = max(1, sum(d.virtual_size for d in result.disks))
    died_at: float | None = None
    while True:
        if died_at is None and not server.alive():
            died_at = time.monotonic()
            log.warning(
                "live restore of %s: the backup's server (nbdkit) exited: guest reads of"
                " blocks not copied yet pause the guest until it is back",
                result.domain,
            )
        if died_at is not None and time.monotonic() - died_at >= restart_delay:
            try:
                server.restart()
            except ServeError as err:
                log.warning("live restore: restarting the server failed: %s", err)
                died_at = time.monotonic()
            else:
                result.server_restarts = server.restarts
                _wait_reconnected(session, result, deadline=time.monotonic() + 60)
                died_at = None
                log.info(
                    "live restore of %s: server back (nbdkit pid %d)", result.domain, server.pid
                )
        if died_at is None:
            _recover(session, result.domain)
        if _poll_jobs(session, result, jobs, progress, total) and died_at is None:
            return
        time.sleep(POLL_INTERVAL)


def _wait_reconnected(session: QmpSession, result: LiveRestoreResult, deadline: float) -> None:
    """Until a read of every NBD backing node succeeds (HMP ``qemu-io`` on the node; it
    reports to QEMU's stdout, the log). Each failed read also prompts a reconnect."""
    nodes = [n.node_name for n in session.named_block_nodes() if n.driver == "nbd"]
    for node in nodes:
        while True:
            before = result.qemu_log.stat().st_size
            session.hmp(f'qemu-io {node} "read 0 512"')
            with result.qemu_log.open("rb") as f:
                f.seek(before)
                said = f.read().decode(errors="replace")
            if "read 512/512 bytes" in said:
                break
            if time.monotonic() > deadline:
                raise RestoreError(
                    f"live restore of {result.domain!r}: QEMU did not reconnect to the"
                    f" restarted server ({node}): {said.strip()}; the guest stays paused"
                )
            time.sleep(0.5)


def _poll_jobs(
    session: QmpSession,
    result: LiveRestoreResult,
    jobs: dict[str, LiveDisk],
    progress: Progress | None,
    total: int,
) -> bool:
    """Report every disk's progress; True when every mirror is ready (in sync)."""
    states = {j["device"]: j for j in session.block_jobs()}
    ready = True
    base = 0
    for job_id, disk in jobs.items():
        job = states.get(job_id)
        if job is None or job.get("status") == "concluded":
            error = (job or {}).get("error", "it vanished (cancelled by someone?)")
            raise RestoreError(
                f"live restore of {result.domain!r}: the copy of disk {disk.name} ended: "
                f"{error}; the guest runs on its overlay, which still needs the backup"
                " (docs/restore.md, Live restore)"
            )
        # len grows with guest writes still to copy: report the copied share of the disk.
        if job.get("ready"):
            disk.streamed = disk.virtual_size
        else:
            ready = False
            length = max(1, int(job.get("len", 0)))
            disk.streamed = min(disk.virtual_size, disk.virtual_size * int(job["offset"]) // length)
        if progress is not None:
            progress(f"copy {disk.name}", base + disk.streamed, total)
        base += disk.virtual_size
    return ready


def _recover(session: QmpSession, domain: str) -> None:
    """With the server up: resume mirrors and a guest that paused on an I/O error."""
    try:
        for job in session.block_jobs():
            if job.get("paused") and job.get("io-status") == "failed":
                log.info("live restore of %s: resuming copy job %s", domain, job["device"])
                session.execute("block-job-resume", {"device": job["device"]})
        status = session.execute("query-status")
        if status.get("status") == "io-error":
            log.info("live restore of %s: the guest paused on an I/O error: resuming it", domain)
            session.execute("cont")
    except QmpError as err:
        log.warning("live restore of %s: resuming after an I/O error: %s", domain, err)


def _switch(session: QmpSession, result: LiveRestoreResult) -> None:
    """Every mirror in sync: move the guest onto the targets, with its checkpoint bitmaps.

    The guest is stopped for the switch, so no write falls between the bitmap of the
    overlay and that of the target; it runs again a few milliseconds later.
    """
    domain = result.domain
    was_running = session.query_status() == "running"
    session.execute("stop")
    try:
        for disk in result.disks:
            session.execute("block-job-complete", {"device": _job_id(disk.name)})
        deadline = time.monotonic() + 60
        pending = {_job_id(d.name) for d in result.disks}
        while pending:
            for job in session.execute("query-jobs"):
                if job["id"] in pending and job["status"] == "concluded":
                    session.execute("job-dismiss", {"id": job["id"]})
                    pending.discard(job["id"])
                    if job.get("error"):
                        raise RestoreError(
                            f"live restore of {domain!r}: switching to the copied image"
                            f" failed: {job['error']}"
                        )
            if pending and time.monotonic() > deadline:
                raise RestoreError(f"live restore of {domain!r}: the switch did not finish")
            time.sleep(0.02)
        for disk in result.disks:
            target = _target_node(disk.name)
            source = _format_node(session, domain, disk.name, overlay_path(disk.path))
            if result.checkpoint is not None:
                session.bitmap_add(
                    target, result.checkpoint, persistent=True, granularity=_BITMAP_GRANULARITY
                )
                session.execute(
                    "block-dirty-bitmap-merge",
                    {
                        "node": target,
                        "target": result.checkpoint,
                        "bitmaps": [{"node": source, "name": result.checkpoint}],
                    },
                )
            # The overlay (and with it the NBD backing) is closed: the backup is not needed.
            file_node = _file_child(session, source)
            session.blockdev_del(source)
            if file_node:
                session.blockdev_del(file_node)
    finally:
        if was_running:
            session.execute("cont")
    for disk in result.disks:
        node = _target_node(disk.name)
        backing = next(n.backing_file for n in session.named_block_nodes() if n.node_name == node)
        if backing:
            raise RestoreError(
                f"live restore of {domain!r}: disk {disk.name} has a backing ({backing})"
                " after the switch"
            )


def _file_child(session: QmpSession, node: str) -> str | None:
    """The protocol node under format node ``node``, when it was created on its own."""
    for n in session.execute("query-named-block-nodes", {"flat": True}):
        if n["node-name"] == node:
            children = n.get("children", [])
            for child in children:
                if child.get("child") == "file":
                    name = str(child.get("node-name", ""))
                    return None if name.startswith("#") else name
    return None


def _settle(result: LiveRestoreResult) -> None:
    """The guest runs on the targets: they take the final names, the overlays go."""
    for disk in result.disks:
        os.replace(partial_path(disk.path), disk.path)
        overlay_path(disk.path).unlink(missing_ok=True)
    for directory in {d.path.parent for d in result.disks}:
        fsync_dir(directory)
