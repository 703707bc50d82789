"""Writing one backup into the repository: chunks, then each disk's index, then the manifest.

The write order of docs/repository-format.md: chunks and packs (deduplicated, in a
thread pool), durably; then the disk's index; the manifest last, under the shared lease
that keeps GC away until commit or abort. A version 2 repository's disks are written by
storage/region_writer.py; ``DiskWriter`` here writes version 1 indexes, which only
``Repository.open_backup(..., allow_v1=True)`` asks for (compatibility tests and tools).
Reading is storage/repository.py; a writer is started with ``Repository.open_backup``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vmvault.storage.backends import Blob
from vmvault.storage.disk_reader import load_disk_index
from vmvault.storage.errors import WriterError
from vmvault.storage.format import (
    DiskStats,
    IndexEntry,
    Kind,
    Manifest,
    ManifestDisk,
    check_name,
    chunk_count,
    chunk_key,
    encode_index,
    index_key,
)
from vmvault.storage.index_v2 import DiskIndex
from vmvault.storage.locks import Lease
from vmvault.storage.pool_tasks import TaskGroup
from vmvault.storage.region import Kind as RegionKind
from vmvault.storage.region_writer import RegionDiskWriter

if TYPE_CHECKING:
    from vmvault.storage.repository import Repository


# Region kinds whose base is a version 2 chunk object.
_CHUNKED = (RegionKind.CHUNK, RegionKind.PATCHED)


class KnownChunks:
    """Digests known to be stored, shared by the disks of one backup (thread-safe)."""

    def __init__(self) -> None:
        self._digests: set[str] = set()
        self._lock = threading.Lock()

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._digests

    def add(self, digest: str) -> None:
        with self._lock:
            self._digests.add(digest)

    def add_all(self, digests: Iterable[str]) -> None:
        with self._lock:
            self._digests.update(digests)


class BackupWriter:
    """One backup being written. Commit writes the manifest; abort leaves no manifest."""

    def __init__(
        self,
        repo: Repository,
        domain: str,
        backup_id: str,
        parent: Manifest | None,
        kind: Kind,
        reason: str,
        checkpoint: str | None,
        created: datetime,
        lease: Lease,
    ) -> None:
        self.repo = repo
        self.domain = domain
        self.backup_id = backup_id
        self.parent = parent
        self.kind: Kind = kind
        self.reason = reason
        self.checkpoint = checkpoint
        self.created = created
        self.lease = lease
        self.disks: dict[str, DiskWriter | RegionDiskWriter] = {}
        # The manifest and index version this backup writes: the repository's.
        self.version = repo.config.version
        self._done = False
        # Digests known to be stored: the parent's (GC cannot run while we hold the
        # lease) and every chunk this backup stored or found. Saves HEAD requests.
        self.known = KnownChunks()
        self.zero_chunk = bytes(repo.chunk_size)

    def __enter__(self) -> BackupWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            self.abort()

    def check_open(self) -> None:
        """``WriterError`` once the backup is committed or aborted."""
        if self._done:
            raise WriterError(f"backup {self.backup_id} is already committed or aborted")

    def open_disk(self, name: str, virtual_size: int, fmt: str) -> DiskWriter | RegionDiskWriter:
        self.check_open()
        check_name(name, "disk")
        if name in self.disks:
            raise WriterError(f"disk {name} opened twice in backup {self.backup_id}")
        if virtual_size <= 0:
            raise WriterError(f"disk {name}: virtual size must be positive, got {virtual_size}")
        if self.version >= 2:
            return self._open_region_disk(name, virtual_size, fmt)
        parent_entries: list[IndexEntry] | None = None
        if self.parent is not None:
            pdisk = next((d for d in self.parent.disks if d.name == name), None)
            if pdisk is not None and pdisk.virtual_size == virtual_size:
                parent_entries = [
                    IndexEntry(r.digest.hex() if r.kind is RegionKind.LEGACY else None)
                    for r in load_disk_index(self.repo, self.parent, name).regions
                ]
                self.known.add_all(e.digest for e in parent_entries if e.digest)
        writer = DiskWriter(self, name, virtual_size, fmt, parent_entries)
        self.disks[name] = writer
        return writer

    def _open_region_disk(self, name: str, virtual_size: int, fmt: str) -> RegionDiskWriter:
        parent_index: DiskIndex | None = None
        if self.parent is not None and any(d.name == name for d in self.parent.disks):
            # Any size: a resized disk keeps every region whose extent did not change.
            parent_index = load_disk_index(self.repo, self.parent, name)
            self.known.add_all(
                r.base.hex() for r in parent_index.regions if r.kind in _CHUNKED and r.base_length
            )
        writer = RegionDiskWriter(self, name, virtual_size, fmt, parent_index)
        self.disks[name] = writer
        return writer

    def commit(
        self, layout: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
    ) -> Manifest:
        """Write the manifest, last; the backup exists from this moment on."""
        self.check_open()
        if not self.disks:
            raise WriterError(f"backup {self.backup_id} of {self.domain} has no disks")
        unfinished = [n for n, d in self.disks.items() if d.result is None]
        if unfinished:
            raise WriterError(f"backup {self.backup_id}: disks not finished: {unfinished}")
        try:
            # If the lease lapsed, GC may have deleted chunks we deduplicated against.
            self.lease.check()
            manifest = Manifest(
                backup_id=self.backup_id,
                domain=self.domain,
                parent=self.parent.backup_id if self.parent else None,
                kind=self.kind,
                reason=self.reason,
                checkpoint=self.checkpoint,
                created=self.created,
                finished=datetime.now(UTC),
                chunk_size=self.repo.chunk_size,
                disks=[d.result for d in self.disks.values() if d.result is not None],
                layout=dict(layout or {}),
                extra=dict(extra or {}),
                version=self.version,
            )
            data = self.repo.seal_manifest(manifest)
            if not self.repo.backend.put(manifest.key, data, if_absent=True):
                raise WriterError(f"manifest {manifest.key} already exists")
        except BaseException:
            self.abort()
            raise
        self._done = True
        self.lease.release()
        return manifest

    def abort(self) -> None:
        """Give up: no manifest is written; uploaded chunks are left for GC."""
        if self._done:
            return
        self._done = True
        for d in self.disks.values():
            d.cancel()
        self.lease.release()


class DiskWriter:
    """Chunks of one disk, given in any order, each exactly once."""

    def __init__(
        self,
        backup: BackupWriter,
        name: str,
        virtual_size: int,
        fmt: str,
        parent_entries: list[IndexEntry] | None,
    ) -> None:
        self.backup = backup
        self.repo = backup.repo
        self.name = name
        self.virtual_size = virtual_size
        self.format = fmt
        self.chunk_size = self.repo.chunk_size
        self.count = chunk_count(virtual_size, self.chunk_size)
        self._parent = parent_entries
        self._entries: list[IndexEntry | None] = [None] * self.count
        self._given = bytearray(self.count)
        self._lock = threading.Lock()
        # In flight = submitted, not yet stored. Each holds one chunk (plus its compressed
        # and encrypted copies) in memory: this bounds the writer's memory.
        self._tasks = TaskGroup(
            self.repo.pool, self.repo.concurrency + 2, f"disk {name}: storing a chunk failed"
        )
        self._stats = {"new": 0, "dedup": 0, "zero": 0, "parent": 0, "read": 0, "uploaded": 0}
        self.result: ManifestDisk | None = None

    # -- range checks ------------------------------------------------------

    def _indexes(self, offset: int, length: int, what: str) -> range:
        cs = self.chunk_size
        end = offset + length
        if offset < 0 or length <= 0 or offset % cs or end > self.virtual_size:
            raise WriterError(
                f"disk {self.name}: {what} at offset {offset} length {length} is not a "
                f"chunk-aligned range inside {self.virtual_size} bytes (chunk size {cs})"
            )
        if end % cs and end != self.virtual_size:
            raise WriterError(f"disk {self.name}: {what} at offset {offset} ends mid-chunk")
        return range(offset // cs, -(-end // cs))

    def _claim(self, idx: range, what: str) -> None:
        with self._lock:
            for i in idx:
                if self._given[i]:
                    raise WriterError(
                        f"disk {self.name}: chunk at offset {i * self.chunk_size} given twice "
                        f"({what})"
                    )
            for i in idx:
                self._given[i] = 1

    def _check(self) -> None:
        self.backup.check_open()
        if self.result is not None:
            raise WriterError(f"disk {self.name} is already finished")
        self._tasks.check()

    # -- the three ways to describe a chunk ---------------------------------

    def put_chunk(self, offset: int, data: Blob) -> None:
        """Store one chunk (hash, compress, encrypt, upload in the pool). Blocks while the
        pool is full. ``data`` may be any bytes-like object; it is used without a copy,
        so the caller must not change it afterwards."""
        self._check()
        idx = self._indexes(offset, len(data), "put_chunk")
        if len(idx) != 1:
            raise WriterError(
                f"disk {self.name}: put_chunk at offset {offset} has {len(data)} bytes; "
                f"give one chunk ({self.chunk_size} bytes, or the tail) per call"
            )
        self._claim(idx, "put_chunk")
        self._tasks.submit(self._store, idx[0], data)

    def put_zero(self, offset: int, length: int) -> None:
        """A chunk-aligned range that reads as zeros: nothing is stored."""
        self._check()
        idx = self._indexes(offset, length, "put_zero")
        self._claim(idx, "put_zero")
        with self._lock:
            for i in idx:
                self._entries[i] = IndexEntry(None)
            self._stats["zero"] += len(idx)

    def keep_parent(self, offset: int, length: int) -> None:
        """A chunk-aligned range unchanged since the parent backup: reuse its entries."""
        self._check()
        if self._parent is None:
            raise WriterError(
                f"disk {self.name}: keep_parent without a parent index of the same size "
                f"(backup {self.backup.backup_id})"
            )
        idx = self._indexes(offset, length, "keep_parent")
        self._claim(idx, "keep_parent")
        with self._lock:
            for i in idx:
                self._entries[i] = IndexEntry(self._parent[i].digest, from_parent=True)
            self._stats["parent"] += len(idx)

    # -- pool side -----------------------------------------------------------

    def _store(self, i: int, data: Blob) -> None:
        repo = self.repo
        n = len(data)
        zero = self.backup.zero_chunk if n == self.chunk_size else bytes(n)
        if data == zero:  # memcmp speed; all-zero chunks are never stored
            with self._lock:
                self._entries[i] = IndexEntry(None)
                self._stats["zero"] += 1
                self._stats["read"] += n
            return
        digest = repo.codec.digest(data)
        key = chunk_key(digest)
        known = self.backup.known
        uploaded = 0
        if digest not in known and not repo.backend.exists(key):
            stored = repo.codec.seal_parts(key, data)
            if repo.backend.put(key, stored, if_absent=True, defer_sync=True):
                uploaded = sum(len(piece) for piece in stored)
        known.add(digest)
        with self._lock:
            self._entries[i] = IndexEntry(digest)
            self._stats["new" if uploaded else "dedup"] += 1
            self._stats["uploaded"] += uploaded
            self._stats["read"] += n

    def cancel(self) -> None:
        """Cancel the uploads not started yet and wait for the rest (the backup aborts)."""
        self._tasks.cancel()

    # -- end -----------------------------------------------------------------

    def finish(self) -> DiskStats:
        """Wait for uploads, check completeness, upload the index. Returns the disk's stats."""
        self._check()
        self._tasks.wait()
        missing = [i for i, e in enumerate(self._entries) if e is None]
        if missing:
            raise WriterError(
                f"disk {self.name}: {len(missing)} chunks were never given, first at offset "
                f"{missing[0] * self.chunk_size}"
            )
        entries = [e for e in self._entries if e is not None]
        # Chunks first, durably, then the index that references them (write order).
        self.repo.backend.flush()
        body = encode_index(self.virtual_size, self.chunk_size, entries)
        key = index_key(self.backup.domain, self.backup.backup_id, self.name)
        self.repo.backend.put(key, self.repo.codec.seal(key, body))
        s = self._stats
        stats = DiskStats(
            chunks_total=self.count,
            chunks_new=s["new"],
            chunks_dedup=s["dedup"],
            chunks_zero=s["zero"],
            chunks_parent=s["parent"],
            bytes_read=s["read"],
            bytes_uploaded=s["uploaded"],
        )
        self.result = ManifestDisk(
            name=self.name,
            virtual_size=self.virtual_size,
            format=self.format,
            index_key=key,
            index_digest=self.repo.codec.digest(body),
            chunks=self.count,
            stats=stats,
        )
        return stats
