"""Reading one disk of one backup, region by region, whatever the format version.

A version 1 index is read as ZERO and LEGACY regions (``from_v1_index``), a version 2
index as it is; every caller (restore, demo, GC's mark, verify, the next backup's
planning) sees one ``DiskIndex``. Reads go through storage/region_store.py::

    manifest v1 → "VMVI" index → ZERO | LEGACY (v1 chunk, plain digest)
    manifest v2 → "VMV2" index → ZERO | LEGACY | CHUNK | PATCHED (RD, tree hash)

What a restore's read-back compares with (``expected``, ``digest``): the plain digest for
a version 1 backup, the region digest (RD) for a version 2 one. A LEGACY region of a
version 2 backup has no RD in its index: the reader checks it against its v1 digest and
then records its RD (``expected`` is filled as regions are read, before they are written).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING

from vmvault.storage.errors import CorruptObjectError, ObjectNotFoundError, StorageError
from vmvault.storage.format import (
    INDEX_MAGIC,
    MAX_INDEX_ENTRIES,
    MAX_INDEX_V2_BYTES,
    Manifest,
    decode_index,
    index_body_limit,
    stored_limit,
)
from vmvault.storage.index_v2 import INDEX_V2_MAGIC, DiskIndex, decode_index_v2, from_v1_index
from vmvault.storage.region import Kind, Region
from vmvault.storage.region_store import chunk_name_key, pack_key

if TYPE_CHECKING:
    from vmvault.storage.repository import Repository


def load_disk_index(repo: Repository, manifest: Manifest, disk_name: str) -> DiskIndex:
    """The index of one disk of a backup, checked against its manifest (size, digest)."""
    disk = manifest.disk(disk_name)
    if manifest.version >= 2:
        assert disk.index_size is not None  # Manifest.from_json requires it
        limit = disk.index_size
    else:
        limit = index_body_limit(disk.virtual_size, manifest.chunk_size)
    try:
        stored = repo.backend.get(disk.index_key, max_size=stored_limit(limit))
        body = repo.codec.unseal(disk.index_key, stored, limit=limit)
    except ObjectNotFoundError:
        raise ObjectNotFoundError(
            f"index of disk {disk_name} of backup {manifest.backup_id} "
            f"({manifest.domain}) is missing: {disk.index_key}"
        ) from None
    if repo.codec.digest(body) != disk.index_digest:
        raise CorruptObjectError(
            f"index {disk.index_key} does not match the digest in its manifest (edited or damaged)"
        )
    if manifest.version >= 2:
        return decode_index_v2(
            body, disk.index_key, manifest.chunk_size, disk.virtual_size, repo.encrypted
        )
    virtual_size, chunk_size, entries = decode_index(body, disk.index_key)
    if virtual_size != disk.virtual_size or chunk_size != manifest.chunk_size:
        raise CorruptObjectError(f"index {disk.index_key} disagrees with its manifest on sizes")
    return from_v1_index(
        virtual_size, chunk_size, [e.digest for e in entries], [e.from_parent for e in entries]
    )


def load_index_object(repo: Repository, key: str) -> DiskIndex:
    """An index read without its manifest (GC, for a backup whose manifest is damaged):
    either version, by its magic; only the object's own checks apply."""
    limit = max(
        index_body_limit(MAX_INDEX_ENTRIES * repo.chunk_size, repo.chunk_size),
        MAX_INDEX_V2_BYTES,
    )
    body = repo.codec.unseal(key, repo.backend.get(key, max_size=stored_limit(limit)), limit)
    if body[:4] == INDEX_V2_MAGIC:
        return decode_index_v2(body, key, repo.chunk_size, encrypted=repo.encrypted)
    if body[:4] != INDEX_MAGIC:
        raise CorruptObjectError(f"index {key}: bad magic {body[:4]!r}")
    virtual_size, chunk_size, entries = decode_index(body, key)
    if chunk_size != repo.chunk_size:
        raise CorruptObjectError(f"index {key} has chunk size {chunk_size}, not the repository's")
    return from_v1_index(
        virtual_size, chunk_size, [e.digest for e in entries], [e.from_parent for e in entries]
    )


def base_chunk_name(r: Region) -> str | None:
    """Hex name of the chunk object a region's bytes are based on; None for zeros."""
    if r.kind is Kind.ZERO or (r.kind is Kind.PATCHED and not r.base_length):
        return None
    return (r.digest if r.kind is Kind.LEGACY else r.base).hex()


def referenced_objects(index: DiskIndex) -> Iterator[str]:
    """Keys of every chunk and pack an index needs (GC's mark)."""
    for r in index.regions:
        if r.kind is Kind.LEGACY:
            yield chunk_name_key(r.digest)
        elif r.kind in (Kind.CHUNK, Kind.PATCHED):
            if r.base_length:
                yield chunk_name_key(r.base)
            for f in r.fragments:
                yield pack_key(f.pack)


class DiskReader:
    """One disk of one committed backup: its regions, read and checked."""

    def __init__(self, repo: Repository, manifest: Manifest, disk_name: str) -> None:
        self.repo = repo
        self.manifest = manifest
        self.disk_name = disk_name
        self.index = load_disk_index(repo, manifest, disk_name)
        self.region_size = manifest.chunk_size
        self.v2 = manifest.version >= 2
        self.digest: Callable[[bytes], str] = (
            repo.regions.region_digest_hex if self.v2 else repo.codec.digest
        )
        # What the read-back of each region must hash to with ``digest``; None: zeros.
        self.expected: list[str | None] = [self._expected(r) for r in self.index.regions]

    def _expected(self, r: Region) -> str | None:
        if r.kind is Kind.ZERO:
            return None
        if r.kind is Kind.LEGACY and self.v2:
            return "(not read yet)"  # replaced by read_region before the region is written
        return r.digest.hex()

    def where(self, i: int) -> str:
        m = self.manifest
        return (
            f"{m.domain} backup {m.backup_id} disk {self.disk_name} offset {i * self.region_size}"
        )

    def read_region(self, i: int, check: bool = True) -> bytes | None:
        """Region ``i``'s bytes (None: zeros). ``check=False`` leaves the final comparison
        with the index to the caller (a restore's read-back); a LEGACY region of a
        version 2 backup is always checked, since its RD is only learnt from its bytes."""
        r = self.index.regions[i]
        try:
            if r.kind is Kind.ZERO:
                return None
            if r.kind is Kind.LEGACY:
                data = self.repo.read_chunk(r.digest.hex(), check=check or self.v2)
                if len(data) != r.length:
                    raise CorruptObjectError(
                        f"chunk {r.digest.hex()} has {len(data)} bytes, expected {r.length}"
                    )
                if self.v2:
                    self.expected[i] = self.digest(data)
                return data
            return self.repo.regions.read_region(r, check)
        except StorageError as err:
            raise type(err)(f"{self.where(i)}: {err}") from err

    def regions(self, prefetch: int = 8, check: bool = True) -> Iterator[tuple[int, bytes | None]]:
        """``(offset, bytes or None)`` per region in order, at most ``prefetch`` ahead."""
        prefetch = max(1, prefetch)
        count = len(self.index.regions)
        window: deque[tuple[int, Future[bytes | None] | None]] = deque()
        pool = self.repo.pool
        next_i = 0
        try:
            while next_i < count or window:
                while next_i < count and len(window) < prefetch:
                    zero = self.index.regions[next_i].kind is Kind.ZERO
                    fut = None if zero else pool.submit(self.read_region, next_i, check)
                    window.append((next_i, fut))
                    next_i += 1
                i, fut = window.popleft()
                yield i * self.region_size, (None if fut is None else fut.result())
        finally:
            for _, fut in window:
                if fut is not None:
                    fut.cancel()

    def blame(self, i: int) -> None:
        """Raise the repository's own error (naming the place) when region ``i``'s stored
        pieces are damaged; return when they rebuild to the index's digest."""
        if 0 <= i < len(self.index.regions):
            self.read_region(i, check=True)
