"""Writing one backup into the repository: chunks, then each disk's index, then the manifest.

The write order of docs/repository-format.md: chunks and packs (deduplicated, in a
thread pool), durably; then the disk's index; the manifest last, under the shared lease
that keeps GC away until commit or abort. Each disk is written by
storage/region_writer.py (format 2; version 1 repositories take no new backups).
Reading is storage/repository.py; a writer is started with ``Repository.open_backup``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vmvault.storage.disk_reader import load_disk_index
from vmvault.storage.errors import WriterError
from vmvault.storage.format import MANIFEST_VERSION, Kind, Manifest, check_name
from vmvault.storage.index_v2 import DiskIndex
from vmvault.storage.locks import Lease
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
        self.disks: dict[str, RegionDiskWriter] = {}
        self._done = False
        # Digests known to be stored: the parent's (GC cannot run while we hold the
        # lease) and every chunk this backup stored or found. Saves HEAD requests.
        self.known = KnownChunks()

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

    def open_disk(self, name: str, virtual_size: int, fmt: str) -> RegionDiskWriter:
        self.check_open()
        check_name(name, "disk")
        if name in self.disks:
            raise WriterError(f"disk {name} opened twice in backup {self.backup_id}")
        if virtual_size <= 0:
            raise WriterError(f"disk {name}: virtual size must be positive, got {virtual_size}")
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
        self,
        layout: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        finished: datetime | None = None,
        before_write: Callable[[Manifest], None] | None = None,
    ) -> Manifest:
        """Write the manifest, last; the backup exists from this moment on.

        ``finished`` defaults to now (a copy keeps the source's); ``before_write`` sees
        the manifest before it is written and may raise to abort (a copy re-reads the
        regions it wrote through it).
        """
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
                finished=finished or datetime.now(UTC),
                chunk_size=self.repo.chunk_size,
                disks=[d.result for d in self.disks.values() if d.result is not None],
                layout=dict(layout or {}),
                extra=dict(extra or {}),
                version=MANIFEST_VERSION,
            )
            if before_write is not None:
                before_write(manifest)
                self.lease.check()
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
