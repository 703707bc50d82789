"""One restore job: a backup's disks written back over NBD, verified, as files or into a domain.

Two targets, one data path: repository reader (bounded parallel prefetch) →
``NbdDiskWriter.write_and_verify`` (windows written, flushed, read back and checked
against the index while the next ones are written) → final flush. Every disk is written
under a temporary name; the final names only ever receive verified images:

    files     qemu-img create <disk>.qcow2.partial → qemu-nbd on a 0600 unix socket
              → write/verify → qemu-nbd exits → checkpoint bitmap (qemu-img bitmap)
              → commit
    incoming  qemu-img create <disk>.qcow2.partial → QEMU from launch.argv (private QMP
              socket) + ``-S -incoming defer`` → nbd-server-start + block-export-add
              {writable} per disk → write/verify → checkpoint bitmaps
              (block-dirty-bitmap-add) → block-export-del, nbd-server-stop → quit → commit
              → the domain's QEMU from launch.argv on the final names: normally (--boot),
              or paused in incoming mode with its disks activated, for its manager
    commit    old images (--force) → <disk>.qcow2.pre-restore; partials → final names;
              fsync; the old images deleted

Choosing the backup is worker/restore_select.py; the data path of one disk is
worker/restore_data.py; this module is the job: targets, the two modes, the commit.

What a restore sets up is saved in a journal before it is created
(worker/restore_cleanup.py); a failing restore undoes it from there, and so does the
next restore (or the worker's reaper) when the restore died: no half-written image is
ever left under a final name, and the old images come back unless the commit finished.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from vmvault.storage.progress import Progress
from vmvault.storage.repository import Manifest, Repository
from vmvault.worker import qemu_img, qemu_nbd
from vmvault.worker.cleanup import qemu_id
from vmvault.worker.config import DomainConfig, FleetConfig, LaunchConfig
from vmvault.worker.errors import RestoreError
from vmvault.worker.launch import (
    LaunchError,
    QemuProcess,
    connect_qmp,
    ensure_qmp_free,
    render_argv,
    start_qemu,
)
from vmvault.worker.locks import domain_lock
from vmvault.worker.memory import chunk_friendly_malloc
from vmvault.worker.qmp import QmpSession
from vmvault.worker.restore_cleanup import (
    COMMITTED,
    COMMITTING,
    RestoreCleanupError,
    RestoreJournal,
    fsync_dir,
    make_private_dir,
    remove_leftovers_locked,
    undo,
)
from vmvault.worker.restore_data import (
    DiskProgress,
    RestoredDisk,
    RestoreReadError,
    restore_disk,
)
from vmvault.worker.restore_select import (
    open_repo,
    restore_checkpoint_name,
    select_backup,
    select_disks,
)
from vmvault.worker.signals import critical, finishing

log = logging.getLogger(__name__)

_QEMU_QUIT_TIMEOUT = 30.0
# Granularity of the post-restore checkpoint bitmap, as QEMU picks for qcow2 (cluster size).
_BITMAP_GRANULARITY = 64 * 1024

__all__ = [
    "RestoreError",
    "RestoreReadError",
    "RestoreResult",
    "RestoreTargetExistsError",
    "RestoredDisk",
    "run_restore",
    "select_backup",
]


class RestoreTargetExistsError(RestoreError):
    """A target image exists (without ``force``) or is in use by a QEMU. Not retryable as is."""


PARTIAL_SUFFIX = ".partial"
ASIDE_SUFFIX = ".pre-restore"


@dataclass
class RestoreResult:
    """What a restore did; ``to_json`` is the CLI's ``--json`` document."""

    backup_id: str
    domain: str
    mode: str  # "files" or "incoming"
    disks: list[RestoredDisk]
    duration_s: float
    checkpoint: str | None = None
    qmp: Path | None = None
    qemu_pid: int | None = None
    booted: bool = False
    qemu_log: Path | None = None
    qemu: QemuProcess | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "backup_id": self.backup_id,
            "domain": self.domain,
            "mode": self.mode,
            "disks": [d.to_json() for d in self.disks],
            "bytes_written": sum(d.bytes_written for d in self.disks),
            "duration_s": round(self.duration_s, 3),
            "checkpoint": self.checkpoint,
        }
        if self.mode == "libvirt":
            doc["state"] = "running" if self.booted else "shut-off"
        if self.mode == "incoming":
            doc["qmp"] = str(self.qmp)
            doc["qemu_pid"] = self.qemu_pid
            doc["state"] = "running" if self.booted else "paused-incoming"
            doc["qemu_log"] = str(self.qemu_log)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RestoreResult:
        """The result ``to_json`` gave (a queued restore's result, as the CLI receives it).

        Without the QEMU handle: that process runs on the worker's host."""
        incoming = doc["mode"] == "incoming"
        return cls(
            backup_id=doc["backup_id"],
            domain=doc["domain"],
            mode=doc["mode"],
            disks=[RestoredDisk.from_json(d) for d in doc["disks"]],
            duration_s=doc["duration_s"],
            checkpoint=doc["checkpoint"],
            qmp=Path(doc["qmp"]) if incoming else None,
            qemu_pid=doc.get("qemu_pid"),
            booted=doc.get("state") == "running",
            qemu_log=Path(doc["qemu_log"]) if incoming else None,
        )


def partial_path(final: Path) -> Path:
    """The temporary name a disk is written under until it is verified."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def aside_path(final: Path) -> Path:
    """Where an image replaced by ``--force`` waits until the restore has committed."""
    return final.with_name(final.name + ASIDE_SUFFIX)


def check_target_dir(path: Path) -> None:
    """Refuse, before anything is created, a directory the restore cannot create or write.

    ``path`` need not exist: then its nearest existing ancestor must let us create it.
    """
    probe = path
    reason = None
    while reason is None:
        try:
            info = probe.stat()
            break
        except FileNotFoundError:
            probe = probe.parent
        except NotADirectoryError:
            reason = "a part of the path is not a directory"
        except PermissionError:
            reason = "permission denied (a directory on the way cannot be entered)"
        except OSError as err:
            reason = err.strerror.lower() if err.strerror else str(err)
    if reason is None:
        where = "" if probe == path else f" ({probe})"
        effective = os.access in os.supports_effective_ids
        if not stat.S_ISDIR(info.st_mode):
            reason = f"not a directory{where}"
        elif os.statvfs(probe).f_flag & os.ST_RDONLY:
            reason = f"read-only file system{where}"
        elif not os.access(probe, os.X_OK, effective_ids=effective):
            reason = f"permission denied (cannot enter{where or ' it'})"
        elif not os.access(probe, os.W_OK, effective_ids=effective):
            reason = f"no write permission{where}"
        else:
            return
    raise RestoreError(
        f"cannot restore into {path}: {reason}; choose another directory (--to) or fix its"
        " permissions"
    )


def _check_targets(paths: list[Path], force: bool) -> None:
    for path in paths:
        partial = partial_path(path)
        # Our own dead restore's partials are gone by now (remove_leftovers_locked): this
        # one is somebody else's, perhaps data being copied in.
        if partial.exists() and not force:
            raise RestoreTargetExistsError(
                f"{partial} exists and no earlier restore of this domain left it: move it"
                " away or delete it, or pass --force to replace it"
            )
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise RestoreTargetExistsError(
            f"{existing[0]} already exists: restore to another directory (--to) or pass --force"
            " to replace it"
        )
    for path in existing:
        # Even --force must not replace the disk of a running VM: QEMU holds an image lock.
        if qemu_img.is_locked(path):
            raise RestoreTargetExistsError(
                f"{path} is in use (a QEMU holds its image lock): stop that VM first or"
                " restore to another directory (--to)"
            )
        old = aside_path(path)
        if old.exists():
            raise RestoreTargetExistsError(
                f"{old} exists (left by an interrupted restore): move it away or"
                f" delete it, then restore again"
            )


def _make_target_dir(path: Path) -> None:
    """Create ``path`` and missing parents 0700 (restored disks are private data).

    A directory that exists keeps its mode.
    """
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    try:
        for directory in reversed(missing):
            make_private_dir(directory)
    except OSError as err:
        raise RestoreError(f"cannot create target directory {path}: {err.strerror or err}") from err


# -- images (qemu-img and qemu-nbd live in worker/qemu_img.py, worker/qemu_nbd.py) ------


def create_image(path: Path, size: int) -> None:
    """A fresh, empty (all-zero, unallocated) qcow2 image of ``size`` bytes, mode 0600."""
    path.unlink(missing_ok=True)
    try:
        # lazy_refcounts=off: refcounts written eagerly, no repair needed after a crash.
        qemu_img.create(path, size, private=True, options="lazy_refcounts=off")
    except qemu_img.QemuImgError as err:
        raise RestoreError(str(err)) from err


def add_bitmap_offline(path: Path, bitmap: str) -> None:
    """A persistent, enabled dirty bitmap in a qcow2 that no process has open."""
    try:
        qemu_img.add_bitmap(path, bitmap, _BITMAP_GRANULARITY)
    except qemu_img.QemuImgError as err:
        raise RestoreError(str(err)) from err


def durable(path: Path) -> None:
    """``fsync`` a file and its directory: what was written survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- the job ---------------------------------------------------------------------------------


def run_restore(
    config: FleetConfig,
    domain: str,
    backup_id: str | None = None,
    at: datetime | None = None,
    to_dir: Path | None = None,
    incoming: bool = False,
    boot: bool = False,
    force: bool = False,
    disks: list[str] | None = None,
    progress: Progress | None = None,
    *,
    qmp: Path | None = None,
    launch: LaunchConfig | None = None,
) -> RestoreResult:
    """Restore one backup of ``domain`` to image files (``to_dir``) or into the domain.

    Files: ``to_dir/<disk>.qcow2`` for every disk (or ``disks``). Incoming: images in
    ``to_dir`` (default ``launch.image_dir``, else ``<state_dir>/images/<domain>``), then the
    domain's QEMU started from its ``launch`` description on them, left paused in incoming
    mode (``boot=False``) or started normally (``boot=True``). Either way the restored
    images carry a checkpoint bitmap tied to the backup, so the next backup is incremental.
    Images are created 0600, directories the restore creates 0700.

    ``qmp`` and ``launch`` override the domain's QMP socket and launch description for an
    incoming restore: a clone started next to the still-running domain (``vmvault demo``).
    """
    started = time.monotonic()
    domain_cfg = config.domain(domain)
    overrides = {k: v for k, v in (("qmp", qmp), ("launch", launch)) if v is not None}
    if overrides:
        domain_cfg = domain_cfg.model_copy(update=overrides)
    if boot and not incoming:
        raise RestoreError("--boot applies to --incoming restores only")
    if not incoming and to_dir is None:
        raise RestoreError("say where to restore: --to DIR (image files) or --incoming (domain)")
    if to_dir is not None:
        # QEMU's node file names are compared with these paths: make them absolute.
        to_dir = to_dir.absolute()
    if incoming and domain_cfg.launch is None and domain_cfg.libvirt is None:
        raise RestoreError(
            f"domain {domain!r} has no launch description: add domains.{domain}.launch.argv"
            " to the config (see docs/restore.md) to restore into the domain"
        )
    with chunk_friendly_malloc(), open_repo(config) as repo:
        return _run(config, domain, domain_cfg, repo, backup_id, at, to_dir, incoming, boot,
                    force, disks, progress, started)  # fmt: skip


def _run(
    config: FleetConfig,
    domain: str,
    domain_cfg: DomainConfig,
    repo: Repository,
    backup_id: str | None,
    at: datetime | None,
    to_dir: Path | None,
    incoming: bool,
    boot: bool,
    force: bool,
    disks: list[str] | None,
    progress: Progress | None,
    started: float,
) -> RestoreResult:
    manifest = select_backup(repo, domain, backup_id, at)
    chosen = select_disks(manifest, disks)
    if incoming:
        target_dir = to_dir or config.incoming_image_dir(domain)
    else:
        assert to_dir is not None
        target_dir = to_dir
    paths = {d.name: target_dir / f"{d.name}.qcow2" for d in chosen}
    checkpoint = restore_checkpoint_name(manifest)  # warns when there is none
    meter = DiskProgress(progress, sum(d.virtual_size for d in chosen))
    with domain_lock(config.state_dir, domain, job="restore"):
        # A restore of this domain that died (SIGKILL, crash) left a journal: undo it first.
        # Holding the lock, we know it is dead.
        remove_leftovers_locked(config.state_dir, domain)
        if incoming and domain_cfg.libvirt is not None:
            return _restore_libvirt(
                config, domain, domain_cfg, repo, manifest, chosen, checkpoint, boot, meter,
                started,
            )  # fmt: skip
        if incoming:
            # Before any file is touched: a running domain is never restored into.
            ensure_qmp_free(domain, domain_cfg.qmp_socket(domain))
        # Checked before anything is created: a refused restore leaves nothing behind.
        check_target_dir(target_dir)
        _check_targets(list(paths.values()), force)
        _make_target_dir(target_dir)
        journal = RestoreJournal(config.state_dir, domain, "incoming" if incoming else "files")
        try:
            if incoming:
                result = _restore_incoming(
                    config, domain_cfg, repo, manifest, chosen, paths, checkpoint, boot, meter,
                    journal,
                )  # fmt: skip
            else:
                result = _restore_files(repo, manifest, chosen, paths, checkpoint, meter, journal)
        except OSError as err:
            # The journal, a rename, a socket directory: a file system refusing (ENOSPC,
            # EACCES, EROFS) is a failed restore with a message, not a traceback.
            raise RestoreError(
                f"restore of domain {domain!r} (backup {manifest.backup_id}) failed: {err}"
            ) from err
    result.duration_s = time.monotonic() - started
    return result


def _restore_libvirt(
    config: FleetConfig,
    domain: str,
    domain_cfg: DomainConfig,
    repo: Repository,
    manifest: Manifest,
    chosen: list[Any],
    checkpoint: str | None,
    boot: bool,
    meter: DiskProgress,
    started: float,
) -> RestoreResult:
    """Into a shut-off libvirt domain: fresh images at its XML's paths (the old ones aside
    until all are verified), its checkpoint metadata redefined (worker/libvirt_restore.py)."""
    # Imported here: python3-libvirt is needed on hosts with libvirt domains only.
    from vmvault.worker.libvirt_domain import open_domain
    from vmvault.worker.libvirt_restore import image_paths, reset_checkpoints

    assert domain_cfg.libvirt is not None
    names = [d.name for d in chosen]
    with open_domain(domain, domain_cfg.libvirt.uri, domain_cfg.libvirt_name(domain)) as lv:
        paths = image_paths(lv, names)
        # Replacing the domain's images is the point: force, but never a locked image.
        _check_targets(list(paths.values()), force=True)
        journal = RestoreJournal(config.state_dir, domain, "files")
        try:
            result = _restore_files(repo, manifest, chosen, paths, checkpoint, meter, journal)
        except OSError as err:
            raise RestoreError(
                f"restore of domain {domain!r} (backup {manifest.backup_id}) failed: {err}"
            ) from err
        reset_checkpoints(lv, checkpoint, names)
        if boot:
            lv.start()
    result.mode = "libvirt"
    result.booted = boot
    result.duration_s = time.monotonic() - started
    return result


def _fail(journal: RestoreJournal) -> None:
    """After a failure: undo what the journal names. The job's own error is what is raised.

    SIGTERM and SIGINT wait until the undo is done.
    """
    done: list[str] = []
    try:
        with critical():
            undo(journal, done)
    except RestoreCleanupError as err:
        log.warning("restore teardown: %s (the next restore of the domain tries again)", err)
    except BaseException as err:  # e.g. a second interruption: the next restore finishes it
        log.warning("restore teardown interrupted: %r; the next restore of the domain ends it", err)
    if done:
        log.debug("restore teardown: %s", "; ".join(done))


def _new_partial(journal: RestoreJournal, name: str, final: Path, size: int) -> Path:
    partial = partial_path(final)
    journal.add_disk(name, final, partial)
    create_image(partial, size)
    return partial


def _commit(journal: RestoreJournal) -> None:
    """Give the verified partial images their final names; old images only go once all have.

    The journal says ``committing`` before the first rename, ``committed`` after the last:
    a restore that dies in between gets the old images back (worker/restore_cleanup.py).
    """
    for disk in journal.disks:
        if Path(disk.final).exists():
            disk.aside = str(aside_path(Path(disk.final)))
    journal.set_phase(COMMITTING)
    for disk in journal.disks:
        if disk.aside is not None:
            os.replace(disk.final, disk.aside)
    for disk in journal.disks:
        os.replace(disk.partial, disk.final)
    for directory in {Path(d.final).parent for d in journal.disks}:
        fsync_dir(directory)  # the renames themselves survive a power loss
    journal.set_phase(COMMITTED)
    for disk in journal.disks:
        if disk.aside is not None:
            try:
                os.unlink(disk.aside)
            except OSError as err:  # only costs space; the restore itself is done
                log.warning("restore: cannot remove the replaced image %s: %s", disk.aside, err)


def _finish(journal: RestoreJournal) -> None:
    """The restore is done: its socket directories and journal go."""
    for sockdir in journal.socket_dirs:
        shutil.rmtree(sockdir, ignore_errors=True)
    journal.remove()


def _restore_files(
    repo: Repository,
    manifest: Manifest,
    chosen: list[Any],
    paths: dict[str, Path],
    checkpoint: str | None,
    meter: DiskProgress,
    journal: RestoreJournal,
) -> RestoreResult:
    """Each disk into ``<disk>.qcow2.partial`` via qemu-nbd; renamed only once all are verified."""
    restored: list[RestoredDisk] = []
    try:
        sockdir = journal.new_socket_dir()
        for index, disk in enumerate(chosen):
            final = paths[disk.name]
            partial = _new_partial(journal, disk.name, final, disk.virtual_size)
            socket = sockdir / f"d{index}.nbd"
            record = functools.partial(journal.add_process, "qemu-nbd")
            with qemu_nbd.serve(partial, socket, disk.name, on_start=record):
                done = restore_disk(repo, manifest, disk, socket, disk.name, meter)
            socket.unlink(missing_ok=True)
            # The post-restore checkpoint: the image now equals the backup exactly.
            if checkpoint is not None:
                add_bitmap_offline(partial, checkpoint)
            # NBD flushes made the data stable; this covers the bitmap qemu-img just added.
            durable(partial)
            done.path = final
            restored.append(done)
        # Once committed, the restore completes: a SIGTERM now would have nothing to undo.
        with finishing():
            _commit(journal)
            _finish(journal)
    except BaseException:
        _fail(journal)
        raise
    return RestoreResult(
        backup_id=manifest.backup_id,
        domain=manifest.domain,
        mode="files",
        disks=restored,
        duration_s=0.0,
        checkpoint=checkpoint,
    )


def _format_node(session: QmpSession, domain: str, disk: str, path: Path) -> str:
    """The node name of the format (qcow2) node QEMU opened ``path`` with."""
    nodes = [n for n in session.named_block_nodes() if n.file == str(path)]
    for node in nodes:
        if node.driver == "qcow2":
            return node.node_name
    raise RestoreError(
        f"domain {domain!r}: QEMU has no qcow2 node for disk {disk} ({path}): make"
        f" launch.argv open {{disk:{disk}}} with driver=qcow2"
    )


def _restore_incoming(
    config: FleetConfig,
    domain_cfg: DomainConfig,
    repo: Repository,
    manifest: Manifest,
    chosen: list[Any],
    paths: dict[str, Path],
    checkpoint: str | None,
    boot: bool,
    meter: DiskProgress,
    journal: RestoreJournal,
) -> RestoreResult:
    """Write the partial images in a paused QEMU of their own, commit, start the domain."""
    assert domain_cfg.launch is not None
    domain = journal.domain
    log_path = config.state_dir / "logs" / f"{domain}.qemu.log"
    restored: list[RestoredDisk] = []
    writer: QemuProcess | None = None
    session: QmpSession | None = None
    try:
        sockdir = journal.new_socket_dir()
        partials = {
            d.name: _new_partial(journal, d.name, paths[d.name], d.virtual_size) for d in chosen
        }
        # The writing QEMU answers on a private QMP socket: the domain's socket stays free,
        # so nobody mistakes it (or its orphan, should the restore die) for the domain.
        writer_qmp = sockdir / "qmp"
        argv = render_argv(domain, domain_cfg.launch, writer_qmp, partials, incoming=True)
        record = functools.partial(journal.add_process, "qemu")
        writer = start_qemu(domain, argv, writer_qmp, log_path, on_start=record)
        session = connect_qmp(writer)
        status = session.query_status()
        if status != "inmigrate":
            raise RestoreError(
                f"domain {domain!r}: QEMU started in state {status!r}, not 'inmigrate'"
            )
        nodes = {d.name: _format_node(session, domain, d.name, partials[d.name]) for d in chosen}
        socket = sockdir / "nbd"
        session.nbd_server_start(socket)
        os.chmod(socket, 0o600)
        for disk in chosen:
            export_id = qemu_id("r", disk.name)
            # A writable export activates the node that -incoming left inactive (QEMU 7.2+).
            session.block_export_add(export_id, nodes[disk.name], disk.name, [], writable=True)
            done = restore_disk(repo, manifest, disk, socket, disk.name, meter)
            session.block_export_del(export_id)
            done.path = paths[disk.name]
            restored.append(done)
        # Checkpoint bitmaps before any guest write: the next backup diffs from this backup.
        for disk in chosen if checkpoint is not None else []:
            session.bitmap_add(
                nodes[disk.name], str(checkpoint), persistent=True, granularity=_BITMAP_GRANULARITY
            )
        session.nbd_server_stop()
        # ``quit`` closes the images cleanly: persistent bitmaps are stored in the qcow2.
        session.execute("quit")
        session.close()
        session = None
        if writer.wait(_QEMU_QUIT_TIMEOUT) is None:
            raise RestoreError(f"domain {domain!r}: the restore's QEMU did not quit after writing")
        for partial in partials.values():
            durable(partial)
    except BaseException:
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()
        if writer is not None:
            writer.kill()
        _fail(journal)
        raise
    # Once committed, the restore completes (a few seconds): a SIGTERM now would have
    # nothing to undo. The final names hold the restored, verified images: they stay.
    with finishing():
        try:
            _commit(journal)
        except BaseException:
            _fail(journal)
            raise
        try:
            qemu = _start_domain(domain, domain_cfg, paths, log_path, boot, Path(sockdir))
        except BaseException as err:
            _fail(journal)
            images = ", ".join(str(p) for p in paths.values())
            what = "starting the domain normally" if boot else "starting the domain paused"
            raise LaunchError(
                f"backup {manifest.backup_id} was restored and verified into {images}, but"
                f" {what} failed: {err}"
            ) from err
        _finish(journal)
    return RestoreResult(
        backup_id=manifest.backup_id,
        domain=domain,
        mode="incoming",
        disks=restored,
        duration_s=0.0,
        checkpoint=checkpoint,
        qmp=domain_cfg.qmp_socket(domain),
        qemu_pid=qemu.pid,
        booted=boot,
        qemu_log=log_path,
        qemu=qemu,
    )


def _start_domain(
    domain: str,
    domain_cfg: DomainConfig,
    paths: dict[str, Path],
    log_path: Path,
    boot: bool,
    sockdir: Path,
) -> QemuProcess:
    """The domain's QEMU on the restored images: running, or paused in incoming mode.

    Paused, it is what a manager expects after a restore into an incoming-mode QEMU: QMP
    on the domain's socket, state ``inmigrate``, the disks active (image locks held,
    checkpoint bitmaps loaded). ``-incoming`` opens them inactive; a writable NBD export,
    added and removed at once on a private socket, activates each, as it does for the
    restore's writes (QEMU 7.2+; 10.0 has ``blockdev-set-active``).
    """
    assert domain_cfg.launch is not None
    qmp_path = domain_cfg.qmp_socket(domain)
    argv = render_argv(domain, domain_cfg.launch, qmp_path, paths, incoming=not boot)
    qemu = start_qemu(domain, argv, qmp_path, log_path)
    if boot:
        return qemu
    try:
        session = connect_qmp(qemu)
        try:
            socket = sockdir / "act"
            session.nbd_server_start(socket)
            os.chmod(socket, 0o600)
            try:
                for name, path in paths.items():
                    node = _format_node(session, domain, name, path)
                    export_id = qemu_id("a", name)
                    session.block_export_add(export_id, node, name, [], writable=True)
                    session.block_export_del(export_id)
            finally:
                session.nbd_server_stop()
        finally:
            session.close()
    except BaseException:
        qemu.kill()
        raise
    return qemu
