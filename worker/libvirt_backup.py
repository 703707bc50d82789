"""One pull backup of a domain libvirt manages, through its checkpoint and backup API.

    lock → connect to libvirt → leftovers of a dead job (its backup job, scratch files)
      → plan (full / incremental, reason) from libvirt's checkpoints and the repository
      → ONE virDomainBackupBegin: new checkpoint + pull-mode backup, incremental from the
        checkpoint of the last committed backup, scratch files in <state_dir>/scratch,
        NBD server on <state_dir>/run/<domain>.nbd (0600, in a 0700 directory)
      → pull changed / allocated regions → repository (same path as QMP domains:
        worker/region_pull.py, chunks, index, manifest LAST)
      → end the job (virDomainAbortJob ends a pull backup) → trim older checkpoints

libvirt does the fleecing, the bitmaps and the export; vmvault never talks to the QEMU
(libvirt owns its monitor). Checkpoint names are ``vmvault-<checkpoint id>``, the id the
manifest records, so the chain maps onto libvirt's checkpoints one to one. A checkpoint
libvirt no longer has (deleted, domain redefined without its metadata) or whose bitmap
is broken (QEMU exited uncleanly: libvirt says "checkpoint inconsistent") gives a full
backup with the reason. A job killed with SIGKILL leaves libvirt's backup job running:
the next job on the domain recognises it by its NBD socket and ends it, which makes
libvirt delete the scratch files.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from vmvault.storage.errors import StorageError
from vmvault.storage.progress import Progress, no_progress
from vmvault.storage.region_writer import RegionDiskWriter
from vmvault.storage.repository import Repository
from vmvault.storage.verification import failed_checks
from vmvault.storage.writer import BackupWriter
from vmvault.worker import checkpoints as cp
from vmvault.worker import offline
from vmvault.worker.backup import (
    BackupError,
    BackupResult,
    DiskResult,
    DomainStateError,
    IncrementalUnavailableError,
    Plan,
    check_socket_dir,
    check_state_dir,
    disk_layout,
    plan_backup,
    repo_owner,
)
from vmvault.worker.cleanup import job_marker, nbd_socket_path, scratch_dir, write_marker
from vmvault.worker.config import DomainConfig, FleetConfig
from vmvault.worker.disks import DiskInfo
from vmvault.worker.errors import WorkerError
from vmvault.worker.libvirt_domain import (
    BACKUP_JOB,
    CheckpointInconsistentError,
    LibvirtDisk,
    LibvirtDomain,
    LibvirtError,
    open_domain,
)
from vmvault.worker.locks import domain_lock
from vmvault.worker.nbd import BASE_ALLOCATION, NbdError, dirty_context
from vmvault.worker.nbd_read import NbdReader
from vmvault.worker.region_pull import pull_regions
from vmvault.worker.routing import BackupMode
from vmvault.worker.signals import critical

log = logging.getLogger(__name__)

# Failures before the backup job starts change nothing: their own message is enough.
_BEFORE_BEGIN = ("locking the domain", "connecting to libvirt", "removing leftovers", "planning")


@dataclass(frozen=True)
class LibvirtChain:
    """The checkpoints libvirt knows for a domain, as planning sees them (``ChainView``)."""

    checkpoints: dict[str, set[str]]  # libvirt checkpoint name → disks with a bitmap

    def why_unusable(self, checkpoint_id: str, disk: str) -> str | None:
        name = checkpoint_name(checkpoint_id)
        if name not in self.checkpoints:
            return (
                f"libvirt has no checkpoint {name} (deleted, or the domain was redefined "
                "without its checkpoint metadata)"
            )
        if disk not in self.checkpoints[name]:
            return f"libvirt checkpoint {name} has no bitmap on disk {disk}"
        return None


def checkpoint_name(checkpoint_id: str) -> str:
    """The libvirt checkpoint (and bitmap) name of a manifest's checkpoint id: the name a
    QMP domain's first checkpoint bitmap has, so a restore's bitmap matches either way."""
    return cp.bitmap_name(checkpoint_id, None)


def run_libvirt_backup(
    config: FleetConfig,
    domain: str,
    mode: BackupMode,
    progress: Progress | None,
    dom_cfg: DomainConfig,
) -> BackupResult:
    """Back up libvirt domain ``domain`` (``domains.<name>.libvirt``) into the repository."""
    assert dom_cfg.libvirt is not None
    started = time.monotonic()
    step = "locking the domain"
    try:
        check_state_dir(config)
        with domain_lock(config.state_dir, domain, "backup"):
            step = "connecting to libvirt"
            name = dom_cfg.libvirt_name(domain)
            with (
                open_domain(domain, dom_cfg.libvirt.uri, name) as lv,
                config.repository.open() as repo,
            ):
                job = _LibvirtJob(config, domain, mode, progress or no_progress, lv, repo)
                try:
                    result = job.run(dom_cfg.disks)
                finally:
                    step = job.step
                result.duration_s = time.monotonic() - started
                return result
    except (WorkerError, StorageError) as err:
        if step in _BEFORE_BEGIN:
            raise
        kind = type(err) if isinstance(err, BackupError) else BackupError
        raise kind(f"backup of domain {domain!r} failed while {step}: {err}") from err


def remove_libvirt_leftovers(lv: LibvirtDomain, state_dir: Path) -> bool:
    """End the backup job a dead vmvault job left on the domain and remove its scratch
    files; True when there was something. Another job (a migration, a backup someone else
    started) is refused with :class:`DomainStateError`. Callers hold the domain's lock."""
    domain = lv.domain
    ours = nbd_socket_path(state_dir, domain)
    found = False
    operation = lv.job()
    if operation is not None:
        if operation == BACKUP_JOB and lv.backup_socket() == ours:
            log.warning("domain %s: ending the backup job a dead vmvault job left", domain)
            lv.abort_job()
            found = True
        else:
            raise DomainStateError(
                f"domain {domain!r}: libvirt reports a running {operation} job on it: "
                "back it up once that job has finished"
            )
    scratch = scratch_dir(state_dir, domain)
    if scratch.exists():
        found = found or any(scratch.iterdir())
        shutil.rmtree(scratch, ignore_errors=True)
    if ours.exists():
        ours.unlink(missing_ok=True)
        found = True
    job_marker(state_dir, domain).unlink(missing_ok=True)
    return found


class _LibvirtJob:
    """One backup of a running libvirt domain; ``step`` names where it is."""

    def __init__(
        self,
        config: FleetConfig,
        domain: str,
        mode: BackupMode,
        progress: Progress,
        lv: LibvirtDomain,
        repo: Repository,
    ) -> None:
        self.config, self.domain, self.mode = config, domain, mode
        self.progress, self.lv, self.repo = progress, lv, repo
        self.step = "connecting to libvirt"
        self.state_dir = config.state_dir
        self.socket = nbd_socket_path(self.state_dir, domain)

    def run(self, allow: list[str] | None) -> BackupResult:
        lv, domain = self.lv, self.domain
        check_socket_dir(self.state_dir, domain)
        if not lv.is_active():
            return self._run_shut_off(allow)
        self.step = "removing leftovers"
        leftovers = remove_libvirt_leftovers(lv, self.state_dir)

        self.step = "planning"
        disks = lv.disks(allow)
        infos = [
            DiskInfo(d.name, d.name, d.format, str(d.path), lv.disk_size(d.name), ()) for d in disks
        ]
        chain = LibvirtChain(lv.checkpoints())
        manifests = self.repo.list_manifests(domain)
        # A parent chain with a failed verification gives a full backup, as for QMP domains.
        failed = failed_checks(self.repo, domain)
        plan = plan_backup(
            domain, self.mode, infos, {d.name: chain for d in disks}, manifests, failed
        )
        new_id = cp.new_checkpoint_id(owner=repo_owner(self.repo))

        self.step = "starting libvirt's backup job"
        marker = job_marker(self.state_dir, domain)
        write_marker(marker)  # a SIGKILL from here on leaves libvirt's job: the marker says so
        plan, bitmaps = self._begin(disks, plan, new_id)
        log.info("domain %s: %s backup (%s), checkpoint %s", domain, plan.kind, plan.reason,
                 checkpoint_name(new_id))  # fmt: skip
        writer = self.repo.open_backup(domain, plan.parent, plan.kind, plan.reason, new_id)
        try:
            self.step = "pulling data into the repository"
            results = self._pull(writer, infos, bitmaps if plan.parent else {})
            self.step = "committing the manifest"
            total = sum(d.virtual_size for d in infos)
            self.progress("commit", total, total)
            manifest = writer.commit(
                layout=disk_layout(infos),
                extra={
                    "dirty_bytes": {r.name: r.dirty_bytes for r in results},
                    "state": "running",
                    "libvirt_checkpoint": checkpoint_name(new_id),
                    "consistency": "crash",
                    "consistency_reason": "libvirt domain: guest file systems not frozen",
                },
            )
        except BaseException:
            with critical():
                writer.abort()
                self._end()
            raise
        self.step = "ending libvirt's backup job"
        with critical():
            self._end()
        marker.unlink(missing_ok=True)
        self.step = "trimming old checkpoints"
        self._trim(new_id)
        return BackupResult(
            backup_id=manifest.backup_id,
            domain=domain,
            kind=plan.kind,
            reason=plan.reason,
            parent=plan.parent.backup_id if plan.parent else None,
            checkpoint=new_id,
            disks=results,
            duration_s=0.0,
            leftovers_removed=leftovers,
            consistency="crash",
            consistency_reason="libvirt domain: guest file systems not frozen",
        )

    def _run_shut_off(self, allow: list[str] | None) -> BackupResult:
        """A shut-off domain: its images (paths from the XML) read whole through
        qemu-storage-daemon, which holds their locks so the domain cannot start meanwhile.

        libvirt takes no checkpoint of a shut-off domain, and nothing has written since its
        newest one: the backup records that checkpoint (when libvirt still has it), so the
        next online backup diffs from it. Changes since it are a superset of changes since
        this backup, so that incremental stays exact; an unclean stop that broke its bitmap
        makes libvirt refuse it, and that backup is full with the reason.
        """
        domain, lv = self.domain, self.lv
        for stale in (scratch_dir(self.state_dir, domain), job_marker(self.state_dir, domain)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        self.step = "planning"
        disks = lv.disks(allow)
        chain = LibvirtChain(lv.checkpoints())
        manifests = self.repo.list_manifests(domain)
        kept = next(
            (
                m.checkpoint
                for m in reversed(manifests)
                if m.checkpoint is not None
                and all(chain.why_unusable(m.checkpoint, d.name) is None for d in disks)
            ),
            None,
        )
        if self.mode == "incremental":
            raise IncrementalUnavailableError(
                f"domain {domain!r} is shut off: its images are read whole (libvirt takes no "
                "checkpoint of a shut-off domain); run with --mode full or --mode auto"
            )
        reason = "domain shut off: images read whole (libvirt takes no checkpoint of it)"
        images = {d.name: d.path for d in disks}
        timeout = self.config.backup.io_timeout_seconds
        self.step = "opening the images"
        with offline.storage_daemon(domain, images, self.state_dir, timeout) as qsd:
            infos = offline.list_images(qsd, images)
            self.socket.unlink(missing_ok=True)
            qsd.nbd_server_start(self.socket)
            os.chmod(self.socket, 0o600)
            try:
                for disk in infos:
                    qsd.block_export_add(f"vmv-e-{disk.name}", disk.node, disk.name, [])
                writer = self.repo.open_backup(domain, None, "full", reason, kept)
                try:
                    self.step = "pulling data into the repository"
                    results = self._pull(writer, infos, {})
                    self.step = "committing the manifest"
                    manifest = writer.commit(
                        layout=disk_layout(infos),
                        extra={
                            "dirty_bytes": {r.name: r.dirty_bytes for r in results},
                            "state": "shut-off",
                            "consistency": "crash",
                            "consistency_reason": "domain shut off: its disks as the guest "
                            "left them (clean after a clean shutdown)",
                        },
                    )
                except BaseException:
                    writer.abort()
                    raise
            finally:
                self.socket.unlink(missing_ok=True)
        return BackupResult(
            backup_id=manifest.backup_id,
            domain=domain,
            kind="full",
            reason=reason,
            parent=None,
            checkpoint=kept or "",
            disks=results,
            duration_s=0.0,
            state="shut-off",
        )

    def _begin(
        self, disks: list[LibvirtDisk], plan: Plan, new_id: str
    ) -> tuple[Plan, dict[str, str]]:
        """virDomainBackupBegin; an incremental whose checkpoint libvirt finds broken
        becomes a full backup with libvirt's reason (``--mode incremental`` refuses)."""
        directory = scratch_dir(self.state_dir, self.domain)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        scratch = {d.name: directory / f"{d.name}.qcow2" for d in disks}
        self.socket.unlink(missing_ok=True)
        since = checkpoint_name(plan.since) if plan.since else None
        try:
            bitmaps = self.lv.begin_backup(
                disks, self.socket, scratch, since, checkpoint_name(new_id)
            )
        except CheckpointInconsistentError as err:
            assert plan.parent is not None
            reason = f"checkpoint of backup {plan.parent.backup_id} is unusable: {err}"
            if self.mode == "incremental":
                raise IncrementalUnavailableError(
                    f"domain {self.domain!r}: no incremental backup possible: {reason}; "
                    "run with --mode full or --mode auto"
                ) from err
            plan = Plan("full", reason, None, None)
            bitmaps = self.lv.begin_backup(
                disks, self.socket, scratch, None, checkpoint_name(new_id)
            )
        # libvirt's QEMU made the socket with its umask: only this user may read the disks.
        os.chmod(self.socket, 0o600)
        return plan, bitmaps

    def _end(self) -> None:
        """End libvirt's backup job (the checkpoint stays: its bitmap is valid)."""
        try:
            if self.lv.job() is not None and self.lv.backup_socket() == self.socket:
                self.lv.abort_job()
        except LibvirtError as err:
            log.warning("domain %s: ending libvirt's backup job: %s", self.domain, err)
        shutil.rmtree(scratch_dir(self.state_dir, self.domain), ignore_errors=True)
        self.socket.unlink(missing_ok=True)

    def _pull(
        self, writer: BackupWriter, disks: list[DiskInfo], bitmaps: dict[str, str]
    ) -> list[DiskResult]:
        total = sum(d.virtual_size for d in disks)
        done = 0
        results: list[DiskResult] = []
        for disk in disks:
            result = DiskResult(disk.name, disk.virtual_size)
            results.append(result)
            dw = writer.open_disk(disk.name, disk.virtual_size, disk.format)
            if not isinstance(dw, RegionDiskWriter):
                raise BackupError(f"{writer.repo.url}: backups are written in format 2 only")
            bitmap = bitmaps.get(disk.name)
            dirty = dirty_context(bitmap) if bitmap else None
            contexts = [BASE_ALLOCATION] + ([dirty] if dirty else [])

            def advance(nbytes: int, name: str = disk.name) -> None:
                nonlocal done
                done += nbytes
                self.progress(f"pull {name}", done, total)

            timeout = self.config.backup.io_timeout_seconds
            try:
                # libvirt names each disk's export after its target (``exportname``).
                with NbdReader(self.socket, disk.name, contexts, timeout) as reader:
                    if reader.size != disk.virtual_size:
                        raise BackupError(
                            f"disk {disk.name}: export has {reader.size} bytes, "
                            f"not {disk.virtual_size}"
                        )
                    pulled = pull_regions(reader, dw, dirty, advance)
            except NbdError as err:
                raise BackupError(
                    f"domain {self.domain!r} disk {disk.name}: reading libvirt's export "
                    f"failed: {err}"
                ) from err
            result.dirty_bytes = pulled.dirty_bytes
            result.bytes_read = pulled.bytes_read
            result.add_write_stats(dw.finish())
        return results

    def _trim(self, new_id: str) -> None:
        """Delete vmvault's checkpoints other than the new one, except recent ones another
        repository's backups of this domain took (``backup.foreign_checkpoint_days``)."""
        owner = repo_owner(self.repo)
        days = self.config.backup.foreign_checkpoint_days
        keep_since = datetime.now(UTC) - timedelta(days=days)
        keep = checkpoint_name(new_id)
        try:
            for name in sorted(self.lv.checkpoints()):
                if name == keep or not name.startswith(cp.PREFIX):
                    continue
                old_id = name.removeprefix(cp.PREFIX)
                theirs = cp.checkpoint_owner(old_id)
                taken = cp.checkpoint_time(old_id)
                if theirs not in (None, owner) and (taken is None or taken >= keep_since):
                    continue
                self.lv.delete_checkpoint(name)
        except LibvirtError as err:
            # The backup is committed; an extra checkpoint costs a bitmap until the next trim.
            log.warning("domain %s: trimming old checkpoints failed: %s", self.domain, err)
