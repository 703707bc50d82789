"""A reference format-2 writer and reader over an in-memory store, for the pure-core tests.

It does what phase 2's DiskWriter and restore will do with the pure functions of
storage.region and storage.index_v2 (plan, read, seal chunks and pack fragments, index;
fetch, unseal, rebuild), with real sealing (storage.crypto.Codec, encrypted) so that the
stored sizes it reports are the ones a repository would hold, before compression.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

import blake3

from vmvault.storage.crypto import Codec, Keys
from vmvault.storage.format import chunk_count
from vmvault.storage.index_v2 import (
    PACK_HEADER,
    PACK_MAGIC,
    PACK_VERSION,
    DiskIndex,
    decode_index_v2,
    encode_index_v2,
    from_v1_index,
    region_length,
)
from vmvault.storage.region import (
    CHUNK_TABLE_SUFFIX,
    Action,
    Fragment,
    Kind,
    Mask,
    PackId,
    Region,
    TreeHasher,
    chunk_object,
    chunk_table_stored,
    fragment_body,
    fragment_digests,
    full_mask,
    make_chunk,
    mask_bytes,
    mask_of_runs,
    parse_chunk_table,
    patched_region,
    plan_disk,
    rebuild_region,
    split_chunk_object,
    zero_region,
    zero_sub_blocks,
)

MASTER = bytes(range(64))
KEYS = Keys.from_master(MASTER)


def _hash(data: bytes | bytearray | memoryview) -> bytes:
    out: bytes = blake3.blake3(data, key=KEYS.hashing, max_threads=1).digest()
    return out


HASHER = TreeHasher(_hash)
CODEC = Codec(KEYS)


def chunk_key(name: bytes) -> str:
    h = name.hex()
    return f"chunks/{h[:2]}/{h}"


def pack_key(pack: PackId) -> str:
    h = pack.hex()
    return f"packs/{h[:2]}/{h}"


def fragment_aad(pack: PackId, offset: int) -> str:
    return f"{pack_key(pack)}#{offset}"


@dataclass
class Store:
    """Objects by key: chunk objects (content-addressed) and pack objects."""

    chunks: dict[bytes, bytes] = field(default_factory=dict)
    packs: dict[PackId, bytes] = field(default_factory=dict)
    v1_chunks: dict[bytes, bytes] = field(default_factory=dict)  # digest -> sealed chunk

    def v1_chunk(self, digest: bytes) -> tuple[bytes, int]:
        stored = self.v1_chunks[digest]
        return CODEC.unseal(chunk_key(digest), stored, limit=1 << 26), len(stored)

    def chunk_table(self, name: bytes) -> tuple[bytes, ...]:
        table_sealed, _ = split_chunk_object(self.chunks[name], name.hex())
        key = chunk_key(name)
        table = CODEC.unseal(key + CHUNK_TABLE_SUFFIX, table_sealed, limit=1 << 20)
        return parse_chunk_table(table, name.hex(), 1 << 26)[1]

    def chunk_body(self, name: bytes) -> tuple[bytes, int]:
        """Plaintext body and the stored bytes a ranged GET of it fetches."""
        _, body_sealed = split_chunk_object(self.chunks[name], name.hex())
        return CODEC.unseal(chunk_key(name), body_sealed, limit=1 << 26), len(body_sealed)

    def fragment(self, frag: Fragment) -> bytes:
        stored = self.packs[frag.pack][frag.offset : frag.offset + frag.stored_length]
        return CODEC.unseal(fragment_aad(frag.pack, frag.offset), stored, limit=1 << 26)

    def collect(self, indexes: Iterable[DiskIndex]) -> tuple[int, int]:
        """GC: delete what no index references (packs as whole objects). Returns counts."""
        chunks: set[bytes] = set()
        packs: set[PackId] = set()
        for index in indexes:
            for r in index.regions:
                if r.kind in (Kind.CHUNK, Kind.PATCHED):
                    if r.base_length:
                        chunks.add(r.base)
                elif r.kind is Kind.LEGACY:
                    chunks.add(r.digest)
                packs.update(f.pack for f in r.fragments)
        for c in [c for c in self.v1_chunks if c not in chunks]:
            del self.v1_chunks[c]
        dead_chunks = [c for c in self.chunks if c not in chunks]
        dead_packs = [p for p in self.packs if p not in packs]
        for c in dead_chunks:
            del self.chunks[c]
        for p in dead_packs:
            del self.packs[p]
        return len(dead_chunks), len(dead_packs)


class PackWriter:
    """Appends sealed fragments to packs of about ``target`` bytes; each pack is one PUT."""

    def __init__(self, store: Store, target: int) -> None:
        self.store = store
        self.target = target
        self.current: bytearray | None = None
        self.pack = b""
        self.uploaded = 0
        self.puts = 0

    def add(self, body: bytes) -> tuple[PackId, int, int]:
        if self.current is None:
            self.pack = secrets.token_bytes(16)
            self.current = bytearray(PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, 0))
        offset = len(self.current)
        stored = CODEC.seal(fragment_aad(self.pack, offset), body, compress=False)
        self.current += stored
        placed = (self.pack, offset, len(stored))
        if len(self.current) >= self.target:
            self.close()
        return placed

    def close(self) -> None:
        if self.current is not None:
            self.store.packs[self.pack] = bytes(self.current)
            self.uploaded += len(self.current)
            self.puts += 1
            self.current = None


@dataclass
class BackupStats:
    read: int = 0  # plaintext bytes the writer needed from the disk
    uploaded: int = 0  # stored bytes of new chunks, packs and the index
    puts: int = 0  # objects written (chunks, packs, index)
    actions: dict[str, int] = field(default_factory=dict)


def dirty_masks(
    virtual_size: int, region_size: int, granules: Iterable[int], granularity: int
) -> list[Mask]:
    """Per region, the sub-blocks covered by dirty bitmap granules (any granularity)."""
    count = chunk_count(virtual_size, region_size)
    runs: list[list[tuple[int, int]]] = [[] for _ in range(count)]
    for g in granules:
        start, end = g * granularity, min((g + 1) * granularity, virtual_size)
        for i in range(start // region_size, min(count, -(-end // region_size))):
            runs[i].append((start - i * region_size, end - start))
    return [
        mask_of_runs(region_length(virtual_size, region_size, i), runs[i]) for i in range(count)
    ]


def backup(
    store: Store,
    parent: DiskIndex | None,
    disk: bytes,
    region_size: int,
    dirty: list[Mask] | None,
    zero: list[Mask],
    pack_target: int = 16 << 20,
) -> tuple[DiskIndex, BackupStats]:
    """One disk of one backup, as phase 2's writer will do it. ``dirty`` None: everything."""
    size = len(disk)
    count = chunk_count(size, region_size)
    lengths = [region_length(size, region_size, i) for i in range(count)]
    parents: list[Region | None] = [
        parent.regions[i] if parent and i < len(parent.regions) else None for i in range(count)
    ]
    masks = dirty if dirty is not None else [full_mask(n) for n in lengths]
    packs = parent.pack_sizes if parent else {}
    plans = plan_disk(parents, lengths, masks, zero, packs)
    # Sub-blocks read and found all zero are recorded as zero (the spec's MUST): plan
    # again with them, so no fragment or chunk carries zeros and the restore bound holds
    # against the disk's true data.
    found = [
        zero[i] | zero_sub_blocks(disk[i * region_size : i * region_size + lengths[i]], p.read)
        for i, p in enumerate(plans)
    ]
    if found != list(zero):
        plans = plan_disk(parents, lengths, masks, found, packs)
    stats = BackupStats()
    packer = PackWriter(store, pack_target)
    regions: list[Region] = []
    for i, plan in enumerate(plans):
        stats.actions[plan.action.value] = stats.actions.get(plan.action.value, 0) + 1
        data = disk[i * region_size : i * region_size + lengths[i]]
        p = parents[i]
        if plan.action is Action.KEEP:
            assert p is not None
            regions.append(p.kept())
        elif plan.action is Action.ZERO:
            regions.append(zero_region(lengths[i]))
        elif plan.action is Action.REBASE:
            stats.read += mask_bytes(lengths[i], plan.read)
            new = make_chunk(HASHER, data)
            if new is None:
                regions.append(zero_region(lengths[i]))
                continue
            name = new.region.digest
            if name not in store.chunks:
                key = chunk_key(name)
                table = CODEC.seal(key + CHUNK_TABLE_SUFFIX, new.table, compress=False)
                # Known from the length alone: a ranged GET can fetch just the body.
                assert len(table) == chunk_table_stored(lengths[i], encrypted=True)
                obj = chunk_object(table, CODEC.seal(key, new.body, compress=False))
                store.chunks[name] = obj
                stats.uploaded += len(obj)
                stats.puts += 1
            regions.append(new.region)
        else:
            assert p is not None
            frag = None
            if plan.read:
                body = fragment_body(data, plan.read)
                stats.read += len(body)
                digests = fragment_digests(HASHER, lengths[i], plan.read, body)
                pack, offset, stored = packer.add(body)
                frag = Fragment(pack, offset, stored, plan.read, digests)
            based = p.kind is not Kind.ZERO and p.base_length
            digests = store.chunk_table(p.base) if based else ()
            regions.append(patched_region(HASHER, p, plan, frag, digests))
    packer.close()
    stats.uploaded += packer.uploaded
    stats.puts += packer.puts
    sizes = {f.pack: len(store.packs[f.pack]) for r in regions for f in r.fragments}
    index = DiskIndex(size, region_size, tuple(regions), sizes)
    body = encode_index_v2(index)
    assert decode_index_v2(body, "model", region_size, size, encrypted=True) == index
    stats.uploaded += len(CODEC.seal("index", body, compress=False))
    stats.puts += 1
    return index, stats


@dataclass
class RestoreStats:
    plain: int = 0  # plaintext bytes of every piece fetched
    stored: int = 0  # stored bytes fetched (chunk bodies by ranged GET, fragments)
    data: int = 0  # non-zero bytes of the disk, at sub-block granularity
    objects: int = 0


def restore(store: Store, index: DiskIndex) -> tuple[bytes, RestoreStats]:
    """Every region rebuilt from its own entry and checked against its digest."""
    out = bytearray()
    stats = RestoreStats()
    for r in index.regions:
        base = None
        bodies = []
        if r.kind is Kind.LEGACY:
            base, stored = store.v1_chunk(r.digest)
            stats.stored += stored
            stats.objects += 1
        elif r.kind in (Kind.CHUNK, Kind.PATCHED):
            base, stored = store.chunk_body(r.base) if r.base_length else (b"", 0)
            stats.stored += stored
            stats.objects += 1 if r.base_length else 0
            for f in r.fragments:
                bodies.append(store.fragment(f))
                stats.stored += f.stored_length
                stats.objects += 1
        stats.plain += r.fetch_bytes()
        stats.data += r.data_bytes()
        out += rebuild_region(HASHER, r, base, bodies)
    return bytes(out), stats


def backup_v1(store: Store, disk: bytes, chunk_size: int) -> DiskIndex:
    """A full backup as version 1 wrote it (section 7), read the way a v2 reader reads a
    v1 index: ZERO and LEGACY regions."""
    size = len(disk)
    digests: list[str | None] = []
    for i in range(chunk_count(size, chunk_size)):
        data = disk[i * chunk_size : (i + 1) * chunk_size]
        if data == bytes(len(data)):
            digests.append(None)
            continue
        d = HASHER.digest(data)
        store.v1_chunks[d] = CODEC.seal(chunk_key(d), data, compress=False)
        digests.append(d.hex())
    return from_v1_index(size, chunk_size, digests)
