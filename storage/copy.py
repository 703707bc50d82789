"""Copying backups from one repository to another (``vmvault copy``), resumably.

docs/repository-format.md section 29. Two ways, chosen per run by the key material:

* **raw** — both repositories unencrypted, or both encrypted with the same master key:
  object names (keyed digests) and sealing agree, so chunks, packs and indexes are copied
  byte for byte, and only the objects the target lacks (one listing of each side);
* **rebuild** — the keys differ: every backup is written again on the target through
  the format 2 writer, from the source's regions (decoded with the source key, re-hashed
  and sealed with the target's). A region whose index entry equals the parent's is KEPT
  (incremental structure), every other one is stored as a content-addressed chunk
  (dedup on the target). The resulting index depends only on the data and the target's
  parent, so a second copy running at once writes the same index body.

Both: parents before children; each backup's regions re-read on the target and checked
against its index before its manifest is written, last (``if_absent``: a copy that lost
a race just skips it); under a shared lease on each side, so no GC sweeps what is being
copied or read. A killed copy leaves objects without a manifest: the next run skips
what is there (raw) or finds its chunks stored (rebuild), and GC sweeps the rest.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

from vmvault.storage.disk_reader import DiskReader, load_disk_index, referenced_objects
from vmvault.storage.errors import (
    BackupNotFoundError,
    CopyError,
    ObjectNotFoundError,
    StorageError,
)
from vmvault.storage.format import (
    CHUNKS_PREFIX,
    MAX_MANIFEST_BYTES,
    Manifest,
    check_backup_id,
    index_body_limit,
    stored_limit,
)
from vmvault.storage.index_v2 import DiskIndex
from vmvault.storage.progress import Progress, no_progress
from vmvault.storage.region import Kind, Region
from vmvault.storage.region_store import PACKS_PREFIX
from vmvault.storage.repository import Repository
from vmvault.storage.writer import BackupWriter

__all__ = ["CopyReport", "copy_backups", "same_key_material", "select_backups"]


@dataclass
class CopyReport:
    """What a copy did. Objects count chunks, packs, indexes and manifests."""

    source: str
    target: str
    mode: str  # "raw" or "rebuild"
    copied: list[str] = field(default_factory=list)  # "domain/backup_id", in copy order
    skipped: list[str] = field(default_factory=list)  # already on the target
    objects_copied: int = 0
    bytes_copied: int = 0
    objects_skipped: int = 0
    bytes_skipped: int = 0
    regions_verified: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> CopyReport:
        """The report a copy job returned; members it does not know (a scheduled copy's
        ``pruned``) are left out."""
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


def same_key_material(source: Repository, target: Repository) -> bool:
    """True when objects can be copied as they are: equal chunk sizes and the same
    digest and sealing keys (both unencrypted, or the same master key)."""
    if source.chunk_size != target.chunk_size:
        return False
    if source.codec.keys is None or target.codec.keys is None:
        return source.codec.keys is None and target.codec.keys is None
    return source.codec.keys == target.codec.keys


def select_backups(
    source: Repository, domains: Iterable[str] | None = None, backup_id: str | None = None
) -> list[Manifest]:
    """The backups to copy, parents before children: every readable backup (of
    ``domains`` unless None), or ``backup_id`` and its ancestors.

    An empty ``domains`` selects nothing: a copy job whose patterns match no domain
    must not turn into a copy of the whole repository."""
    manifests = source.list_manifests()
    if domains is not None:
        wanted = set(domains)
        manifests = [m for m in manifests if m.domain in wanted]
    if backup_id is None:
        return manifests
    check_backup_id(backup_id)
    by_id = {m.backup_id: m for m in manifests}
    if backup_id not in by_id:
        raise BackupNotFoundError(f"no committed backup {backup_id} in {source.url}")
    chain: list[Manifest] = []
    current: Manifest | None = by_id[backup_id]
    while current is not None and current not in chain:
        chain.append(current)
        current = by_id.get(current.parent) if current.parent else None
    return sorted(chain, key=lambda m: m.sort_key)


def copy_backups(
    source: Repository,
    target: Repository,
    manifests: list[Manifest],
    progress: Progress = no_progress,
) -> CopyReport:
    """Copy ``manifests`` (parents first, as ``select_backups`` returns them) to ``target``."""
    if target.config.version < 2:
        raise CopyError(
            f"{target.url} is a format version 1 repository: run 'vmvault upgrade' on it first"
        )
    if source.chunk_size != target.chunk_size:
        raise CopyError(
            f"{source.url} has chunk size {source.chunk_size} and {target.url} "
            f"{target.chunk_size}: a copy needs equal chunk sizes (init the target with "
            f"--chunk-size {source.chunk_size})"
        )
    raw = same_key_material(source, target)
    report = CopyReport(source.url, target.url, "raw" if raw else "rebuild")
    present = {(d, b) for d, b, _ in target.manifest_keys()}
    copier = _RawCopier(source, target, report) if raw else None
    for i, m in enumerate(manifests):
        name = f"{m.domain}/{m.backup_id}"
        progress(f"copy {name}", i, len(manifests))
        if (m.domain, m.backup_id) in present:
            report.skipped.append(name)
            continue
        src_lease = source.lease_on(m, f"copy {name} to {target.url}")
        if src_lease is None:
            continue  # pruned from the source since it was listed
        try:
            done = (
                copier.copy(m, progress)
                if copier is not None
                else _rebuild(source, target, m, report, progress)
            )
        finally:
            src_lease.release()
        (report.copied if done else report.skipped).append(name)
        present.add((m.domain, m.backup_id))
    progress("copy", len(manifests), len(manifests))
    return report


def _verify_on_target(
    target: Repository, manifest: Manifest, report: CopyReport, progress: Progress
) -> None:
    """Re-read every region of ``manifest`` from ``target``, checked against its index
    (raises naming the damaged place)."""
    for disk in manifest.disks:
        reader = DiskReader(target, manifest, disk.name)
        total = len(reader.index.regions)
        for n, _ in enumerate(reader.regions(prefetch=target.concurrency, check=True)):
            report.regions_verified += 1
            if n % 64 == 0:
                progress(f"verify {manifest.domain}/{disk.name}", n, total)


class _RawCopier:
    """Byte-for-byte copies: the objects the target lacks, then the manifest."""

    def __init__(self, source: Repository, target: Repository, report: CopyReport) -> None:
        self.source = source
        self.target = target
        self.report = report
        # One listing per side: sizes are the read limits, presence the skip test.
        self.source_sizes = _sizes(source, (CHUNKS_PREFIX, PACKS_PREFIX))
        self.target_sizes = _sizes(target, (CHUNKS_PREFIX, PACKS_PREFIX))
        self._lock = threading.Lock()  # objects are copied from the target's pool

    def copy(self, m: Manifest, progress: Progress) -> bool:
        lease = self.target.lease_on(None, f"copy {m.domain}/{m.backup_id} from {self.source.url}")
        assert lease is not None
        try:
            wanted: dict[str, None] = {}
            for disk in m.disks:
                wanted.update(
                    dict.fromkeys(referenced_objects(load_disk_index(self.source, m, disk.name)))
                )
            keys = list(wanted)
            total = len(keys)
            futures = [self.target.pool.submit(self._copy_object, k) for k in keys]
            for n, fut in enumerate(futures):
                fut.result()
                progress(f"copy {m.domain}/{m.backup_id} objects", n + 1, total)
            # The indexes, after what they reference (durably: file puts fsync).
            self.target.backend.flush()
            for disk in m.disks:
                limit = disk.index_size or index_body_limit(disk.virtual_size, m.chunk_size)
                self._copy_whole(disk.index_key, stored_limit(limit))
            self.target.backend.flush()
            _verify_on_target(self.target, m, self.report, progress)
            lease.check()
            data = self.source.backend.get(m.key, max_size=stored_limit(MAX_MANIFEST_BYTES))
            if not self.target.backend.put(m.key, data, if_absent=True):
                return False  # another copy committed it meanwhile (same bytes)
            self.report.objects_copied += 1
            self.report.bytes_copied += len(data)
            return True
        finally:
            lease.release()

    def _copy_object(self, key: str) -> None:
        with self._lock:
            there = self.target_sizes.get(key)
            if there is not None:
                self.report.objects_skipped += 1
                self.report.bytes_skipped += there
                return
        size = self.source_sizes.get(key)
        if size is None:
            raise ObjectNotFoundError(f"{self.source.url}: object {key} is missing from the source")
        self._copy_whole(key, size)
        with self._lock:
            self.target_sizes[key] = size

    def _copy_whole(self, key: str, max_size: int) -> None:
        data = self.source.backend.get(key, max_size=max_size)
        stored = self.target.backend.put(key, data, if_absent=True, defer_sync=True)
        with self._lock:
            if stored:
                self.report.objects_copied += 1
                self.report.bytes_copied += len(data)
            else:  # another copy stored it meanwhile (the same bytes: same name, same key)
                self.report.objects_skipped += 1
                self.report.bytes_skipped += len(data)


def _sizes(repo: Repository, prefixes: Iterable[str]) -> dict[str, int]:
    return {info.key: info.size for p in prefixes for info in repo.backend.list(p)}


def _entry(r: Region) -> tuple[Any, ...]:
    """A region's index entry without its "from parent" flag."""
    return (r.kind, r.length, r.digest, r.base, r.base_length, r.base_zero, r.zero, r.fragments)


def _rebuild(
    source: Repository,
    target: Repository,
    m: Manifest,
    report: CopyReport,
    progress: Progress,
) -> bool:
    """Write backup ``m`` again on ``target`` (same id, times, layout) through the writer."""
    parent_src: Manifest | None = None
    parent_dst: Manifest | None = None
    if m.parent is not None:
        try:
            parent_src = source.load_manifest(m.domain, m.parent)
            parent_dst = target.load_manifest(m.domain, m.parent)
        except BackupNotFoundError:
            parent_src = parent_dst = None  # pruned: this copy is complete by itself
    what = f"copy {m.domain}/{m.backup_id} from {source.url}"
    lease = target.lease_on(parent_dst, what)
    if lease is None:  # the parent was pruned from the target meanwhile
        parent_src = parent_dst = None
        lease = target.lease_on(None, what)
        assert lease is not None
    kind = m.kind if parent_dst is not None else "full"
    writer = BackupWriter(
        target, m.domain, m.backup_id, parent_dst, kind, m.reason, m.checkpoint, m.created, lease
    )
    with writer:
        for disk in m.disks:
            reader = DiskReader(source, m, disk.name)
            parent_index = None
            if parent_src is not None and any(d.name == disk.name for d in parent_src.disks):
                parent_index = load_disk_index(source, parent_src, disk.name)
            _rebuild_disk(writer, reader, parent_index, progress)
        stats = [d.result.stats for d in writer.disks.values() if d.result is not None]
        try:
            writer.commit(
                m.layout,
                m.extra,
                finished=m.finished,
                before_write=lambda new: _verify_on_target(target, new, report, progress),
            )
        except StorageError:
            if target.backend.exists(m.key):
                return False  # another copy committed the same backup meanwhile
            raise
    report.objects_copied += sum(s.objects_put for s in stats) + 1
    report.bytes_copied += sum(s.bytes_uploaded for s in stats)
    report.objects_skipped += sum(s.chunks_dedup for s in stats)
    return True


def _rebuild_disk(
    writer: BackupWriter, reader: DiskReader, parent: DiskIndex | None, progress: Progress
) -> None:
    disk = reader.manifest.disk(reader.disk_name)
    dw = writer.open_disk(disk.name, disk.virtual_size, disk.format)
    regions = reader.index.regions
    rs = reader.region_size
    todo: list[int] = []
    for i, r in enumerate(regions):
        mine = dw.parents[i]
        theirs = parent.regions[i] if parent is not None and i < len(parent.regions) else None
        # The target's parent is this parent's copy: a region equal to the source parent's
        # is kept from it (the length check guards a parent written otherwise).
        unchanged = theirs is not None and _entry(r) == _entry(theirs)
        if unchanged and mine is not None and mine.length == r.length:
            dw.keep_parent(i * rs, r.length)
            continue
        if r.kind is Kind.ZERO:
            dw.put_zero(i * rs, r.length)
        else:
            todo.append(i)
    # Read ahead in the source's pool while the target's pool stores: bounded window.
    window: deque[tuple[int, Future[bytes | None]]] = deque()
    pool = reader.repo.pool
    ahead = max(2, reader.repo.concurrency)
    phase = f"copy {reader.manifest.domain}/{disk.name}"
    pending = iter(todo)
    done = 0
    try:
        while True:
            while len(window) < ahead:
                nxt = next(pending, None)
                if nxt is None:
                    break
                window.append((nxt, pool.submit(reader.read_region, nxt, True)))
            if not window:
                break
            i, fut = window.popleft()
            data = fut.result()
            if data is None:
                dw.put_zero(i * rs, regions[i].length)
            else:
                dw.put_chunk(i * rs, data)
            done += 1
            progress(phase, done, len(todo))
    finally:
        for _, fut in window:
            fut.cancel()
    dw.finish()
