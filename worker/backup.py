"""One pull backup of a running QEMU domain, as explicit steps with a reverse teardown.

    lock → connect → remove leftovers → inspect + plan (full / incremental, reason)
      → scratch nodes → ONE transaction: checkpoint bitmaps + fleecing for all disks
      → export bitmap (incremental) → NBD export (0600 unix socket)
      → pull changed / allocated chunks → repository (chunks, index, manifest LAST)
      → teardown (reverse order) → trim checkpoints older than this backup's

On failure, whatever was set up is torn down in reverse; the new checkpoint stays (its
bitmap is valid), so the next backup diffs from the last *committed* backup by merging
the chain. The QMP sequence is the one in ``shared/DESIGN.md`` (verified on QEMU 7.2).
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from scheduler.config import DomainConfig, FleetConfig
from storage.errors import StorageError
from storage.format import Manifest
from storage.repository import BackupWriter, DiskWriter, Repository
from worker import checkpoints as cp
from worker.cleanup import (
    nbd_socket_path,
    qemu_id,
    remove_leftovers,
    run_dir,
    scratch_dir,
)
from worker.errors import WorkerError
from worker.inspect import DiskInfo, list_disks, node_bitmaps
from worker.locks import domain_lock
from worker.memory import chunk_friendly_malloc
from worker.nbd import (
    BASE_ALLOCATION,
    DIRTY,
    STATE_ZERO,
    NbdReader,
    chunks_touched,
    dirty_context,
)
from worker.progress import Progress, no_progress
from worker.qmp import QmpDisconnectedError, QmpError, QmpSession, open_session

log = logging.getLogger(__name__)

BackupMode = Literal["auto", "full", "incremental"]
MODES: tuple[BackupMode, ...] = ("auto", "full", "incremental")

# Unix socket paths are limited to 108 bytes (sun_path), including the final NUL.
_MAX_SOCKET_PATH = 107
# NBD connections reading at once (each one request in flight; see worker/nbd.py).
_READ_CONNECTIONS = 3


class BackupError(WorkerError):
    """A backup failed; the message names the domain and the step. Retryable as a new job."""


class IncrementalUnavailableError(BackupError):
    """``--mode incremental`` was asked but the checkpoint chain cannot give one. Not retryable:
    run a full (or auto) backup."""


class DomainStateError(BackupError):
    """The domain is in a state where it cannot be backed up (e.g. waiting for migration)."""


class Step(enum.Enum):
    """The step a backup job is in; a failure message names it."""

    START = "starting"
    LOCK = "locking the domain"
    CONNECT = "connecting to QMP"
    CLEANUP = "removing leftovers of an earlier job"
    PLAN = "inspecting disks and planning"
    SCRATCH = "creating scratch images"
    CHECKPOINT = "taking the checkpoint (fleecing transaction)"
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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["duration_s"] = round(self.duration_s, 3)
        return data


def plan_backup(
    domain: str,
    mode: BackupMode,
    disks: Sequence[DiskInfo],
    chains: dict[str, cp.DiskChain],
    manifests: Sequence[Manifest],
) -> Plan:
    """Choose full or incremental (pure). ``manifests`` oldest → newest, as the repo lists them.

    Incremental from the newest committed backup whose checkpoint is usable on every disk
    and whose disks match the domain's (names and sizes); else full with the reason the
    newest backup could not serve as parent.
    """
    if mode == "full":
        return Plan("full", "full backup requested", None, None)
    reason = f"first backup of domain {domain}"
    for index, manifest in enumerate(reversed(manifests)):
        why = _why_not_parent(manifest, disks, chains)
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


def _why_not_parent(
    manifest: Manifest, disks: Sequence[DiskInfo], chains: dict[str, cp.DiskChain]
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
    for name, size in sorted(new.items()):
        if old[name] != size:
            return (
                f"disk {name} resized since backup {manifest.backup_id} "
                f"({old[name]} → {size} bytes)"
            )
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

    @property
    def qmp(self) -> QmpSession:
        assert self.session is not None
        return self.session

    def on_undo(self, what: str, action: Callable[[], None]) -> None:
        self.undo.append((what, action))

    def teardown(self) -> list[str]:
        """Run every undo action in reverse; return the failures (best effort, never raises).

        Once QEMU is gone (connection lost), the remaining QMP actions are skipped: there
        is nothing left to undo in a dead process, and files are still removed.
        """
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
        with domain_lock(state_dir, domain, "backup"):
            job.step = Step.CONNECT
            with (
                open_session(domain, dom_cfg.qmp) as session,
                config.repository.open() as repo,
            ):
                job.session = session
                result = _backup(job, repo, dom_cfg.disks)
                result.duration_s = time.monotonic() - started
                return result
    except (WorkerError, StorageError) as err:
        if job.step in _NOTHING_CHANGED:
            raise  # nothing was changed: the original message says it all
        raise BackupError(
            f"backup of domain {domain!r} failed while {job.step.value}: {err}"
        ) from err


def _backup(job: _Job, repo: Repository, allow: list[str] | None) -> BackupResult:
    qmp, domain, state_dir = job.qmp, job.domain, job.config.state_dir
    status = qmp.query_status()
    if status in ("inmigrate", "postmigrate", "finish-migrate"):
        raise DomainStateError(
            f"domain {domain!r} is in state {status!r} (migration or restore in progress): "
            "back it up once it runs"
        )
    _check_socket_dir(state_dir, domain)
    job.step = Step.CLEANUP
    leftovers = remove_leftovers(qmp, state_dir)

    job.step = Step.PLAN
    job.disks = disks = list_disks(qmp, allow)
    chains = {d.name: cp.parse_chain(d.node, d.bitmaps) for d in disks}
    plan = plan_backup(domain, job.mode, disks, chains, repo.list_manifests(domain))
    new_id = cp.new_checkpoint_id()
    log.info("domain %s: %s backup (%s), checkpoint %s", domain, plan.kind, plan.reason, new_id)

    writer = repo.open_backup(domain, plan.parent, plan.kind, plan.reason, new_id)
    job.on_undo("abort the repository backup", writer.abort)
    try:
        job.step = Step.SCRATCH
        _setup_scratch(job)
        job.step = Step.CHECKPOINT
        _checkpoint_and_fleece(job, chains, new_id)
        job.step = Step.EXPORT
        temp = _export(job, plan)
        job.step = Step.PULL
        _pull(job, writer, repo.chunk_size, plan, temp)
        job.step = Step.COMMIT
        # A last progress report before the manifest: the fleet's progress callback is
        # where a job that lost its domain lock stops, and the final uploads may have
        # taken a while since the last one.
        pulled = sum(r.virtual_size for r in job.results.values())
        job.progress("commit", pulled, pulled)
        manifest = writer.commit(
            layout=_layout(disks),
            extra={"dirty_bytes": {name: r.dirty_bytes for name, r in job.results.items()}},
        )
    except BaseException:
        job.teardown()
        raise
    job.step = Step.TEARDOWN
    failures = job.teardown()
    if failures:
        log.warning(
            "domain %s: backup %s committed; teardown left: %s",
            domain,
            manifest.backup_id,
            "; ".join(failures),
        )
    job.step = Step.TRIM
    _trim(job, new_id)
    job.step = Step.DONE
    return BackupResult(
        backup_id=manifest.backup_id,
        domain=domain,
        kind=plan.kind,
        reason=plan.reason,
        parent=plan.parent.backup_id if plan.parent else None,
        checkpoint=new_id,
        disks=[job.results[d.name] for d in disks],
        duration_s=0.0,
        leftovers_removed=bool(leftovers),
    )


def _check_socket_dir(state_dir: Path, domain: str) -> None:
    sock = nbd_socket_path(state_dir, domain)
    if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
        raise BackupError(
            f"NBD socket path {sock} is longer than {_MAX_SOCKET_PATH} bytes: "
            "use a shorter state_dir"
        )
    directory = run_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)  # the export socket must not be reachable by other users


def _setup_scratch(job: _Job) -> None:
    """One empty qcow2 per disk, opened with the live disk node as its backing (fleecing)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise BackupError("qemu-img not found: install qemu-utils")
    directory = scratch_dir(job.config.state_dir, job.domain)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    job.on_undo("remove scratch directory", lambda: shutil.rmtree(directory, ignore_errors=True))
    for disk in job.disks:
        path = directory / f"{disk.name}.qcow2"
        proc = subprocess.run(
            [qemu_img, "create", "-q", "-f", "qcow2", str(path), str(disk.virtual_size)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BackupError(
                f"disk {disk.name}: cannot create scratch image {path}: {proc.stderr.strip()}"
            )
        node = qemu_id("s", disk.name)
        job.qmp.blockdev_add(
            {
                "driver": "qcow2",
                "node-name": node,
                "file": {"driver": "file", "filename": str(path)},
                "backing": disk.node,
            }
        )
        job.on_undo(f"blockdev-del {node}", partial(job.qmp.blockdev_del, node))


def _checkpoint_and_fleece(job: _Job, chains: dict[str, cp.DiskChain], new_id: str) -> None:
    """ONE transaction for all disks: new checkpoint bitmaps + ``blockdev-backup sync=none``."""
    actions: list[dict[str, Any]] = []
    for disk in job.disks:
        actions += cp.checkpoint_actions(chains[disk.name], new_id)
        actions.append(
            {
                "type": "blockdev-backup",
                "data": {
                    "job-id": qemu_id("j", disk.name),
                    "device": disk.node,
                    "target": qemu_id("s", disk.name),
                    "sync": "none",
                },
            }
        )
    job.qmp.transaction(actions)
    # Undo runs in reverse: jobs are cancelled before their scratch nodes are deleted.
    for disk in job.disks:
        job_id = qemu_id("j", disk.name)
        job.on_undo(f"block-job-cancel {job_id}", partial(job.qmp.block_job_cancel, job_id))


def _export(job: _Job, plan: Plan) -> str | None:
    """Export each scratch node over NBD (read-only), with the merged bitmap if incremental."""
    qmp, state_dir = job.qmp, job.config.state_dir
    temp: str | None = None
    if plan.since is not None:
        temp = f"{cp.TEMP_PREFIX}{os.getpid()}"
        actions: list[dict[str, Any]] = []
        # Re-read the chains: the checkpoint transaction disabled the previous newest bitmap.
        bitmaps = node_bitmaps(qmp, [d.node for d in job.disks])
        for disk in job.disks:
            chain = cp.parse_chain(disk.node, bitmaps[disk.node])
            # The new checkpoint is the newest; merge from `since` up to the one before it.
            before_new = cp.DiskChain(
                chain.node, chain.order[:-1], chain.usable_from, chain.stale, chain.problems
            )
            actions += cp.export_bitmap_actions(before_new, plan.since, temp)
        qmp.transaction(actions)
        for disk in job.disks:
            job.on_undo(
                f"remove bitmap {temp} on {disk.node}",
                partial(qmp.bitmap_remove, disk.node, temp),
            )
    sock = nbd_socket_path(state_dir, job.domain)
    sock.unlink(missing_ok=True)
    qmp.nbd_server_start(sock)
    job.on_undo("remove NBD socket", lambda: sock.unlink(missing_ok=True))
    job.on_undo("nbd-server-stop", partial(qmp.nbd_server_stop))
    os.chmod(sock, 0o600)
    for disk in job.disks:
        export_id = qemu_id("e", disk.name)
        qmp.block_export_add(export_id, qemu_id("s", disk.name), disk.name, [temp] if temp else [])
        job.on_undo(f"block-export-del {export_id}", partial(qmp.block_export_del, export_id))
    return temp


def _runs(flags: Sequence[bool], want: bool) -> Iterator[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive chunk indexes whose flag is ``want``."""
    start: int | None = None
    for i, flag in enumerate(flags):
        if flag == want and start is None:
            start = i
        elif flag != want and start is not None:
            yield start, i - start
            start = None
    if start is not None:
        yield start, len(flags) - start


def _span(first: int, count: int, chunk: int, size: int) -> tuple[int, int]:
    """``(offset, length)`` of ``count`` chunks from chunk ``first``; the tail may be short."""
    offset = first * chunk
    return offset, min(size, (first + count) * chunk) - offset


def _pull(job: _Job, writer: BackupWriter, chunk: int, plan: Plan, temp: str | None) -> None:
    """Pull every disk: classify chunks from extents, read the needed ones, stream them."""
    sock = nbd_socket_path(job.config.state_dir, job.domain)
    total = sum(d.virtual_size for d in job.disks)
    done = 0
    for disk in job.disks:
        size = disk.virtual_size
        contexts = [BASE_ALLOCATION] + ([dirty_context(temp)] if temp else [])
        result = DiskResult(disk.name, size)
        job.results[disk.name] = result
        dw: DiskWriter = writer.open_disk(disk.name, size, disk.format)
        with NbdReader(sock, disk.name, contexts) as reader:
            if reader.size != size:
                raise BackupError(f"disk {disk.name}: export has {reader.size} bytes, not {size}")
            extents = reader.extents()
            n = -(-size // chunk)
            data = chunks_touched(extents[BASE_ALLOCATION], chunk, n, STATE_ZERO, want=False)
            if temp is not None:
                dirty_ext = extents[dirty_context(temp)]
                dirty = chunks_touched(dirty_ext, chunk, n, DIRTY, want=True)
                result.dirty_bytes = sum(e.length for e in dirty_ext if e.flags & DIRTY)
            else:
                dirty = [True] * n
                result.dirty_bytes = sum(
                    e.length for e in extents[BASE_ALLOCATION] if not e.flags & STATE_ZERO
                )
            span = partial(_span, chunk=chunk, size=size)

            # Known-zero chunks store nothing, dirty or not: a disk shrunk and grown back
            # to the parent's size reads zeros past the cut, but QEMU does not mark a
            # truncation dirty, so the parent's data there is stale. Other clean chunks
            # keep the parent's references.
            keep = [not d and a for d, a in zip(dirty, data, strict=True)]
            for first, count in _runs(keep, True):
                dw.keep_parent(*span(first, count))
                done += span(first, count)[1]
            zero = [not a for a in data]
            for first, count in _runs(zero, True):
                dw.put_zero(*span(first, count))
                done += span(first, count)[1]
            job.progress(f"pull {disk.name}", done, total)
            reads = [span(i, 1) for i in range(n) if dirty[i] and data[i]]
            for offset, payload in reader.read_parallel(reads, _READ_CONNECTIONS):
                dw.put_chunk(offset, payload)  # the reader's own buffer: no copy
                result.bytes_read += len(payload)
                done += len(payload)
                job.progress(f"pull {disk.name}", done, total)
        stats = dw.finish()
        result.bytes_uploaded = stats.bytes_uploaded
        result.chunks_new = stats.chunks_new
        result.chunks_zero = stats.chunks_zero
        result.chunks_parent = stats.chunks_parent


def _layout(disks: Sequence[DiskInfo]) -> dict[str, Any]:
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


def _trim(job: _Job, keep_from: str) -> None:
    """Delete checkpoints older than the one just committed (and stale vmvault bitmaps)."""
    try:
        bitmaps = node_bitmaps(job.qmp, [d.node for d in job.disks])
        actions: list[dict[str, Any]] = []
        for disk in job.disks:
            actions += cp.trim_actions(cp.parse_chain(disk.node, bitmaps[disk.node]), keep_from)
        job.qmp.transaction(actions)
    except QmpError as err:
        # The backup is committed; extra checkpoints only cost memory until the next trim.
        log.warning("domain %s: trimming old checkpoints failed: %s", job.domain, err)
