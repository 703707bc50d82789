"""Format 2 regions: the tree hash, the planning rule and rebuilds, by example and against a
reference model of a disk (hypothesis): writes, zeroes, discards, resizes, backups and
prunes in random order; every backup rebuilds bit-exact from its own index, its region
digests verify, and a restore of it fetches at most 5/4 of the disk's data."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.storage.region_model import (
    HASHER,
    Store,
    backup,
    backup_v1,
    dirty_masks,
    restore,
)
from vmvault.storage.errors import CorruptObjectError
from vmvault.storage.index_v2 import DiskIndex
from vmvault.storage.region import (
    MAX_FRAGMENTS,
    NO_BASE,
    SUB_BLOCK,
    Action,
    Fragment,
    Kind,
    Region,
    base_usable,
    check_chunk,
    chunk_region,
    fragment_body,
    fragment_digests,
    full_mask,
    legacy_region,
    make_chunk,
    mask_bytes,
    mask_of_runs,
    parse_chunk_table,
    patched_region,
    plan_region,
    rebuild_region,
    sub_count,
    zero_region,
    zero_sub_blocks,
)

KiB = 1024
MiB = 1024 * KiB
S = SUB_BLOCK


def rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------- by example


def test_region_digest_depends_only_on_the_bytes() -> None:
    data = bytearray(rand(1, 4 * MiB))
    data[S : 3 * S] = bytes(2 * S)
    new = make_chunk(HASHER, data)
    assert new is not None
    assert new.region.zero == 0b110
    assert len(new.body) == 4 * MiB - 2 * S  # zero sub-blocks are not stored
    # The same RD from hashing every sub-block, zeros included.
    assert HASHER.region_digest(len(data), HASHER.sub_digests(data)) == new.region.digest
    assert check_chunk(HASHER, new.region.digest, new.table, bytes(new.body), 4 * MiB) == (
        4 * MiB,
        0b110,
    )
    assert rebuild_region(HASHER, new.region, bytes(new.body), []) == data
    assert make_chunk(HASHER, bytes(3 * S + 5)) is None


def test_a_tampered_chunk_or_piece_is_refused() -> None:
    data = rand(2, MiB + 700)
    new = make_chunk(HASHER, data)
    assert new is not None
    bad_body = bytearray(new.body)
    bad_body[100] ^= 1
    with pytest.raises(CorruptObjectError, match="sub-block 0"):
        check_chunk(HASHER, new.region.digest, new.table, bytes(bad_body), 4 * MiB)
    with pytest.raises(CorruptObjectError, match="does not match its digest"):
        rebuild_region(HASHER, new.region, bytes(bad_body), [])
    with pytest.raises(CorruptObjectError, match="body has"):
        rebuild_region(HASHER, new.region, bytes(new.body)[:-1], [])
    bad_table = bytearray(new.table)
    bad_table[9] ^= 1
    with pytest.raises(CorruptObjectError, match="does not hash to its name"):
        check_chunk(HASHER, new.region.digest, bytes(bad_table), bytes(new.body), 4 * MiB)
    with pytest.raises(CorruptObjectError, match="out of range"):
        parse_chunk_table(new.table, "x", MiB)


def test_dirty_runs_cover_whole_sub_blocks_at_any_granularity() -> None:
    assert mask_of_runs(4 * MiB, [(0, 1)]) == 0b1
    assert mask_of_runs(4 * MiB, [(S - 1, 2)]) == 0b11
    # A 1 MiB bitmap granule marks 16 sub-blocks.
    assert mask_of_runs(4 * MiB, [(MiB, MiB)]) == 0xFFFF << 16
    # Clipped to the region (a granule past a short tail region).
    assert mask_of_runs(S + 10, [(0, MiB)]) == 0b11
    assert mask_of_runs(4 * MiB, [(5 * MiB, 10)]) == 0


def test_planning_by_example() -> None:
    length = 4 * MiB
    data = bytearray(rand(3, length))
    new = make_chunk(HASHER, data)
    assert new is not None
    base = new.region
    # Unchanged: keep.
    assert plan_region(base, length, 0, 0).action is Action.KEEP
    # Two dirty sub-blocks: a fragment of two.
    plan = plan_region(base, length, 0b101 << 10, 0)
    assert (plan.action, plan.read) == (Action.PATCH, 0b101 << 10)
    # A quarter of the region is less than the 5/4 limit; more than that is rebased.
    assert plan_region(base, length, (1 << 16) - 1, 0).action is Action.PATCH
    assert plan_region(base, length, (1 << 17) - 1, 0).action is Action.REBASE
    # Newly zero sub-blocks cost nothing to record.
    plan = plan_region(base, length, 0b11, 0b11)
    assert (plan.action, plan.read, plan.zero) == (Action.PATCH, 0, 0b11)
    # Everything zero: a zero region.
    assert plan_region(base, length, 0, full_mask(length)).action is Action.ZERO
    # No parent: the whole region (a full backup).
    plan = plan_region(None, length, 0, 0b1)
    assert (plan.action, plan.read) == (Action.REBASE, full_mask(length) & ~1)


def _patched(pieces: int, length: int = 4 * MiB) -> Region:
    """A region patched ``pieces`` times, one scattered sub-block each."""
    data = bytearray(rand(4, length))
    store = Store()
    index, _ = backup(store, None, bytes(data), length, None, [0])
    for n in range(pieces):
        data[(2 * n + 1) * S] ^= 0xFF
        index, _ = backup(store, index, bytes(data), length, [1 << (2 * n + 1)], [0])
    assert rebuild_from(store, index) == data
    return index.regions[0]


def rebuild_from(store: Store, index: DiskIndex) -> bytes:
    return restore(store, index)[0]


def test_more_than_max_fragments_merges_them() -> None:
    region = _patched(MAX_FRAGMENTS)
    assert region.kind is Kind.PATCHED and len(region.fragments) == MAX_FRAGMENTS
    plan = plan_region(region, region.length, 1 << 40, 0)
    # One new fragment holds what the old ones supplied and the new write.
    assert (plan.action, plan.keep) == (Action.PATCH, ())
    assert plan.read == sum(1 << (2 * n + 1) for n in range(MAX_FRAGMENTS)) | 1 << 40
    # Past the byte limit, the region is written whole instead.
    plan = plan_region(region, region.length, (1 << 17) - 1 << 40, 0)
    assert (plan.action, plan.read) == (Action.REBASE, full_mask(region.length))
    # Rewriting what the fragments hold instead drops the hidden ones.
    plan = plan_region(region, region.length, 0b10 | 0b1000, 0)
    assert plan.action is Action.PATCH and len(plan.keep) == MAX_FRAGMENTS - 2


def test_shrink_mid_sub_block_keeps_no_stale_bytes() -> None:
    """Shrink mid-sub-block, grow back: bytes past the cut read as zeros, not the parent's."""
    store = Store()
    size = 3 * MiB + 2 * S
    disk = bytearray(rand(5, size))
    index, _ = backup(store, None, bytes(disk), 4 * MiB, None, [0])
    cut = 3 * MiB + 1000  # a cut that leaves most of the base in use
    disk = disk[:cut]
    index, st_ = backup(store, index, bytes(disk), 4 * MiB, [0], [0])
    assert rebuild_from(store, index) == disk
    # Only the sub-block that now ends mid-way was read.
    assert st_.read == 1000 and st_.actions == {"patch": 1}
    # Grown back (QEMU marks the new area dirty; block status says zero there).
    disk += bytes(size - cut)
    dirty = mask_of_runs(size, [(cut, size - cut)])
    zero = full_mask(size) & ~((1 << (cut // S + 1)) - 1)
    index, st_ = backup(store, index, bytes(disk), 4 * MiB, [dirty], [zero])
    assert rebuild_from(store, index) == disk
    assert st_.read == S  # the boundary sub-block: 1000 old bytes, then zeros


def test_base_usable_by_length() -> None:
    assert base_usable(4 * MiB, 4 * MiB) == full_mask(4 * MiB)
    assert base_usable(2 * S + 5, 2 * S + 5) == 0b111
    assert base_usable(2 * S + 5, 4 * S) == 0b11  # the tail sub-block grew
    assert base_usable(4 * S, 2 * S + 5) == 0b11  # the new tail is shorter


def test_legacy_regions_are_kept_or_rebased() -> None:
    length = 4 * MiB
    data = rand(6, length)
    legacy = legacy_region(length, HASHER.digest(data))
    assert rebuild_region(HASHER, legacy, data, []) == data
    with pytest.raises(CorruptObjectError):
        rebuild_region(HASHER, legacy, data[:-1] + b"x", [])
    assert plan_region(legacy, length, 0, 0).action is Action.KEEP
    # Zeros inside an unchanged v1 chunk were there already: no rewrite for them.
    assert plan_region(legacy, length, 0, 0b1010).action is Action.KEEP
    # A v1 chunk has no digest table to patch onto: the first change rewrites it whole.
    plan = plan_region(legacy, length, 0b1, 0)
    assert (plan.action, plan.read) == (Action.REBASE, full_mask(length))
    assert plan_region(legacy, length, 0, full_mask(length)).action is Action.ZERO


def test_writes_into_an_empty_region_are_fragments_without_a_base() -> None:
    length = 4 * MiB
    empty = zero_region(length)
    # Two scattered writes: one fragment, no chunk object of its own.
    plan = plan_region(empty, length, 0b1001 << 20, 0)
    assert (plan.action, plan.read, plan.zero) == (
        Action.PATCH,
        0b1001 << 20,
        full_mask(length) & ~(0b1001 << 20),
    )
    data = bytearray(length)
    data[20 * S : 21 * S] = rand(7, S)
    data[23 * S : 24 * S] = rand(8, S)
    body = fragment_body(data, plan.read)
    frag = Fragment(
        bytes(16), 8, len(body) + 1, plan.read, fragment_digests(HASHER, length, plan.read, body)
    )
    region = patched_region(HASHER, empty, plan, frag, ())
    assert (region.base, region.base_length, region.fetch_bytes()) == (NO_BASE, 0, 2 * S)
    # Its digest is the digest of its bytes, as for any other region.
    assert region.digest == make_chunk(HASHER, data).region.digest  # type: ignore[union-attr]
    assert rebuild_region(HASHER, region, b"", [body]) == data
    # More than a quarter of the region at once: a chunk (large new data deduplicates).
    assert plan_region(empty, length, (1 << 17) - 1, 0).action is Action.REBASE
    # A region without a base grows by fragments until they pass a quarter of it.
    assert plan_region(region, length, 1 << 40, 0).action is Action.PATCH
    assert plan_region(region, length, ((1 << 15) - 1) << 30, 0).action is Action.REBASE
    with pytest.raises(ValueError, match="no piece supplies"):
        replace(region, zero=region.zero & ~1)
    with pytest.raises(ValueError, match="names a base"):
        replace(region, base=bytes(range(32)))


def test_region_invariants_refuse_bad_entries() -> None:
    good = _patched(2)
    frag = good.fragments[0]
    with pytest.raises(ValueError, match="hidden"):
        replace(good, fragments=(frag, frag))
    with pytest.raises(ValueError, match="base chunk of zeros"):
        chunk_region(S, bytes(32), 0b1)
    with pytest.raises(ValueError, match="zero region with contents"):
        Region(Kind.ZERO, S, bytes(32))
    with pytest.raises(ValueError, match="digests"):
        Fragment(bytes(16), 8, 100, 0b11, (bytes(32),))
    with pytest.raises(ValueError, match="beyond what the base"):
        replace(good, length=good.length + S, zero=0)
    assert zero_region(5).data_bytes() == 0


def test_scattered_small_writes_store_about_the_dirty_bytes() -> None:
    """The issue's workload scaled down 10x (68 MiB of data in a 100 MiB disk, 30 random
    4 KiB writes): an incremental stores at most 1.5x the dirty sub-blocks' bytes; then
    30 rounds of it, the restore bound holding after each."""
    region = 4 * MiB
    size = 100 * MiB
    rng = random.Random(7)
    disk = bytearray(size)
    disk[: 68 * MiB] = rand(8, 68 * MiB)
    store = Store()
    zero = [full_mask(region) if i >= 17 else 0 for i in range(25)]
    index, full = backup(store, None, bytes(disk), region, None, zero)
    growth: list[float] = []
    for round_ in range(30):
        granules: set[int] = set()
        for _ in range(30):
            at = rng.randrange(0, 68 * MiB - 4 * KiB) & ~511
            disk[at : at + 4 * KiB] = rng.randbytes(4 * KiB)
            granules.update(range(at // S, (at + 4 * KiB - 1) // S + 1))
        dirty_bytes = len(granules) * S
        index, stats = backup(
            store, index, bytes(disk), region, dirty_masks(size, region, granules, S), zero
        )
        data, rs = restore(store, index)
        assert data == disk
        assert rs.plain * 4 <= rs.data * 5
        growth.append(stats.uploaded / dirty_bytes)
        if round_ == 0:
            first = stats
            print(
                f"\nfirst incremental: dirty {dirty_bytes} B, read {stats.read} B "
                f"({stats.read / dirty_bytes:.2f}x), stored {stats.uploaded} B "
                f"({stats.uploaded / dirty_bytes:.2f}x), {stats.puts} objects; "
                f"full stored {full.uploaded} B in {full.puts} objects"
            )
            assert stats.uploaded <= 1.5 * dirty_bytes
            assert stats.read <= 1.5 * dirty_bytes
    _, last = restore(store, index)
    print(
        f"30 rounds: stored/dirty per round min {min(growth):.2f} max {max(growth):.2f} "
        f"mean {sum(growth) / len(growth):.2f}; newest restore fetches {last.stored} B "
        f"stored for {last.data} B of data ({last.stored / last.data:.3f}x); "
        f"first incremental {first.actions}"
    )
    assert last.stored <= 1.3 * last.data


# --------------------------------------------------------------------------- the model


class DiskChain(RuleBasedStateMachine):
    """A disk (bytes, allocation, dirty bitmap) and its chain of format-2 backups."""

    def __init__(self) -> None:
        super().__init__()
        self.store = Store()
        self.backups: list[tuple[DiskIndex, bytes]] = []
        # Dirty granules since each retained backup (the newest is the next parent).
        self.dirty_since: list[set[int]] = []
        self.disk = bytearray()
        self.alloc: list[bool] = []  # per disk sub-block: allocated (else reads zero)
        self.seed = 0

    @initialize(
        region=st.sampled_from([16 * S, 64 * S, 4 * S]),
        granularity=st.sampled_from([S, 2 * S, S, 16 * S]),
        sectors=st.integers(1, 24 * MiB // 512) | st.integers(8 * MiB // 512, 24 * MiB // 512),
        filled=st.sampled_from([True, True, False]),
        upgraded=st.sampled_from([False, False, True]),
    )
    def start(
        self, region: int, granularity: int, sectors: int, filled: bool, upgraded: bool
    ) -> None:
        self.region = region
        self.granularity = granularity
        self.disk = bytearray(rand(0, sectors * 512) if filled else sectors * 512)
        self.alloc = [filled] * sub_count(len(self.disk))
        if upgraded:
            # A repository upgraded from version 1: the chain starts at a v1 backup.
            index = backup_v1(self.store, bytes(self.disk), region)
            self.backups.append((index, bytes(self.disk)))
            self.dirty_since.append(set())
            self._check(index, bytes(self.disk))

    # -- guest activity --------------------------------------------------------

    def _touch(self, start: int, end: int, allocate: bool | None) -> None:
        """Mark [start, end) dirty since every backup; set allocation of whole sub-blocks
        (``allocate`` False: only sub-blocks the range covers entirely become zero)."""
        for since in self.dirty_since:
            since.update(range(start // self.granularity, (end - 1) // self.granularity + 1))
        for j in range(start // S, (end - 1) // S + 1):
            if allocate:
                self.alloc[j] = True
            elif allocate is False and start <= j * S and min((j + 1) * S, len(self.disk)) <= end:
                self.alloc[j] = False

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        size = len(self.disk)
        length = data.draw(
            st.sampled_from([512, 4 * KiB, S, 3 * S + 512]) | st.integers(512, 8 * MiB)
        )
        start = data.draw(st.integers(0, size - 1))
        return start, min(start + length, size)

    @rule(data=st.data(), zeros=st.booleans())
    def write(self, data: st.DataObject, zeros: bool) -> None:
        start, end = self._range(data)
        self.seed += 1
        self.disk[start:end] = bytes(end - start) if zeros else rand(self.seed, end - start)
        self._touch(start, end, allocate=True)

    @rule(data=st.data(), unmap=st.booleans())
    def zero_or_discard(self, data: st.DataObject, unmap: bool) -> None:
        start, end = self._range(data)
        self.disk[start:end] = bytes(end - start)
        self._touch(start, end, allocate=False if unmap else None)

    @rule(sectors=st.integers(1, 24 * MiB // 512))
    def resize(self, sectors: int) -> None:
        old, new = len(self.disk), sectors * 512
        if new < old:
            # QEMU does not mark a shrink dirty; the bitmap just loses its tail.
            del self.disk[new:]
            del self.alloc[sub_count(new) :]
        else:
            self.disk += bytes(new - old)
            self.alloc += [False] * (sub_count(new) - len(self.alloc))
            if new > old:
                # A grow is a write of the new area (bdrv_co_truncate finishes it as one).
                self._touch(old, new, allocate=None)
        limit = -(-new // self.granularity)
        for since in self.dirty_since:
            since.difference_update([g for g in since if g >= limit])

    # -- backups -----------------------------------------------------------------

    def _zero_hint(self) -> list[int]:
        """Block status: sub-blocks that are unallocated read as zeros."""
        size = len(self.disk)
        out = []
        for i in range(-(-size // self.region)):
            first = i * self.region // S
            n = sub_count(min(self.region, size - i * self.region))
            out.append(sum(1 << k for k in range(n) if not self.alloc[first + k]))
        return out

    @rule(data=st.data(), writes=st.integers(1, 6))
    def small_writes_then_backup(self, data: st.DataObject, writes: int) -> None:
        """The common case the format is for: a few small writes between backups."""
        size = len(self.disk)
        for _ in range(writes):
            start = data.draw(st.integers(0, size - 1))
            end = min(size, start + data.draw(st.sampled_from([512, 4 * KiB, 20 * KiB])))
            self.seed += 1
            self.disk[start:end] = rand(self.seed, end - start)
            self._touch(start, end, allocate=True)
        self.take_backup()

    @rule()
    def take_backup(self) -> None:
        size = len(self.disk)
        parent = self.backups[-1][0] if self.backups else None
        dirty = (
            dirty_masks(size, self.region, self.dirty_since[-1], self.granularity)
            if parent
            else None
        )
        index, stats = backup(
            self.store, parent, bytes(self.disk), self.region, dirty, self._zero_hint(), 1 * MiB
        )
        for action in stats.actions:
            event(f"backup {'incremental' if parent else 'full'} with {action}")
        if parent and any(r.kind is Kind.LEGACY for r in parent.regions):
            event("backup with a v1 parent")
        if any(r.kind is Kind.PATCHED and len(r.fragments) > 1 for r in index.regions):
            event("a region with several fragments")
        self.backups.append((index, bytes(self.disk)))
        self.dirty_since.append(set())
        self._check(index, bytes(self.disk))
        assert all(len(r.fragments) <= MAX_FRAGMENTS for r in index.regions)
        if parent is not None:
            # Never more than the dirty sub-blocks plus what rebases and re-homes needed.
            assert stats.read <= size

    def _check(self, index: DiskIndex, want: bytes) -> None:
        data, stats = restore(self.store, index)
        assert data == want
        # The restore bound, in plaintext, against the disk's true non-zero sub-blocks...
        true_data = mask_bytes(len(want), full_mask(len(want)) & ~zero_sub_blocks(want))
        assert stats.data == true_data
        assert stats.plain * 4 <= stats.data * 5
        # ...and in stored bytes, sealing overhead (29 bytes per object) aside.
        assert stats.stored <= stats.data * 5 / 4 + 29 * stats.objects

    @precondition(lambda self: len(self.backups) >= 2)
    @rule(data=st.data())
    def prune_and_collect(self, data: st.DataObject) -> None:
        """Remove an older backup, collect what nothing references any more; every other
        backup must still restore (a pack stays while any index uses a fragment in it)."""
        victim = data.draw(st.integers(0, len(self.backups) - 2))
        del self.backups[victim]
        del self.dirty_since[victim]
        self.store.collect(index for index, _ in self.backups)
        for index, want in self.backups:
            self._check(index, want)

    @invariant()
    def pack_space_is_bounded(self) -> None:
        """Every pack is at least half referenced by some retained backup (re-homing)."""
        for pack, blob in self.store.packs.items():
            best = max(
                (
                    sum(
                        f.stored_length
                        for r in index.regions
                        for f in r.fragments
                        if f.pack == pack
                    )
                    for index, _ in self.backups
                ),
                default=0,
            )
            assert best * 2 >= len(blob) - 8 or not self.backups


def _pack_use(index: DiskIndex, pack: bytes) -> int:
    return sum(f.stored_length for r in index.regions for f in r.fragments if f.pack == pack)


DiskChain.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_disk_chain = DiskChain.TestCase


def test_mask_bytes_counts_a_short_tail() -> None:
    assert mask_bytes(2 * S + 7, 0b111) == 2 * S + 7
    assert mask_bytes(2 * S + 7, 0b011) == 2 * S
    assert mask_bytes(4 * S, 0b1010) == 2 * S


def test_the_spec_example() -> None:
    """docs/repository-format.md, section 23: A full, B patches sub-blocks 10 and 40, C
    rewrites 40 and 41 and discards 63."""
    region = 4 * MiB
    disk = bytearray(rand(9, region))
    store = Store()
    a, _ = backup(store, None, bytes(disk), region, None, [0])
    for j in (10, 40):
        disk[j * S : j * S + 4 * KiB] = rand(j, 4 * KiB)
    b, _ = backup(store, a, bytes(disk), region, [1 << 10 | 1 << 40], [0])
    for j in (40, 41):
        disk[j * S : j * S + 4 * KiB] = rand(100 + j, 4 * KiB)
    disk[63 * S :] = bytes(S)
    c, _ = backup(store, b, bytes(disk), region, [1 << 40 | 1 << 41 | 1 << 63], [1 << 63])
    ra, rb, rc = a.regions[0], b.regions[0], c.regions[0]
    assert ra.kind is Kind.CHUNK and rb.kind is rc.kind is Kind.PATCHED
    assert rb.base == rc.base == ra.digest
    assert [f.mask for f in rb.fragments] == [1 << 10 | 1 << 40]
    assert [f.mask for f in rc.fragments] == [1 << 10 | 1 << 40, 1 << 40 | 1 << 41]
    assert rc.zero == 1 << 63
    assert (rc.fetch_bytes(), rc.data_bytes()) == (4 * MiB + 4 * S, 4 * MiB - S)
    # Prune A and B: C still restores.
    store.collect([c])
    assert restore(store, c)[0] == disk
