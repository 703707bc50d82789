"""One pull backup of a running QEMU domain, as explicit steps with a reverse teardown.

    lock → connect → remove leftovers → inspect + plan (full / incremental, reason)
      → scratch files and nodes, fleecing filters (worker/fleece.py)
      → guest paused for milliseconds: ONE transaction (checkpoint bitmaps + export
        bitmap for all disks), filters put in front of the guest devices → resumed
      → snapshot views → NBD export (0600 unix socket)
      → pull changed / allocated chunks → repository (chunks, index, manifest LAST)
      → teardown (reverse order) → trim checkpoints older than this backup's

On failure, whatever was set up is torn down in reverse; the new checkpoint stays (its
bitmap is valid), so the next backup diffs from the last *committed* backup by merging
the chain. A failing or full scratch breaks the backup, never a guest write. SIGTERM
tears down like SIGINT (``worker/signals.py``); after a SIGKILL the worker's reaper or the
next job removes what was left (``worker/cleanup.py``).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

from vmvault.storage.errors import StorageError
from vmvault.storage.format import DiskStats, Manifest
from vmvault.storage.progress import Progress, no_progress
from vmvault.storage.region_writer import RegionDiskWriter
from vmvault.storage.repository import Repository
from vmvault.storage.verification import failed_checks
from vmvault.storage.writer import BackupWriter
from vmvault.worker import checkpoints as cp
from vmvault.worker import offline, qemu_img
from vmvault.worker.cleanup import (
    frozen_marker,
    job_marker,
    nbd_socket_path,
    paused_marker,
    qemu_id,
    remove_leftovers,
    run_dir,
    scratch_dir,
    write_marker,
)
from vmvault.worker.config import DomainConfig, FleetConfig
from vmvault.worker.disks import DiskInfo, list_disks, node_bitmaps
from vmvault.worker.errors import WorkerError
from vmvault.worker.fleece import (
    FleeceNodes,
    access_options,
    filter_options,
    paused_guest,
    probe_export,
    scratch_bytes,
    scratch_options,
)
from vmvault.worker.freeze import FreezeOutcome, guest_frozen, thaw_leftover
from vmvault.worker.locks import domain_lock
from vmvault.worker.memory import chunk_friendly_malloc
from vmvault.worker.nbd import (
    BASE_ALLOCATION,
    NbdError,
    NbdTimeoutError,
    dirty_context,
)
from vmvault.worker.nbd_read import NbdReader
from vmvault.worker.qmp import QmpDisconnectedError, QmpError, QmpSession, open_session
from vmvault.worker.region_pull import pull_regions
from vmvault.worker.routing import MODES, BackupMode
from vmvault.worker.signals import critical

log = logging.getLogger(__name__)


# Unix socket paths are limited to 108 bytes (sun_path), including the final NUL.
_MAX_SOCKET_PATH = 107
_MIB = 1024 * 1024


class BackupError(WorkerError):
    """A backup failed; the message names the domain and the step. Retryable as a new job."""

    retryable = True


class IncrementalUnavailableError(BackupError):
    """``--mode incremental`` was asked but the checkpoint chain cannot give one. Not retryable:
    run a full (or auto) backup."""

    retryable = False


class DomainStateError(BackupError):
    """The domain is in a state where it cannot be backed up (e.g. waiting for migration)."""

    retryable = False


class StateDirError(BackupError):
    """``state_dir`` is full or unusable. Not retryable until space is freed."""

    retryable = False


class FleeceBrokenError(BackupError):
    """QEMU broke the snapshot instead of a guest write (scratch full, failing or too slow).
    Retryable once ``state_dir`` has room."""

    retryable = True


class Step(enum.Enum):
    """The step a backup job is in; a failure message names it."""

    START = "starting"
    LOCK = "locking the domain"
    CONNECT = "connecting to QMP"
    CLEANUP = "removing leftovers of an earlier job"
    PLAN = "inspecting disks and planning"
    SCRATCH = "creating scratch images and fleecing filters"
    CHECKPOINT = "taking the checkpoint (guest paused, filters inserted)"
    EXPORT = "exporting the disks over NBD"
    PULL = "pulling data into the repository"
    COMMIT = "committing the manifest"
    TEARDOWN = "tearing down"
    TRIM = "trimming old checkpoints"
    DONE = "done"


# Failures up to and including planning change nothing: their own message is enough.
_NOTHING_CHANGED = (Step.START, Step.LOCK, Step.CONNECT, Step.CLEANUP, Step.PLAN)


@dataclass(frozen=True)
class Plan:
    """What kind of backup to take and why."""

    kind: Literal["full", "incremental"]
    reason: str
    parent: Manifest | None
    since: str | None  # checkpoint to diff from (incremental)


@dataclass
class DiskResult:
    name: str
    virtual_size: int
    dirty_bytes: int = 0
    bytes_read: int = 0
    bytes_uploaded: int = 0
    chunks_new: int = 0
    chunks_zero: int = 0
    chunks_parent: int = 0
    chunks_patched: int = 0
    objects_put: int = 0

    def add_write_stats(self, stats: DiskStats) -> None:
        """Take the disk writer's counts (what ``RegionDiskWriter.finish`` returned)."""
        self.bytes_uploaded = stats.bytes_uploaded
        self.chunks_new = stats.chunks_new
        self.chunks_zero = stats.chunks_zero
        self.chunks_parent = stats.chunks_parent
        self.chunks_patched = stats.chunks_patched
        self.objects_put = stats.objects_put


@dataclass
class BackupResult:
    """The outcome of one committed backup."""

    backup_id: str
    domain: str
    kind: str
    reason: str
    parent: str | None
    checkpoint: str
    disks: list[DiskResult]
    duration_s: float
    leftovers_removed: bool = False
    paused_ms: float = 0.0
    fleece_bytes: int = 0
    # application: guest file systems frozen through its agent (worker/freeze.py)
    consistency: str = "crash"
    consistency_reason: str = ""
    frozen_ms: float | None = None
    state: str = "running"  # or "shut-off": backed up from its images (worker/offline.py)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["duration_s"] = round(self.duration_s, 3)
        data["paused_ms"] = round(self.paused_ms, 1)
        if self.frozen_ms is not None:
            data["frozen_ms"] = round(self.frozen_ms, 1)
        return data

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BackupResult:
        """The result ``to_json`` gave (a queued backup's result, as the CLI receives it)."""
        return cls(**{**doc, "disks": [DiskResult(**d) for d in doc["disks"]]})


class ChainView(Protocol):
    """What planning asks of a disk's checkpoint chain: QEMU's bitmaps
    (``cp.DiskChain``) or libvirt's checkpoints (``worker/libvirt_backup.py``)."""

    def why_unusable(self, checkpoint_id: str, disk: str) -> str | None: ...


def plan_backup(
    domain: str,
    mode: BackupMode,
    disks: Sequence[DiskInfo],
    chains: Mapping[str, ChainView],
    manifests: Sequence[Manifest],
    failed: Mapping[str, str] | None = None,
) -> Plan:
    """Choose full or incremental (pure). ``manifests`` oldest → newest, as the repo lists them.

    Incremental from the newest committed backup whose checkpoint is usable on every disk
    and whose disks match the domain's (names and sizes); else full with the reason the
    newest backup could not serve as parent. ``failed``: backup id → what its latest
    verification found, for backups whose latest verification FAILED: a parent whose
    chain holds one gives a full backup (so an intact backup exists again).
    """
    if mode == "full":
        return Plan("full", "full backup requested", None, None)
    reason = f"first backup of domain {domain}"
    for index, manifest in enumerate(reversed(manifests)):
        why = _why_not_parent(manifest, disks, chains)
        damaged = _damaged_in_chain(manifest, manifests, failed or {})
        if why is None and damaged is not None:
            reason = damaged
            break
        if why is None:
            assert manifest.checkpoint is not None
            return Plan(
                "incremental",
                f"changes since checkpoint {manifest.checkpoint} of backup {manifest.backup_id}",
                manifest,
                manifest.checkpoint,
            )
        if index == 0:
            reason = why
    if mode == "incremental":
        raise IncrementalUnavailableError(
            f"domain {domain!r}: no incremental backup possible: {reason}; "
            "run with --mode full or --mode auto"
        )
    return Plan("full", reason, None, None)


def _damaged_in_chain(
    manifest: Manifest, manifests: Sequence[Manifest], failed: Mapping[str, str]
) -> str | None:
    """Why ``manifest``'s chain (it and its ancestors still listed) must not be built on:
    a backup in it whose latest verification FAILED; None when there is none."""
    by_id = {m.backup_id: m for m in manifests}
    seen: set[str] = set()
    current: Manifest | None = manifest
    while current is not None and current.backup_id not in seen:
        seen.add(current.backup_id)
        if current.backup_id in failed:
            return (
                f"backup {current.backup_id} in the parent chain failed its verification "
                f"({failed[current.backup_id]})"
            )
        current = by_id.get(current.parent) if current.parent else None
    return None


def _why_not_parent(
    manifest: Manifest, disks: Sequence[DiskInfo], chains: Mapping[str, ChainView]
) -> str | None:
    if manifest.checkpoint is None:
        return f"backup {manifest.backup_id} has no checkpoint"
    old = {d.name: d.virtual_size for d in manifest.disks}
    new = {d.name: d.virtual_size for d in disks}
    if set(old) != set(new):
        return (
            f"disks changed since backup {manifest.backup_id} "
            f"({', '.join(sorted(old))} → {', '.join(sorted(new))})"
        )
    # A resized disk stays incremental: format 2 plans the regions whose extent changed
    # from the new size (docs/repository-format.md section 24, rule 2).
    for name in sorted(new):
        why = chains[name].why_unusable(manifest.checkpoint, name)
        if why is not None:
            return why
    return None


@dataclass
class _Job:
    """State of one running backup; teardown callbacks pile up in ``undo``."""

    config: FleetConfig
    domain: str
    mode: BackupMode
    progress: Progress
    step: Step = Step.START
    undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    session: QmpSession | None = None
    disks: list[DiskInfo] = field(default_factory=list)
    results: dict[str, DiskResult] = field(default_factory=dict)
    paused_ms: float = 0.0
    freeze: FreezeOutcome | None = None
    # A shut-off domain's images (worker/offline.py), opened by qemu-storage-daemon.
    images: dict[str, Path] | None = None
    # Bytes each empty scratch image took (qcow2 metadata): not copied guest data.
    scratch_base: dict[str, int] = field(default_factory=dict)

    @property
    def qmp(self) -> QmpSession:
        assert self.session is not None
        return self.session

    def on_undo(self, what: str, action: Callable[[], None]) -> None:
        self.undo.append((what, action))

    def teardown(self) -> list[str]:
        """Run every undo action in reverse; return the failures (best effort).

        Once QEMU is gone (connection lost, or no answer: frozen), the remaining QMP
        actions are skipped: there is nothing left to undo in a dead process, a frozen one
        is left to the reaper, and files are still removed. SIGTERM/SIGINT wait until the
        teardown is done.
        """
        with critical():
            return self._teardown()

    def _teardown(self) -> list[str]:
        failures: list[str] = []
        qemu_gone = False
        while self.undo:
            what, action = self.undo.pop()
            if qemu_gone and isinstance(action, partial):
                continue  # QMP undo actions are partials of QmpSession methods
            try:
                action()
            except QmpDisconnectedError as err:
                qemu_gone = True
                failures.append(f"{what}: {err}")
            except Exception as err:  # keep tearing down the rest
                log.warning("domain %s: teardown: %s failed: %s", self.domain, what, err)
                failures.append(f"{what}: {err}")
        if qemu_gone:
            log.warning(
                "domain %s: QEMU went away; its temporary objects went with it", self.domain
            )
        return failures


def run_backup(
    config: FleetConfig,
    domain: str,
    mode: BackupMode = "auto",
    progress: Progress | None = None,
) -> BackupResult:
    """Back up ``domain`` (config ``domains.<name>``) into the config's repository."""
    if mode not in MODES:
        raise BackupError(f"unknown backup mode {mode!r}: use one of {', '.join(MODES)}")
    dom_cfg = config.domain(domain)  # UnknownDomainError for a name not in the config
    with chunk_friendly_malloc():
        if dom_cfg.libvirt is not None:
            # Imported here: python3-libvirt is needed on hosts with libvirt domains only.
            from vmvault.worker.libvirt_backup import run_libvirt_backup

            return run_libvirt_backup(config, domain, mode, progress, dom_cfg)
        return _run_backup(config, domain, mode, progress, dom_cfg)


def _run_backup(
    config: FleetConfig,
    domain: str,
    mode: BackupMode,
    progress: Progress | None,
    dom_cfg: DomainConfig,
) -> BackupResult:
    job = _Job(config, domain, mode, progress or no_progress)
    started = time.monotonic()
    state_dir = config.state_dir
    try:
        job.step = Step.LOCK
        check_state_dir(config)
        with domain_lock(state_dir, domain, "backup"):
            job.step = Step.CONNECT
            timeout = config.backup.io_timeout_seconds
            if offline.is_shut_off(dom_cfg):
                job.images = offline.image_paths(dom_cfg, dom_cfg.disks)
                connection = offline.storage_daemon(domain, job.images, state_dir, timeout)
            else:
                connection = open_session(domain, dom_cfg.qmp_socket(domain), timeout)
            with connection as session, config.repository.open() as repo:
                job.session = session
                result = _backup(job, repo, dom_cfg.disks)
                result.duration_s = time.monotonic() - started
                return result
    except (WorkerError, StorageError) as err:
        if job.step in _NOTHING_CHANGED:
            raise  # nothing was changed: the original message says it all
        # Keep the kind of failure (a broken fleece, a full state_dir) for callers.
        kind = type(err) if isinstance(err, BackupError) else BackupError
        raise kind(f"backup of domain {domain!r} failed while {job.step.value}: {err}") from err


def _backup(job: _Job, repo: Repository, allow: list[str] | None) -> BackupResult:
    qmp, domain, state_dir = job.qmp, job.domain, job.config.state_dir
    if job.images is not None:
        return _backup_shut_off(job, repo)
    status = qmp.query_status()
    if status in ("inmigrate", "postmigrate", "finish-migrate"):
        raise DomainStateError(
            f"domain {domain!r} is in state {status!r} (migration or restore in progress): "
            "back it up once it runs"
        )
    check_socket_dir(state_dir, domain)
    job.step = Step.CLEANUP
    leftovers = remove_leftovers(qmp, state_dir)
    thaw_leftover(job.config, domain)  # a guest a dead job left frozen
    # From here on QEMU may hold this job's objects: a SIGKILL leaves the marker, which
    # tells the reaper to look (worker/reaper.py). Removed once the teardown is complete.
    marker = job_marker(state_dir, domain)
    write_marker(marker)

    job.step = Step.PLAN
    job.disks = disks = list_disks(qmp, allow)
    chains = {d.name: cp.parse_chain(d.node, d.bitmaps) for d in disks}
    plan = plan_backup(
        domain, job.mode, disks, chains, repo.list_manifests(domain), failed_checks(repo, domain)
    )
    new_id = cp.new_checkpoint_id(owner=repo_owner(repo))
    log.info("domain %s: %s backup (%s), checkpoint %s", domain, plan.kind, plan.reason, new_id)

    _check_fleece_space(job)
    writer = repo.open_backup(domain, plan.parent, plan.kind, plan.reason, new_id)
    job.on_undo("abort the repository backup", writer.abort)
    try:
        job.step = Step.SCRATCH
        _setup_scratch(job)
        job.step = Step.CHECKPOINT
        temp = _checkpoint_and_fleece(job, chains, new_id, plan)
        job.step = Step.EXPORT
        _export(job, temp)
        job.step = Step.PULL
        _pull(job, writer, plan, temp)
        fleece_bytes = sum(
            max(0, scratch_bytes(_scratch_path(job, d.name)) - job.scratch_base[d.name])
            for d in job.disks
        )
        job.step = Step.COMMIT
        # A last progress report before the manifest: the fleet's progress callback is
        # where a job that lost its domain lock stops, and the final uploads may have
        # taken a while since the last one.
        pulled = sum(r.virtual_size for r in job.results.values())
        job.progress("commit", pulled, pulled)
        manifest = writer.commit(
            layout=disk_layout(disks),
            extra={
                "dirty_bytes": {name: r.dirty_bytes for name, r in job.results.items()},
                "paused_ms": round(job.paused_ms, 1),
                "fleece_bytes": fleece_bytes,
                "state": "running",
                **(job.freeze.to_manifest() if job.freeze else {}),
            },
        )
    except BaseException:
        if not job.teardown():
            marker.unlink(missing_ok=True)
        raise
    job.step = Step.TEARDOWN
    failures = job.teardown()
    if not failures:
        marker.unlink(missing_ok=True)
    if failures:
        log.warning(
            "domain %s: backup %s committed; teardown left: %s",
            domain,
            manifest.backup_id,
            "; ".join(failures),
        )
    return _trim_and_report(
        job, repo, manifest, plan, new_id,
        leftovers_removed=bool(leftovers), paused_ms=job.paused_ms, fleece_bytes=fleece_bytes,
    )  # fmt: skip


def _trim_and_report(
    job: _Job,
    repo: Repository,
    manifest: Manifest,
    plan: Plan,
    new_id: str,
    **extra: Any,
) -> BackupResult:
    """The steps after a committed backup, the same for running and shut-off domains:
    trim the checkpoint chain, then the result (``extra``: what only one kind reports)."""
    job.step = Step.TRIM
    _trim(job, new_id, repo_owner(repo))
    job.step = Step.DONE
    consistency: dict[str, Any] = {}
    if job.freeze is not None:
        consistency = {
            "consistency": job.freeze.consistency,
            "consistency_reason": job.freeze.reason,
            "frozen_ms": job.freeze.frozen_ms,
        }
    return BackupResult(
        backup_id=manifest.backup_id,
        domain=job.domain,
        kind=plan.kind,
        reason=plan.reason,
        parent=plan.parent.backup_id if plan.parent else None,
        checkpoint=new_id,
        disks=[job.results[d.name] for d in job.disks],
        duration_s=0.0,
        **consistency,
        **extra,
    )


def _backup_shut_off(job: _Job, repo: Repository) -> BackupResult:
    """:func:`_backup` for a shut-off domain, its images opened by qemu-storage-daemon.

    Nothing writes to them: no fleecing, no pause, no freeze; the checkpoint and the pull
    are those of a running domain, so the chain continues (``worker/offline.py``).
    """
    qmp, domain, state_dir = job.qmp, job.domain, job.config.state_dir
    assert job.images is not None
    check_socket_dir(state_dir, domain)
    # The QEMU that a dead job's markers were about has gone, and its objects with it.
    for marker in (job_marker, paused_marker, frozen_marker):
        marker(state_dir, domain).unlink(missing_ok=True)
    shutil.rmtree(scratch_dir(state_dir, domain), ignore_errors=True)
    job.step = Step.PLAN
    job.disks = disks = offline.list_images(qmp, job.images)
    chains = {d.name: cp.parse_chain(d.node, d.bitmaps) for d in disks}
    plan = plan_backup(
        domain, job.mode, disks, chains, repo.list_manifests(domain), failed_checks(repo, domain)
    )
    new_id = cp.new_checkpoint_id(owner=repo_owner(repo))
    log.info("domain %s (shut off): %s backup (%s)", domain, plan.kind, plan.reason)
    writer = repo.open_backup(domain, plan.parent, plan.kind, plan.reason, new_id)
    job.on_undo("abort the repository backup", writer.abort)
    job.freeze = FreezeOutcome(
        "crash", "domain shut off: its disks as the guest left them (clean after a clean shutdown)"
    )
    try:
        job.step = Step.CHECKPOINT
        temp = offline.checkpoint_and_export(
            qmp, disks, chains, new_id, plan.since,
            nbd_socket_path(state_dir, domain), probe_export, job.on_undo,
        )  # fmt: skip
        job.step = Step.PULL
        _pull(job, writer, plan, temp)
        job.step = Step.COMMIT
        pulled = sum(r.virtual_size for r in job.results.values())
        job.progress("commit", pulled, pulled)
        manifest = writer.commit(
            layout=disk_layout(disks),
            extra={
                "dirty_bytes": {name: r.dirty_bytes for name, r in job.results.items()},
                "state": "shut-off",
                **job.freeze.to_manifest(),
            },
        )
    except BaseException:
        job.teardown()
        raise
    job.step = Step.TEARDOWN
    failures = job.teardown()
    if failures:
        log.warning("domain %s: backup committed; teardown left: %s", domain, "; ".join(failures))
    return _trim_and_report(job, repo, manifest, plan, new_id, state="shut-off")


def check_socket_dir(state_dir: Path, domain: str) -> None:
    sock = nbd_socket_path(state_dir, domain)
    if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
        raise BackupError(
            f"NBD socket path {sock} is longer than {_MAX_SOCKET_PATH} bytes: "
            "use a shorter state_dir"
        )
    directory = run_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)  # the export socket must not be reachable by other users


def check_state_dir(config: FleetConfig) -> int:
    """Free bytes in ``state_dir``; ``StateDirError`` when it cannot be made or is nearly full.

    Checked before the domain is touched: the lock file, the NBD socket, the pause marker
    and the fleecing scratch files all live there.
    """
    state_dir = config.state_dir
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        stats = os.statvfs(state_dir)
    except OSError as err:
        raise StateDirError(f"state_dir {state_dir} is not usable: {err.strerror}") from err
    free = stats.f_bavail * stats.f_frsize
    need = config.backup.min_free_mib * _MIB
    if free < need:
        raise StateDirError(
            f"state_dir {state_dir} has {free / _MIB:.0f} MiB free, less than "
            f"backup.min_free_mib ({config.backup.min_free_mib} MiB): free space there or "
            "point state_dir at a larger file system"
        )
    return free


def _check_fleece_space(job: _Job) -> None:
    """Compare ``state_dir``'s free space with the most the scratch files can grow to.

    The copy-before-write filter copies old data of a region the first time the guest
    overwrites it during the backup: at worst every allocated byte of every disk.
    Running out breaks the backup, not the guest (``on-cbw-error=break-snapshot``), so
    this warns; ``backup.require_fleece_space`` makes it refuse instead.
    """
    state_dir = job.config.state_dir
    stats = os.statvfs(state_dir)
    free = stats.f_bavail * stats.f_frsize
    bound = sum(d.allocated for d in job.disks)
    if free >= bound:
        return
    message = (
        f"domain {job.domain!r}: state_dir {state_dir} has {free / _MIB:.0f} MiB free; the "
        f"fleecing scratch files can grow to {bound / _MIB:.0f} MiB if the guest overwrites "
        "all its data during the backup"
    )
    if job.config.backup.require_fleece_space:
        raise StateDirError(
            f"{message}: refused (backup.require_fleece_space); free space in state_dir"
        )
    log.warning("%s; if they fill it, the backup fails (the guest is not affected)", message)


def _scratch_path(job: _Job, disk: str) -> Path:
    return scratch_dir(job.config.state_dir, job.domain) / f"{disk}.qcow2"


def _setup_scratch(job: _Job) -> None:
    """Per disk: an empty scratch image backed by the disk, and the (not yet inserted) filter."""
    if shutil.which(qemu_img.QEMU_IMG) is None:
        raise BackupError("qemu-img not found: install qemu-utils")
    directory = scratch_dir(job.config.state_dir, job.domain)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    job.on_undo("remove scratch directory", lambda: shutil.rmtree(directory, ignore_errors=True))
    for disk in job.disks:
        path = _scratch_path(job, disk.name)
        try:
            qemu_img.create(path, disk.virtual_size)
        except qemu_img.QemuImgError as err:
            raise StateDirError(
                f"disk {disk.name}: cannot create scratch image {path}: {err.detail or err}"
            ) from err
        job.scratch_base[disk.name] = scratch_bytes(path)
        nodes = FleeceNodes.of(disk.name)
        job.qmp.blockdev_add(scratch_options(nodes.scratch, path, disk.node))
        job.on_undo(f"blockdev-del {nodes.scratch}", partial(job.qmp.blockdev_del, nodes.scratch))
        job.qmp.blockdev_add(
            filter_options(nodes, disk.node, job.config.backup.fleece_timeout_seconds, None)
        )
        job.on_undo(f"blockdev-del {nodes.filter}", partial(job.qmp.blockdev_del, nodes.filter))


def _checkpoint_and_fleece(
    job: _Job, chains: dict[str, cp.DiskChain], new_id: str, plan: Plan
) -> str | None:
    """One instant for all disks: filters inserted between two halves of the checkpoint.

        begin   transaction: every disk's new checkpoint bitmap added (the old still records)
        freeze  qom-set: each guest device now writes through its fleecing filter
        seal    transaction: the old bitmaps stop recording; export bitmap = B_since..B_old

    With this order every write is exported now or by the next backup whenever it comes
    (``cp.begin_checkpoint_actions`` says why); the guest is paused from begin to seal
    so that the freeze is one instant for all disks (``worker/fleece.py``). Returns the
    export bitmap's name (incremental) or None.
    """
    qmp = job.qmp
    temp = f"{cp.TEMP_PREFIX}{os.getpid()}" if plan.since is not None else None
    begin: list[dict[str, Any]] = []
    seal: list[dict[str, Any]] = []
    for disk in job.disks:
        begin += cp.begin_checkpoint_actions(chains[disk.name], new_id)
        seal += cp.seal_checkpoint_actions(chains[disk.name])
        if temp is not None and plan.since is not None:
            seal += cp.export_bitmap_actions(chains[disk.name], plan.since, temp)
    # The guest's file systems are frozen (when its agent answers) just around the pause.
    with (
        guest_frozen(job.config, job.domain, qmp.query_status() == "running") as job.freeze,
        paused_guest(qmp, job.config.state_dir) as paused_at,
    ):
        qmp.transaction(begin)
        for disk in job.disks:
            nodes = FleeceNodes.of(disk.name)
            qmp.set_drive(disk.qdev, nodes.filter)
            job.on_undo(
                f"give {disk.qdev} back its disk", partial(qmp.set_drive, disk.qdev, disk.node)
            )
        qmp.transaction(seal)
        if temp is not None:
            for disk in job.disks:
                job.on_undo(
                    f"remove bitmap {temp} on {disk.node}",
                    partial(qmp.bitmap_remove, disk.node, temp),
                )
        job.paused_ms = (time.monotonic() - paused_at) * 1000
    for disk in job.disks:
        nodes = FleeceNodes.of(disk.name)
        qmp.blockdev_add(access_options(nodes))
        job.on_undo(f"blockdev-del {nodes.access}", partial(qmp.blockdev_del, nodes.access))
    return temp


def _export(job: _Job, temp: str | None) -> None:
    """Export each disk's frozen view over NBD (read-only, with the export bitmap), and its
    snapshot-access view as the probe (``worker/fleece.py``)."""
    qmp, state_dir = job.qmp, job.config.state_dir
    sock = nbd_socket_path(state_dir, job.domain)
    sock.unlink(missing_ok=True)
    qmp.nbd_server_start(sock)
    job.on_undo("remove NBD socket", lambda: sock.unlink(missing_ok=True))
    job.on_undo("nbd-server-stop", partial(qmp.nbd_server_stop))
    os.chmod(sock, 0o600)
    for disk in job.disks:
        nodes = FleeceNodes.of(disk.name)
        export_id = qemu_id("e", disk.name)
        # The bitmap lives on the disk's node, named with its node (BlockDirtyBitmapOrStr,
        # QEMU 7.1+): nothing has to find it through the scratch image's backing chain.
        bitmaps = [{"node": disk.node, "name": temp}] if temp else []
        qmp.block_export_add(export_id, nodes.scratch, disk.name, bitmaps)
        job.on_undo(f"block-export-del {export_id}", partial(qmp.block_export_del, export_id))
        probe_id = qemu_id("p", disk.name)
        qmp.block_export_add(probe_id, nodes.access, probe_export(disk.name), [])
        job.on_undo(f"block-export-del {probe_id}", partial(qmp.block_export_del, probe_id))


@dataclass
class _Meter:
    """Bytes of all disks accounted for so far, reported as the job's progress."""

    job: _Job
    total: int
    done: int = 0

    def add(self, disk: str, nbytes: int) -> None:
        self.done += nbytes
        self.job.progress(f"pull {disk}", self.done, self.total)


def _pull(job: _Job, writer: BackupWriter, plan: Plan, temp: str | None) -> None:
    """Pull every disk into the repository; a failed read names its likely cause."""
    meter = _Meter(job, sum(d.virtual_size for d in job.disks))
    for disk in job.disks:
        result = DiskResult(disk.name, disk.virtual_size)
        job.results[disk.name] = result
        dw = writer.open_disk(disk.name, disk.virtual_size, disk.format)
        if not isinstance(dw, RegionDiskWriter):
            raise BackupError(f"{writer.repo.url}: backups are written in format 2 only")
        try:
            _pull_disk(job, disk, dw, temp, result, meter)
            # Every read of this disk came after its freeze, as long as the snapshot still
            # stands now: a copy that failed meanwhile would have let new data through.
            _probe_snapshot(job, disk)
        except NbdError as err:
            raise _read_failure(job, disk, err) from err
        result.add_write_stats(dw.finish())


def _pull_disk(
    job: _Job,
    disk: DiskInfo,
    dw: RegionDiskWriter,
    temp: str | None,
    result: DiskResult,
    meter: _Meter,
) -> None:
    """Plan the disk's regions from its extents, read what changed, stream it
    (worker/region_pull.py)."""
    sock = nbd_socket_path(job.config.state_dir, job.domain)
    contexts = [BASE_ALLOCATION] + ([dirty_context(temp)] if temp else [])
    with NbdReader(sock, disk.name, contexts, job.config.backup.io_timeout_seconds) as reader:
        if reader.size != disk.virtual_size:
            raise BackupError(
                f"disk {disk.name}: export has {reader.size} bytes, not {disk.virtual_size}"
            )
        pulled = pull_regions(
            reader,
            dw,
            dirty_context(temp) if temp else None,
            partial(meter.add, disk.name),
        )
    result.dirty_bytes = pulled.dirty_bytes
    result.bytes_read = pulled.bytes_read


def _probe_snapshot(job: _Job, disk: DiskInfo) -> None:
    """Read one sector of the disk's snapshot-access view: it fails once a copy failed."""
    sock = nbd_socket_path(job.config.state_dir, job.domain)
    with NbdReader(sock, probe_export(disk.name), (), job.config.backup.io_timeout_seconds) as r:
        r.read_one(0, min(512, disk.virtual_size))


def _read_failure(job: _Job, disk: DiskInfo, err: NbdError) -> BackupError:
    """Name the likely cause of a failed read of a frozen disk.

    When the scratch file cannot take a copy (full, I/O error, slower than
    ``fleece_timeout_seconds``), QEMU breaks the snapshot and the export fails every read
    (snapshot-access answers EACCES, which the NBD server sends as EINVAL or EPERM).
    """
    if isinstance(err, NbdTimeoutError):
        return BackupError(f"domain {job.domain!r} disk {disk.name}: {err}")
    path = _scratch_path(job, disk.name)
    stats = os.statvfs(job.config.state_dir)
    free = stats.f_bavail * stats.f_frsize
    return FleeceBrokenError(
        f"domain {job.domain!r} disk {disk.name}: reading the frozen disk failed ({err}). "
        f"The fleecing scratch {path} holds {scratch_bytes(path) / _MIB:.0f} MiB and "
        f"{job.config.state_dir} has {free / _MIB:.0f} MiB free: when the scratch cannot "
        "take a copy (full, failing, or slower than backup.fleece_timeout_seconds), QEMU "
        "stops the snapshot instead of failing the guest's write. The guest was not "
        "affected; free space in state_dir and back up again"
    )


def disk_layout(disks: Sequence[DiskInfo]) -> dict[str, Any]:
    """The domain's disk layout, for restore: names, sizes, formats, node names, files."""
    return {
        "disks": [
            {
                "name": d.name,
                "virtual_size": d.virtual_size,
                "format": d.format,
                "node": d.node,
                "file": d.filename,
            }
            for d in disks
        ]
    }


def repo_owner(repo: Repository) -> str:
    """The tag this repository's checkpoints carry: 8 hex digits derived from its id."""
    return hashlib.sha256(repo.config.id.encode()).hexdigest()[:8]


def _trim(job: _Job, keep_from: str, owner: str) -> None:
    """Delete checkpoints older than the one just committed (and stale vmvault bitmaps),
    except recent ones of other repositories that back up this domain too."""
    days = job.config.backup.foreign_checkpoint_days
    keep_foreign_since = datetime.now(UTC) - timedelta(days=days)
    try:
        bitmaps = node_bitmaps(job.qmp, [d.node for d in job.disks])
        actions: list[dict[str, Any]] = []
        for disk in job.disks:
            chain = cp.parse_chain(disk.node, bitmaps[disk.node])
            actions += cp.trim_actions(chain, keep_from, owner, keep_foreign_since)
        job.qmp.transaction(actions)
    except QmpError as err:
        # The backup is committed; extra checkpoints only cost memory until the next trim.
        log.warning("domain %s: trimming old checkpoints failed: %s", job.domain, err)
