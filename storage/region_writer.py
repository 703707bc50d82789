"""Writing one disk of a format 2 backup: plan each region, store what changed.

docs/repository-format.md sections 21-24. The caller (the worker's pull) gives the dirty
and zero sub-blocks of every region, reads only the sub-blocks each plan names, and hands
them over; the writer stores a whole region as a content-addressed chunk (REBASE) or the
read sub-blocks as one fragment in a pack (PATCH), and keeps or zeroes the rest::

    plan(dirty, zero) ──> KEEP / ZERO            recorded at once
                     ──> PATCH, nothing to read  base table fetched, entry built (pool)
                     ──> REBASE / PATCH + read   caller reads plan.read, put_region(i, ...)
    finish()         ──> last pack, flush, then the index (write order, section 10)

``put_chunk`` / ``put_zero`` / ``keep_parent`` describe whole regions, as the version 1
writer's calls do, for callers that have whole regions (benches, tests, tools).
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vmvault.storage.backends import Blob
from vmvault.storage.errors import WriterError
from vmvault.storage.format import DiskStats, ManifestDisk, chunk_count, index_key
from vmvault.storage.index_v2 import DiskIndex, encode_index_v2, region_length
from vmvault.storage.packs import PackWriter
from vmvault.storage.pool_tasks import TaskGroup
from vmvault.storage.region import (
    Action,
    Fragment,
    Kind,
    Mask,
    PackId,
    Region,
    RegionPlan,
    fragment_body,
    fragment_digests,
    full_mask,
    make_chunk,
    mask_bytes,
    patched_region,
    plan_disk_rehome,
    plan_region,
    zero_region,
    zero_sub_blocks,
)
from vmvault.storage.region_store import chunk_name_key

if TYPE_CHECKING:
    from vmvault.storage.writer import BackupWriter

# A region's bytes as the caller holds them (a read's buffer, or anonymous memory).
RegionBytes = bytes | bytearray | mmap.mmap


class RegionDiskWriter:
    """One disk of a version 2 backup. Every region is described exactly once."""

    def __init__(
        self,
        backup: BackupWriter,
        name: str,
        virtual_size: int,
        fmt: str,
        parent: DiskIndex | None,
    ) -> None:
        self.backup = backup
        self.repo = backup.repo
        self.store = self.repo.regions
        self.name = name
        self.virtual_size = virtual_size
        self.format = fmt
        self.region_size = self.repo.chunk_size
        self.count = chunk_count(virtual_size, self.region_size)
        self.lengths = [region_length(virtual_size, self.region_size, i) for i in range(self.count)]
        # The parent's entry per region; past its end (the disk grew) there is none.
        self.parents: list[Region | None] = [
            parent.regions[i] if parent is not None and i < len(parent.regions) else None
            for i in range(self.count)
        ]
        self._parent_packs: dict[PackId, int] = dict(parent.pack_sizes) if parent else {}
        self._regions: list[Region | None] = [None] * self.count
        self._given = bytearray(self.count)
        self._plans: list[RegionPlan | None] = [None] * self.count
        self._taken = bytearray(self.count)  # planned regions settled or in the pool
        self._dirty: list[Mask] = []
        self._zero: list[Mask] = []
        self._rehome: frozenset[PackId] = frozenset()
        self._tables: dict[bytes, tuple[bytes, ...]] = {}
        self._packer = PackWriter(self.repo.backend, self.repo.codec)
        self._lock = threading.Lock()
        # Each task in flight holds one region (and its sealed copy): bounds memory.
        self._tasks = TaskGroup(
            self.repo.pool, self.repo.concurrency + 2, f"disk {name}: storing a region failed"
        )
        self._stats = dict.fromkeys(
            ("new", "dedup", "zero", "parent", "patched", "read", "uploaded", "puts", "dirty"),
            0,
        )
        self.result: ManifestDisk | None = None

    # -- checks ---------------------------------------------------------------------

    def _check(self) -> None:
        self.backup.check_open()
        if self.result is not None:
            raise WriterError(f"disk {self.name} is already finished")
        self._tasks.check()

    def _range(self, offset: int, length: int, what: str) -> range:
        rs = self.region_size
        end = offset + length
        if offset < 0 or length <= 0 or offset % rs or end > self.virtual_size:
            raise WriterError(
                f"disk {self.name}: {what} at offset {offset} length {length} is not a "
                f"chunk-aligned range inside {self.virtual_size} bytes (chunk size {rs})"
            )
        if end % rs and end != self.virtual_size:
            raise WriterError(f"disk {self.name}: {what} at offset {offset} ends mid-chunk")
        return range(offset // rs, -(-end // rs))

    def _claim(self, idx: range | Sequence[int], what: str) -> None:
        with self._lock:
            for i in idx:
                if self._given[i]:
                    raise WriterError(
                        f"disk {self.name}: region at offset {i * self.region_size} given "
                        f"twice ({what})"
                    )
            for i in idx:
                self._given[i] = 1

    def _record(self, i: int, region: Region, stat: str) -> None:
        with self._lock:
            self._regions[i] = region
            self._stats[stat] += 1

    # -- whole regions ----------------------------------------------------------------

    def put_chunk(self, offset: int, data: Blob) -> None:
        """Store one whole region (the last may be short) as a chunk, in the pool."""
        self._check()
        idx = self._range(offset, len(data), "put_chunk")
        if len(idx) != 1:
            raise WriterError(
                f"disk {self.name}: put_chunk at offset {offset} has {len(data)} bytes; "
                f"give one chunk ({self.region_size} bytes, or the tail) per call"
            )
        self._claim(idx, "put_chunk")
        self._tasks.submit(self._store_chunk, idx[0], data, len(data))

    def put_zero(self, offset: int, length: int) -> None:
        """Regions that read as zeros: nothing is stored."""
        self._check()
        idx = self._range(offset, length, "put_zero")
        self._claim(idx, "put_zero")
        for i in idx:
            self._record(i, zero_region(self.lengths[i]), "zero")

    def keep_parent(self, offset: int, length: int) -> None:
        """Regions unchanged since the parent backup (of the same length there)."""
        self._check()
        idx = self._range(offset, length, "keep_parent")
        for i in idx:
            p = self.parents[i]
            if p is None or p.length != self.lengths[i]:
                raise WriterError(
                    f"disk {self.name}: keep_parent at offset {i * self.region_size}: the "
                    f"parent backup has no region of that size there"
                )
        self._claim(idx, "keep_parent")
        for i in idx:
            p = self.parents[i]
            assert p is not None
            self._record(i, p.kept(), "parent")

    # -- sub-blocks -------------------------------------------------------------------

    def plan(
        self, dirty: Sequence[Mask] | None, zero: Sequence[Mask], dirty_bytes: int = 0
    ) -> list[RegionPlan]:
        """Decide every region (section 24) from its dirty sub-blocks (None: all of them,
        a full backup) and the sub-blocks known to read as zeros. Regions that need no
        bytes are done here; for the others the caller reads ``plan.read`` and calls
        ``put_region``. Call once, before anything else."""
        self._check()
        if any(self._given) or self._dirty:
            raise WriterError(f"disk {self.name}: plan must come first, and once")
        if len(zero) != self.count or (dirty is not None and len(dirty) != self.count):
            raise WriterError(f"disk {self.name}: one dirty and zero mask per region")
        self._dirty = [full_mask(n) for n in self.lengths] if dirty is None else list(dirty)
        self._zero = list(zero)
        with self._lock:
            self._stats["dirty"] = dirty_bytes
        plans, self._rehome = plan_disk_rehome(
            self.parents, self.lengths, self._dirty, self._zero, self._parent_packs
        )
        self._claim(range(self.count), "plan")
        for i, plan in enumerate(plans):
            self._plans[i] = plan
            self._settle_without_data(i, plan)
        return plans

    def _settle_without_data(self, i: int, plan: RegionPlan) -> bool:
        """Record a region that needs no bytes; False when the caller must give some."""
        if plan.read:
            return False
        self._taken[i] = 1
        if plan.action is Action.KEEP:
            p = self.parents[i]
            assert p is not None
            self._record(i, p.kept(), "parent")
        elif plan.action is Action.ZERO:
            self._record(i, zero_region(plan.length), "zero")
        else:  # a PATCH that only drops fragments or zeroes sub-blocks
            self._tasks.submit(self._store_patch, i, None, 0)
        return True

    def put_region(self, i: int, data: RegionBytes, have: Mask) -> Mask:
        """Give region ``i``'s bytes: the sub-blocks in ``have`` are read from the disk,
        every other one MUST be zeros in ``data``. Returns the sub-blocks still needed
        (0: accepted; the region is stored in the pool and ``data`` must not change).

        Sub-blocks read and found to be zeros are recorded as zeros and the region is
        planned again (section 24): that may turn a PATCH into a REBASE, which needs
        every non-zero sub-block.
        """
        self._check()
        plan = self._plans[i]
        if plan is None or self._taken[i]:
            raise WriterError(f"disk {self.name}: region {i} was not planned or is done")
        if len(data) != self.lengths[i]:
            raise WriterError(f"disk {self.name}: region {i} given {len(data)} bytes")
        view = memoryview(data)
        # Zeros found in what a PATCH read are recorded, not stored (section 24). A REBASE
        # needs no scan: its chunk leaves out every zero sub-block by itself.
        found = zero_sub_blocks(view, have & plan.read) if plan.action is Action.PATCH else 0
        if found & ~self._zero[i]:
            self._zero[i] |= found
            plan = plan_region(
                self.parents[i], self.lengths[i], self._dirty[i], self._zero[i], self._rehome
            )
            self._plans[i] = plan
            if self._settle_without_data(i, plan):
                return 0
        need = plan.read & ~have
        if need:
            return need
        read = mask_bytes(self.lengths[i], have)
        self._taken[i] = 1
        if plan.action is Action.REBASE:
            self._tasks.submit(self._store_chunk, i, view, read)
        else:
            self._tasks.submit(self._store_patch, i, view, read)
        return 0

    # -- the pool side --------------------------------------------------------------

    def _store_chunk(self, i: int, data: Blob, read: int) -> None:
        plan = self._plans[i]
        # A planned REBASE was given zeros wherever its plan knew them to be.
        known_zero = plan.zero if plan is not None else 0
        new = make_chunk(self.store.hasher, data, known_zero)
        if new is None:
            with self._lock:
                self._stats["read"] += read
            self._record(i, zero_region(self.lengths[i]), "zero")
            return
        name = new.region.digest.hex()
        key = chunk_name_key(name)
        known = self.backup.known
        uploaded = 0
        if name not in known and not self.repo.backend.exists(key):
            stored = self.store.seal_chunk(new)
            if self.repo.backend.put(key, stored, if_absent=True, defer_sync=True):
                uploaded = sum(len(piece) for piece in stored)
        known.add(name)
        with self._lock:
            self._stats["read"] += read
            self._stats["uploaded"] += uploaded
            self._stats["puts"] += 1 if uploaded else 0
        self._record(i, new.region, "new" if uploaded else "dedup")

    def _store_patch(self, i: int, data: memoryview | None, read: int) -> None:
        plan = self._plans[i]
        parent = self.parents[i]
        assert plan is not None and parent is not None
        length = self.lengths[i]
        new = None
        if plan.read:
            assert data is not None
            body = fragment_body(data, plan.read)
            digests = fragment_digests(self.store.hasher, length, plan.read, body)
            pack, offset, stored = self._packer.add(body)
            new = Fragment(pack, offset, stored, plan.read, digests)
        region = patched_region(self.store.hasher, parent, plan, new, self._base_table(parent))
        with self._lock:
            self._stats["read"] += read
        self._record(i, region, "patched")

    def _base_table(self, parent: Region) -> tuple[bytes, ...]:
        if parent.kind is Kind.ZERO or not parent.base_length:
            return ()  # a region without a base
        with self._lock:
            table = self._tables.get(parent.base)
        if table is None:
            table = self.store.chunk_table(parent.base, parent.base_length)
            with self._lock:
                self._tables[parent.base] = table
        return table

    def cancel(self) -> None:
        """Cancel the work not started yet and wait for the rest (the backup aborts)."""
        self._tasks.cancel()

    # -- end --------------------------------------------------------------------------

    def finish(self) -> DiskStats:
        """Wait for the pool, write the last pack, then (durably after them) the index."""
        self._check()
        self._tasks.wait()
        missing = [i for i, r in enumerate(self._regions) if r is None]
        if missing:
            raise WriterError(
                f"disk {self.name}: {len(missing)} regions were never given, first at offset "
                f"{missing[0] * self.region_size}"
            )
        self._packer.close()
        regions = tuple(r for r in self._regions if r is not None)
        sizes = {**self._parent_packs, **self._packer.sizes}
        used = {f.pack for r in regions for f in r.fragments}
        index = DiskIndex(self.virtual_size, self.region_size, regions, {p: sizes[p] for p in used})
        body = encode_index_v2(index)
        # Chunks and packs first, durably, then the index that references them.
        self.repo.backend.flush()
        key = index_key(self.backup.domain, self.backup.backup_id, self.name)
        sealed = self.repo.codec.seal(key, body)
        self.repo.backend.put(key, sealed)
        s = self._stats
        stats = DiskStats(
            chunks_total=self.count,
            chunks_new=s["new"],
            chunks_dedup=s["dedup"],
            chunks_zero=s["zero"],
            chunks_parent=s["parent"],
            chunks_patched=s["patched"],
            bytes_read=s["read"],
            bytes_uploaded=s["uploaded"] + self._packer.uploaded + len(sealed),
            bytes_dirty=s["dirty"],
            objects_put=s["puts"] + self._packer.puts + 1,
        )
        self.result = ManifestDisk(
            name=self.name,
            virtual_size=self.virtual_size,
            format=self.format,
            index_key=key,
            index_digest=self.repo.codec.digest(body),
            chunks=self.count,
            stats=stats,
            index_size=len(body),
        )
        return stats
