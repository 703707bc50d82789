"""Garbage collection: mark every chunk and pack the manifests reference, sweep the rest.

Packs (format 2) are deleted whole, once no index references any fragment in them;
nothing is ever rewritten to free space (docs/repository-format.md section 25).

Safety against backups in flight has two layers (docs/repository-format.md, "GC safety"):

1. GC runs under an *exclusive* lock, which cannot be taken while any backup holds
   its *shared* lease (see storage.locks). So no writer can deduplicate against a
   chunk GC is about to delete, and no writer's fresh chunk looks unreferenced.
2. A grace window: nothing younger than ``grace`` seconds (chunks, index objects of
   unfinished backups) is deleted, even when unreferenced. It covers a writer whose
   lease lapsed without its knowledge (clock jumps, a stopped process); such a
   writer also finds its lease lapsed at commit and fails instead of committing.

If any index of a backup cannot be read, GC stops before deleting anything: a mark
phase that missed references must never drive a sweep. A backup whose manifest is
damaged (present but unreadable) may still be repaired and restored, so its chunks are
marked through the index objects in its directory; if one of those cannot be read
either, GC stops likewise and names it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from vmvault.storage.backends import ObjectInfo
from vmvault.storage.disk_reader import load_index_object, referenced_objects
from vmvault.storage.errors import CorruptObjectError, StorageError
from vmvault.storage.format import (
    BACKUPS_PREFIX,
    CHUNKS_PREFIX,
    INDEX_SUFFIX,
    MANIFEST_NAME,
    parse_backup_key,
)
from vmvault.storage.locks import DEFAULT_GRACE, Lease, list_locks
from vmvault.storage.progress import Progress
from vmvault.storage.region_store import PACKS_PREFIX
from vmvault.storage.repository import Repository

log = logging.getLogger(__name__)


class GcAbortedError(StorageError):
    """GC stopped before sweeping because the mark phase was incomplete. Not retryable
    until the damaged object is dealt with (run ``vmvault verify``)."""


@dataclass
class GcReport:
    """What one GC run found and did."""

    backups: int = 0
    damaged_backups: int = 0
    chunks_total: int = 0
    chunks_referenced: int = 0
    chunks_deleted: int = 0
    bytes_deleted: int = 0
    chunks_in_grace: int = 0
    packs_total: int = 0
    packs_referenced: int = 0
    packs_deleted: int = 0
    packs_in_grace: int = 0
    orphan_objects_deleted: int = 0
    orphan_objects_in_grace: int = 0
    locks_removed: int = 0
    temp_files_deleted: int = 0
    temp_files_in_grace: int = 0
    empty_dirs_removed: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> GcReport:
        """The report ``to_json`` gave (a queued gc's result)."""
        return cls(**doc)


def collect_garbage(
    repo: Repository,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> GcReport:
    """Mark and sweep under the exclusive lock; see the module docstring for the rules."""
    lease = Lease(repo.backend, "exclusive", "gc", repo.lease_ttl).acquire()
    try:
        return _run(repo, lease, grace, dry_run, progress)
    finally:
        lease.release()


def _mark_damaged(
    repo: Repository,
    domain: str,
    backup_id: str,
    objects: list[ObjectInfo],
    marked: set[str],
    why: Exception,
) -> None:
    """Mark the chunks of a backup whose manifest is damaged, through its index objects.

    Indexes live only at ``backups/<domain>/<id>/<disk>.index`` (the manifest cannot
    point elsewhere), so those in the directory are every index the manifest could name.
    """
    for o in objects:
        if not o.key.endswith(INDEX_SUFFIX):
            continue
        try:
            index = load_index_object(repo, o.key)
        except StorageError as err:
            raise GcAbortedError(
                f"gc stopped, nothing deleted: the manifest of backup {backup_id} of {domain} "
                f"is damaged ({why}) and its index {o.key} cannot be read either ({err}), so "
                "the chunks it may still need are unknown. Run 'vmvault verify'; if the "
                f"backup is beyond repair, delete backups/{domain}/{backup_id}/ by hand"
            ) from err
        marked.update(referenced_objects(index))


@dataclass
class _Sweep:
    """The objects under one prefix: how many, how many unmarked but young, which go."""

    total: int = 0
    in_grace: int = 0
    doomed: list[ObjectInfo] = field(default_factory=list)


def _unmarked(objects: Iterable[ObjectInfo], marked: set[str], cutoff: datetime) -> _Sweep:
    sweep = _Sweep()
    for info in objects:
        sweep.total += 1
        if info.key in marked:
            continue
        if info.modified >= cutoff:
            sweep.in_grace += 1
        else:
            sweep.doomed.append(info)
    return sweep


def _run(
    repo: Repository, lease: Lease, grace: float, dry_run: bool, progress: Progress | None
) -> GcReport:
    report = GcReport(dry_run=dry_run)
    started = datetime.now(UTC)
    cutoff = started - timedelta(seconds=grace)
    backend = repo.backend

    # --- mark ------------------------------------------------------------------
    groups: dict[tuple[str, str], list[ObjectInfo]] = defaultdict(list)
    for info in backend.list(BACKUPS_PREFIX):
        parsed = parse_backup_key(info.key)
        if parsed is None:
            log.warning("gc: ignoring unexpected object %s", info.key)
            continue
        groups[(parsed[0], parsed[1])].append(info)
    committed = {
        k for k, objs in groups.items() if any(o.key.endswith("/" + MANIFEST_NAME) for o in objs)
    }
    marked: set[str] = set()
    for n, (domain, backup_id) in enumerate(sorted(committed), 1):
        try:
            try:
                manifest = repo.load_manifest(domain, backup_id)
            except CorruptObjectError as err:
                log.warning(
                    "gc: manifest of backup %s of %s is damaged (%s); keeping every chunk "
                    "its index objects reference (run 'vmvault verify')",
                    backup_id,
                    domain,
                    err,
                )
                report.damaged_backups += 1
                _mark_damaged(repo, domain, backup_id, groups[(domain, backup_id)], marked, err)
            else:
                for disk in manifest.disks:
                    marked.update(referenced_objects(repo.disk_reader(manifest, disk.name).index))
        except GcAbortedError:
            raise
        except StorageError as err:
            raise GcAbortedError(
                f"gc stopped, nothing deleted: cannot read backup {backup_id} of {domain}: "
                f"{err} (run 'vmvault verify')"
            ) from err
        if progress:
            progress("mark", n, len(committed))
    report.backups = len(committed)
    report.chunks_referenced = sum(1 for k in marked if k.startswith(CHUNKS_PREFIX))
    report.packs_referenced = len(marked) - report.chunks_referenced

    # --- sweep -----------------------------------------------------------------
    doomed: list[str] = []
    for key_group, objs in groups.items():
        if key_group in committed:
            continue
        # A backup directory without a manifest: aborted or killed writer.
        for o in objs:
            if o.modified < cutoff:
                doomed.append(o.key)
                report.orphan_objects_deleted += 1
            else:
                report.orphan_objects_in_grace += 1
    chunks = _unmarked(backend.list(CHUNKS_PREFIX), marked, cutoff)
    packs = _unmarked(backend.list(PACKS_PREFIX), marked, cutoff)
    report.chunks_total, report.chunks_in_grace = chunks.total, chunks.in_grace
    report.packs_total, report.packs_in_grace = packs.total, packs.in_grace
    report.chunks_deleted, report.packs_deleted = len(chunks.doomed), len(packs.doomed)
    report.bytes_deleted = sum(i.size for i in chunks.doomed + packs.doomed)
    doomed += [i.key for i in chunks.doomed + packs.doomed]

    if not dry_run:

        def delete(key: str) -> None:
            # Never delete on a lapsed lock: a backup may have started since and
            # deduplicated against this very chunk. Checked per object, because a long
            # sweep can outlive the lock when renewals fail.
            lease.check()
            backend.delete(key)

        total = len(doomed)
        for done, _ in enumerate(repo.pool.map(delete, doomed), 1):
            if progress and (done % 64 == 0 or done == total):
                progress("sweep", done, total)
        now = datetime.now(UTC)
        for other in list_locks(backend):
            if other.key != lease.key and not other.live(now):
                backend.delete(other.key)
                report.locks_removed += 1
    # Last, what killed writers left that is not an object (file:// temp files and the
    # directories emptied above or by them), under the same grace rule.
    lease.check()
    litter = backend.sweep_litter(cutoff, dry_run=dry_run)
    report.temp_files_deleted = litter.temp_files_deleted
    report.temp_files_in_grace = litter.temp_files_in_grace
    report.empty_dirs_removed = litter.empty_dirs_removed
    return report
