"""Live restore (``vmvault restore DOMAIN --live``): the guest runs at once, its disks fill in behind it.

    nbdkit (worker/serve.py) ──NBD, read-only──▶ backing of <disk>.qcow2 (fresh overlay)
         ▲ shared lease                              │  QEMU from launch.argv, werror/rerror=stop
         │                                            │  block-stream {speed, on-error: stop}
    repository                                        ▼
                                           <disk>.qcow2: backup + guest writes, no backing

Steps: choose the backup, take the repository's shared lease, start nbdkit on a unix
socket of the domain's own (``<state_dir>/run/vmvl-<domain>/nbd``), create each overlay
under ``<disk>.qcow2.partial`` with the export as its backing (``json:{nbd}``), rename it
to its final name (``--force`` sets an old image aside, as restore does), start the
domain's QEMU paused (``-S``) from its launch description with ``werror=stop,rerror=stop``
added to its drives, add the checkpoint bitmap (before any guest write: the next backup
is the backup's incremental), start ``block-stream`` per disk, ``cont``. Then wait: each
stream job copies the blocks the guest has not written yet and, when done, drops the
backing from the image (QEMU rewrites the qcow2 header). Once every image stands alone
the server stops and the lease goes.

Guest I/O on a block not yet copied is read from the export. If nbdkit dies, such a read
fails; ``rerror=stop`` pauses the guest instead of handing it an error, and the stream
job (``on-error: stop``) pauses too. This process restarts nbdkit on the same socket
(QEMU's NBD client reconnects on its next request), resumes the paused jobs and ``cont``s
a guest paused on an I/O error.

Abandoned (this process killed or interrupted), the guest keeps running: its writes are
in the overlays, which still need the backup as backing, at the socket path in their
header. ``vmvault serve DOMAIN --backup ID --socket PATH`` brings that back; docs/restore.md
says how to finish or discard.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
    _check_targets,
    _fail,
    _format_node,
    _make_target_dir,
    aside_path,
    check_target_dir,
    partial_path,
)
from vmvault.worker.restore_cleanup import (
    COMMITTED,
    COMMITTING,
    RestoreJournal,
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
    stop_nbdkit,
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
            "qmp": str(self.qmp),
            "qemu_pid": self.qemu_pid,
            "qemu_log": str(self.qemu_log),
            "state": "running",
        }


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
        if previous in ("-device", "-drive") and (previous == "-drive" or "drive=" in arg):
            if "werror=" not in arg and "rerror=" not in arg:
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
    """Start ``domain`` on overlays of a backup, stream the backup in, return when done.

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
        checkpoint = restore_checkpoint_name(manifest)
        if checkpoint is None:
            log.warning(
                "backup %s of %s records no checkpoint: the next backup after this restore"
                " is full",
                manifest.backup_id,
                domain,
            )
        stack.enter_context(domain_lock(config.state_dir, domain, job="restore"))
        remove_leftovers_locked(config.state_dir, domain)
        ensure_qmp_free(domain, domain_cfg.qmp)
        check_target_dir(target_dir)
        _check_targets(list(paths.values()), force)
        socket = live_socket(config.state_dir, domain)
        make_private_dir(socket.parent.parent) if socket.parent.parent != Path("/tmp") else None
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
            qmp=domain_cfg.qmp,
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
            _stream(session, result, server, progress, restart_delay)
        finally:
            session.close()
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
        self._proc: Any = None
        self.restarts = 0

    def start(self) -> None:
        self._proc, _tail = start_nbdkit(self._stack, *self._args)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        return int(self._proc.pid) if self._proc is not None else 0

    def restart(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        with critical():
            self._stack.close()
            self._proc = None


def _start(
    config: FleetConfig, domain_cfg: DomainConfig, result: LiveRestoreResult, listen: Listen
) -> tuple[QemuProcess, QmpSession]:
    """Overlays under temporary names, renamed, QEMU paused on them, bitmaps, streams, cont.

    Until the guest runs, a failure undoes everything (old images come back under their
    names, from the journal, as for a restore); once it runs, the images are the domain's.
    """
    assert domain_cfg.launch is not None and listen.socket is not None
    domain = result.domain
    journal = RestoreJournal(config.state_dir, domain, "live")
    qemu: QemuProcess | None = None
    session: QmpSession | None = None
    try:
        for disk in result.disks:
            partial = partial_path(disk.path)
            journal.add_disk(disk.name, disk.path, partial)
            _create_overlay(partial, disk.virtual_size, backing_spec(listen, disk.name))
        for jdisk in journal.disks:
            if Path(jdisk.final).exists():
                jdisk.aside = str(aside_path(Path(jdisk.final)))
        # COMMITTING until the guest runs: a failure (or our death) before that puts old
        # images back and removes the overlays (worker/restore_cleanup.py undo).
        journal.set_phase(COMMITTING)
        for jdisk in journal.disks:
            if jdisk.aside is not None:
                os.replace(jdisk.final, jdisk.aside)
            os.replace(jdisk.partial, jdisk.final)
        for directory in {d.path.parent for d in result.disks}:
            _fsync_dir(directory)
        paths = {d.name: d.path for d in result.disks}
        argv = render_argv(domain, domain_cfg.launch, domain_cfg.qmp, paths, incoming=False)
        argv = [*stop_on_error(argv), "-S"]
        record: Callable[[int], None] = lambda pid: journal.add_process("qemu", pid)  # noqa: E731
        qemu = start_qemu(domain, argv, domain_cfg.qmp, result.qemu_log, on_start=record)
        session = connect_qmp(qemu)
        for disk in result.disks:
            node = _format_node(session, domain, disk.name, disk.path)
            if result.checkpoint is not None:
                # Before any guest write: the bitmap holds exactly what the guest changes.
                session.bitmap_add(
                    node, result.checkpoint, persistent=True, granularity=_BITMAP_GRANULARITY
                )
            _start_stream(session, disk.name, node, result.speed)
        # From here on the guest's writes live in these images: nothing may remove them.
        journal.processes = []
        journal.set_phase(COMMITTED)
        session.execute("cont")
    except BaseException:
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()
        if qemu is not None:
            qemu.kill()
        _fail(journal)
        raise
    for jdisk in journal.disks:
        if jdisk.aside is not None:
            try:
                os.unlink(jdisk.aside)
            except OSError as err:
                log.warning("live restore: cannot remove the replaced image %s: %s", jdisk.aside, err)
    journal.remove()
    result.qemu_pid = qemu.pid
    log.info("live restore of %s: guest running, qemu pid %d", domain, qemu.pid)
    return qemu, session


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _start_stream(session: QmpSession, disk: str, node: str, speed: int) -> None:
    """``block-stream`` of one disk's whole backing chain into its overlay."""
    args: dict[str, object] = {
        "job-id": qemu_id("ls", disk),
        "device": node,
        "on-error": "stop",
        # Kept once concluded: its error (or none) is read before it goes (job-dismiss).
        "auto-dismiss": False,
    }
    if speed:
        args["speed"] = speed
    session.execute("block-stream", args)


def _stream(
    session: QmpSession,
    result: LiveRestoreResult,
    server: _Server,
    progress: Progress | None,
    restart_delay: float,
) -> None:
    """Until every stream job has concluded: progress, and recovery from a dead server.

    QEMU 7.2's copy-on-read filter (which block-stream puts above the disk) turns a failed
    allocation query of the backing into a read that *succeeds without data*
    (block/copy-on-read.c: ``n == 0`` → ``break`` → ``return 0``): with the server gone,
    guest reads of blocks not copied yet would return garbage and the job would skip
    blocks. So a dead server is answered at once: the guest is stopped (QMP ``stop``) and
    the stream jobs cancelled (the overlays keep their backing; what was skipped stays
    unallocated). Once the server is back, new stream jobs copy whatever is still
    unallocated, and the guest continues.
    """
    jobs = {qemu_id("ls", d.name): d for d in result.disks}
    total = max(1, sum(d.virtual_size for d in result.disks))
    pending = set(jobs)
    died_at: float | None = None
    while pending:
        if died_at is None and not server.alive():
            died_at = time.monotonic()
            session.execute("stop")
            log.warning(
                "live restore of %s: the backup's server (nbdkit) exited: guest stopped,"
                " copy cancelled until it is back",
                result.domain,
            )
            for job_id in pending:
                _cancel(session, job_id)
        if died_at is not None and time.monotonic() - died_at >= restart_delay:
            try:
                server.restart()
            except ServeError as err:
                log.warning("live restore: restarting the server failed: %s", err)
                died_at = time.monotonic()
            else:
                result.server_restarts = server.restarts
                # QEMU's NBD client reconnects on its own schedule (a backoff of up to
                # 16 s): until it has, copy-on-read would hand out garbage again.
                _wait_reconnected(session, result, deadline=time.monotonic() + 60)
                died_at = None
                for job_id in pending:
                    disk = jobs[job_id]
                    node = _format_node(session, result.domain, disk.name, disk.path)
                    _start_stream(session, disk.name, node, result.speed)
                session.execute("cont")
                log.info(
                    "live restore of %s: server back (nbdkit pid %d), guest continues",
                    result.domain,
                    server.pid,
                )
        if died_at is None:
            _recover(session, result.domain)
            pending -= _poll_jobs(session, result, jobs, pending, progress, total)
        if pending:
            time.sleep(POLL_INTERVAL)
    for disk in result.disks:
        node = _format_node(session, result.domain, disk.name, disk.path)
        backing = next(n.backing_file for n in session.named_block_nodes() if n.node_name == node)
        if backing:
            raise RestoreError(
                f"live restore of {result.domain!r}: disk {disk.name} still has backing"
                f" {backing} after its stream job ended"
            )


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
                    f" restarted server ({node}): {said.strip()}; the guest stays stopped"
                )
            time.sleep(0.5)


def _poll_jobs(
    session: QmpSession,
    result: LiveRestoreResult,
    jobs: dict[str, LiveDisk],
    pending: set[str],
    progress: Progress | None,
    total: int,
) -> set[str]:
    """Progress of every disk; the jobs that have just ended (successfully)."""
    states = {j["device"]: j for j in session.block_jobs()}
    ended: set[str] = set()
    base = 0
    for job_id, disk in jobs.items():
        job = states.get(job_id)
        if job_id in pending and job is None:
            raise RestoreError(
                f"live restore of {result.domain!r}: the stream job of disk {disk.name}"
                " vanished (cancelled by someone?): the image still needs the backup"
            )
        if job_id in pending and job is not None:
            disk.streamed = int(job.get("offset", 0))
            if job.get("status") == "concluded":
                _conclude(session, result.domain, disk, job)
                disk.streamed = disk.virtual_size
                ended.add(job_id)
        if progress is not None:
            progress(f"stream {disk.name}", base + disk.streamed, total)
        base += disk.virtual_size
    return ended


def _cancel(session: QmpSession, job_id: str) -> None:
    """Cancel a stream job and dismiss it once concluded (the overlay keeps its backing)."""
    session.execute("block-job-cancel", {"device": job_id, "force": True})
    deadline = time.monotonic() + 10
    while True:
        states = {j["id"]: j["status"] for j in session.execute("query-jobs")}
        if states.get(job_id) == "concluded":
            session.execute("job-dismiss", {"id": job_id})
            return
        if job_id not in states or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def _recover(session: QmpSession, domain: str) -> None:
    """With the server up: resume stream jobs and a guest that paused on an I/O error."""
    try:
        for job in session.block_jobs():
            if job.get("paused") and job.get("io-status") == "failed":
                log.info("live restore of %s: resuming stream job %s", domain, job["device"])
                session.execute("block-job-resume", {"device": job["device"]})
        status = session.execute("query-status")
        if status.get("status") == "io-error":
            log.info("live restore of %s: the guest paused on an I/O error: resuming it", domain)
            session.execute("cont")
    except QmpError as err:
        log.warning("live restore of %s: resuming after an I/O error: %s", domain, err)


def _conclude(session: QmpSession, domain: str, disk: LiveDisk, job: dict[str, Any]) -> None:
    session.execute("job-dismiss", {"id": job["device"]})
    error = job.get("error")
    if error:
        raise RestoreError(
            f"live restore of {domain!r}: streaming disk {disk.name} failed: {error}; the"
            " guest runs on, its image still needs the backup (see docs/restore.md)"
        )
