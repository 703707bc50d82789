"""Repository format 2: regions, sub-blocks, the region tree hash and the planning rule.

Pure (bytes and masks in, values out); docs/repository-format.md, "Format 2", is the spec.

A disk is cut into regions (the chunk grid, C = 4 MiB by default) and every region into
sub-blocks of ``SUB_BLOCK`` = 64 KiB, QEMU's usual dirty-bitmap granularity:

    region i   [i*C, min((i+1)*C, V))                          the last one may be short
    sub j      [j*S, min((j+1)*S, L))  inside a region of L bytes   the last one may be short

    region  |s0|s1|s2|s3| ... |s63|
    base    |##|##|  |##| ... |## |   a CHUNK object: every non-zero sub-block, once
    frag A     |aa|           |   |   newer pieces override some sub-blocks
    frag B           |bb|     |   |
    zero                      |000|   sub-blocks that read as zeros now

A sub-block's bytes come from, in this order: the zero mask, the newest fragment that
holds it, the base chunk. Masks are Python ints: bit j is sub-block j.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from vmvault.storage.errors import CorruptObjectError
from vmvault.storage.format import SUB_BLOCK_SIZE

SUB_BLOCK = SUB_BLOCK_SIZE
DIGEST_SIZE = 32
PACK_ID_SIZE = 16
# The base of a PATCHED region that has none (base_length 0): writes into a region that
# was all zeros are fragments too, not a chunk of their own.
NO_BASE = bytes(DIGEST_SIZE)

# The planning policy (not a decoding limit): a region is rewritten whole (REBASE) once a
# restore of it would fetch more than REBASE_NUM/REBASE_DEN of its non-zero bytes; its
# fragments are merged into one once there would be more than MAX_FRAGMENTS of them
# (a restore then needs at most MAX_FRAGMENTS + 1 GETs per region). See plan_region.
REBASE_NUM, REBASE_DEN = 5, 4
MAX_FRAGMENTS = 4
# Decoders accept up to this many fragments per region, so that a later writer may change
# the policy above without a format change; anything beyond is corrupt.
FORMAT_MAX_FRAGMENTS = 8
# A pack of which the new index references less than this share (by stored bytes) has its
# still-used fragments written again into a new pack ("re-homed"), so that the old pack
# stops being referenced and GC can delete it whole. See the spec, "GC of packs".
REHOME_LIVE_NUM, REHOME_LIVE_DEN = 1, 2
# A region without a base holds fragments of at most this share of its length; beyond,
# it is stored as a chunk (content-addressed, so large new data still deduplicates).
BASELESS_NUM, BASELESS_DEN = 1, 4

_ZERO_SUB = bytes(SUB_BLOCK)
_REGION_TAG = b"vmvault-region-v2"
_LENGTH = struct.Struct("<Q")

Mask = int
PackId = bytes  # 16 random bytes; the object is packs/<hex[0:2]>/<hex>
# Raw 32-byte digest of a byte string: keyed BLAKE3 in an encrypted repository (the same
# function as a v1 chunk digest, storage.crypto.Codec.digest, before hex encoding).
HashFn = Callable[[bytes | bytearray | memoryview], bytes]


class Kind(enum.IntEnum):
    """How a region's bytes are stored (the index entry's kind byte)."""

    ZERO = 0  # all zeros; nothing stored
    CHUNK = 1  # one content-addressed chunk object named by the region digest
    PATCHED = 2  # a base CHUNK object plus fragments in packs, and a zero mask
    LEGACY = 3  # a version 1 chunk (repositories upgraded from version 1)


# --------------------------------------------------------------------------- arithmetic


def sub_count(length: int) -> int:
    """Sub-blocks of a region of ``length`` bytes."""
    return -(-length // SUB_BLOCK)


def sub_length(length: int, j: int) -> int:
    """Bytes of sub-block ``j`` in a region of ``length`` bytes."""
    return min(SUB_BLOCK, length - j * SUB_BLOCK)


def full_mask(length: int) -> Mask:
    return (1 << sub_count(length)) - 1


def bits(mask: Mask) -> Iterable[int]:
    """Set bits of ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def popcount(mask: Mask) -> int:
    return mask.bit_count()


def mask_bytes(length: int, mask: Mask) -> int:
    """Bytes of the sub-blocks in ``mask`` of a region of ``length`` bytes."""
    n = sub_count(length)
    if not n:
        return 0  # no sub-blocks (a region without a base has a base of length 0)
    count = popcount(mask)
    if mask >> (n - 1) & 1 and length % SUB_BLOCK:
        return (count - 1) * SUB_BLOCK + length % SUB_BLOCK
    return count * SUB_BLOCK


def mask_of_runs(length: int, runs: Iterable[tuple[int, int]]) -> Mask:
    """The sub-blocks of a region of ``length`` bytes touched by byte runs ``(start, len)``
    (relative to the region; clipped to it). A dirty bitmap coarser than ``SUB_BLOCK``
    gives runs that cover every sub-block of its granules, so it maps here too."""
    mask = 0
    for start, size in runs:
        end = min(start + size, length)
        start = max(start, 0)
        if end <= start:
            continue
        first, last = start // SUB_BLOCK, (end - 1) // SUB_BLOCK
        mask |= ((1 << (last - first + 1)) - 1) << first
    return mask


def base_usable(base_length: int, length: int) -> Mask:
    """Sub-blocks of a region of ``length`` bytes that a base chunk of ``base_length`` bytes
    can supply: those of the same extent in both (a resize changes the boundary one)."""
    if base_length == length:
        return full_mask(length)
    return (1 << (min(base_length, length) // SUB_BLOCK)) - 1


def zero_sub_blocks(data: bytes | bytearray | memoryview, among: Mask | None = None) -> Mask:
    """The sub-blocks of ``data`` (a whole region; only those in ``among`` if given) whose
    bytes are all zero."""
    view = memoryview(data)
    mask = 0
    for j in bits(full_mask(len(view)) if among is None else among):
        piece = view[j * SUB_BLOCK : (j + 1) * SUB_BLOCK]
        # A copy, then memcmp: 15x faster than comparing the memoryview itself (which
        # goes item by item), 0.25 ms for a 4 MiB region.
        if bytes(piece) == (_ZERO_SUB if len(piece) == SUB_BLOCK else bytes(len(piece))):
            mask |= 1 << j
    return mask


# --------------------------------------------------------------------------- tree hash


class TreeHasher:
    """Sub-block digests and region digests (RD) under one repository's hash function.

    RD = H("vmvault-region-v2" || u64le length || d_0 || ... || d_{n-1}), d_j = H(sub-block
    j), so the RD of a patched region follows from digests already known (its base's
    table, its fragments' digests, zero digests) without reading the region.
    """

    def __init__(self, hash_fn: HashFn) -> None:
        self._hash = hash_fn
        self._zero: dict[int, bytes] = {}

    def digest(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._hash(data)

    def zero_digest(self, size: int) -> bytes:
        """Digest of ``size`` zero bytes (cached: only the full and the tail size occur)."""
        d = self._zero.get(size)
        if d is None:
            d = self._zero[size] = self._hash(bytes(size))
        return d

    def sub_digests(
        self, data: bytes | bytearray | memoryview, zero: Mask = 0
    ) -> tuple[bytes, ...]:
        """Digest of every sub-block of region bytes ``data``; those in ``zero`` (known to be
        zeros) are not hashed."""
        view = memoryview(data)
        out = []
        for j in range(sub_count(len(view))):
            piece = view[j * SUB_BLOCK : (j + 1) * SUB_BLOCK]
            out.append(self.zero_digest(len(piece)) if zero >> j & 1 else self._hash(piece))
        return tuple(out)

    def region_digest(self, length: int, digests: Sequence[bytes]) -> bytes:
        if len(digests) != sub_count(length):
            raise ValueError(f"{len(digests)} sub-block digests for a region of {length} bytes")
        return self._hash(b"".join([_REGION_TAG, _LENGTH.pack(length), *digests]))


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Fragment:
    """New bytes of some sub-blocks of one region, sealed alone inside a pack object.

    The body is the sub-blocks of ``mask`` concatenated in order; ``digests`` holds their
    sub-block digests (one per set bit), so later backups can hash the region without
    fetching the fragment. ``offset``/``stored_length`` locate the sealed body in the pack.
    """

    pack: PackId
    offset: int
    stored_length: int
    mask: Mask
    digests: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.pack) != PACK_ID_SIZE:
            raise ValueError(f"fragment pack id has {len(self.pack)} bytes")
        if self.mask <= 0:
            raise ValueError("fragment holds no sub-block")
        if len(self.digests) != popcount(self.mask):
            raise ValueError(
                f"fragment has {len(self.digests)} digests for {popcount(self.mask)} sub-blocks"
            )
        if any(len(d) != DIGEST_SIZE for d in self.digests):
            raise ValueError("fragment digest of the wrong size")
        if self.offset < 0 or self.stored_length <= 0:
            raise ValueError(f"fragment at offset {self.offset} of {self.stored_length} bytes")

    def digest_of(self, j: int) -> bytes:
        """Digest of sub-block ``j`` (which must be in ``mask``)."""
        return self.digests[popcount(self.mask & ((1 << j) - 1))]

    def plain_length(self, length: int) -> int:
        """Bytes of its body for a region of ``length`` bytes."""
        return mask_bytes(length, self.mask)


@dataclass(frozen=True)
class Region:
    """One region of a disk as an index records it. Construct with ``zero_region``,
    ``chunk_region``, ``legacy_region`` or ``patched_region``; ``__post_init__`` checks
    every invariant of the spec (the index decoder relies on it)."""

    kind: Kind
    length: int
    digest: bytes = b""  # RD for CHUNK/PATCHED; the v1 chunk digest for LEGACY
    base: bytes = b""  # the base chunk's name: == digest for CHUNK
    base_length: int = 0
    base_zero: Mask = 0  # zero sub-blocks of the base chunk (absent from its body)
    zero: Mask = 0  # zero sub-blocks now
    fragments: tuple[Fragment, ...] = ()
    from_parent: bool = False  # copied unchanged from the parent backup's index
    _sources: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.length <= 0:
            raise ValueError(f"region of {self.length} bytes")
        full = full_mask(self.length)
        if self.kind is Kind.ZERO:
            if self.digest or self.base or self.fragments or self.zero or self.base_zero:
                raise ValueError("zero region with contents")
            return
        if len(self.digest) != DIGEST_SIZE:
            raise ValueError("region digest of the wrong size")
        if self.kind is Kind.LEGACY:
            if self.base or self.fragments or self.zero or self.base_zero:
                raise ValueError("legacy region with version 2 contents")
            return
        baseless = self.kind is Kind.PATCHED and self.base_length == 0
        if baseless:
            if self.base != NO_BASE or self.base_zero:
                raise ValueError("a region without a base names a base")
        elif len(self.base) != DIGEST_SIZE or self.base_length <= 0:
            raise ValueError("region without a base chunk")
        elif self.base_zero & ~full_mask(self.base_length):
            raise ValueError("base zero mask beyond the base chunk")
        elif self.base_zero == full_mask(self.base_length):
            raise ValueError("base chunk of zeros only (never stored)")
        if self.zero & ~full:
            raise ValueError("zero mask beyond the region")
        if self.kind is Kind.CHUNK:
            if self.base != self.digest or self.base_length != self.length:
                raise ValueError("chunk region whose base is not itself")
            if self.fragments or self.zero != self.base_zero:
                raise ValueError("chunk region with fragments or its own zero mask")
            return
        if len(self.fragments) > FORMAT_MAX_FRAGMENTS:
            raise ValueError(f"{len(self.fragments)} fragments (at most {FORMAT_MAX_FRAGMENTS})")
        if self.zero == full:
            raise ValueError("patched region of zeros only (must be a zero region)")
        # Which piece supplies each sub-block: -1 zero, 0..k-1 fragment, k base.
        k = len(self.fragments)
        sources = [-1 if self.zero >> j & 1 else k for j in range(sub_count(self.length))]
        covered = self.zero
        for f_index in range(k - 1, -1, -1):
            frag = self.fragments[f_index]
            if frag.mask & ~full:
                raise ValueError(f"fragment {f_index} beyond the region")
            # A tail sub-block in a fragment must be the region's own tail: fragments are
            # never kept across a change of region length (plan_region).
            fresh = frag.mask & ~covered
            if not fresh:
                raise ValueError(f"fragment {f_index} is hidden by newer pieces (not dropped)")
            for j in bits(fresh):
                sources[j] = f_index
            covered |= frag.mask
        from_base = full & ~covered
        if baseless:
            if from_base:
                raise ValueError("sub-blocks that no piece supplies (the region has no base)")
        elif not from_base:
            raise ValueError("patched region that uses nothing of its base")
        if from_base & ~base_usable(self.base_length, self.length):
            raise ValueError("sub-blocks beyond what the base chunk holds")
        object.__setattr__(self, "_sources", tuple(sources))

    # -- views ---------------------------------------------------------------

    @property
    def sub_count(self) -> int:
        return sub_count(self.length)

    def source(self, j: int) -> int:
        """PATCHED: where sub-block ``j`` comes from: -1 zero, i fragment i, len(fragments)
        the base chunk."""
        return self._sources[j]

    def data_bytes(self) -> int:
        """Non-zero bytes of the region (at sub-block granularity)."""
        if self.kind is Kind.ZERO:
            return 0
        if self.kind is Kind.LEGACY:
            return self.length
        return mask_bytes(self.length, full_mask(self.length) & ~self.zero)

    def base_bytes(self) -> int:
        """Plaintext bytes of the base chunk's body (its non-zero sub-blocks)."""
        if self.kind in (Kind.ZERO, Kind.LEGACY):
            return self.length if self.kind is Kind.LEGACY else 0
        if not self.base_length:
            return 0
        return mask_bytes(self.base_length, full_mask(self.base_length) & ~self.base_zero)

    def fetch_bytes(self) -> int:
        """Plaintext bytes a restore of this region fetches: base body plus fragment bodies."""
        return self.base_bytes() + sum(f.plain_length(self.length) for f in self.fragments)

    def kept(self) -> Region:
        """This entry as the child backup records it when the region did not change."""
        return replace(self, from_parent=True)


def zero_region(length: int) -> Region:
    return Region(Kind.ZERO, length)


def legacy_region(length: int, digest: bytes) -> Region:
    return Region(Kind.LEGACY, length, digest)


def chunk_region(length: int, digest: bytes, zero: Mask) -> Region:
    return Region(Kind.CHUNK, length, digest, digest, length, zero, zero)


# --------------------------------------------------------------------------- chunk objects

# A version 2 chunk object is
#     u32le table_len || seal(key + "#table", table) || seal(key, body)
# table = u64le region length || one 32-byte digest per sub-block; body = the non-zero
# sub-blocks, concatenated (a sub-block whose digest is the zero digest of its size is
# absent). The table is always sealed uncompressed, so table_len is known in advance
# (``chunk_table_stored``): a reader can fetch only the table, or only the body, with one
# ranged GET.
CHUNK_TABLE_SUFFIX = "#table"
_U32 = struct.Struct("<I")


def chunk_table(length: int, digests: Sequence[bytes]) -> bytes:
    return _LENGTH.pack(length) + b"".join(digests)


def chunk_table_stored(length: int, encrypted: bool) -> int:
    """Stored size of a chunk's sealed table: kind byte + table (+ nonce and tag)."""
    return 1 + _LENGTH.size + DIGEST_SIZE * sub_count(length) + (28 if encrypted else 0)


def chunk_object(table_sealed: bytes, body_sealed: bytes) -> bytes:
    return _U32.pack(len(table_sealed)) + table_sealed + body_sealed


def split_chunk_object(stored: bytes, name: str) -> tuple[bytes, bytes]:
    """``(sealed table, sealed body)`` of a stored chunk object."""
    if len(stored) < _U32.size:
        raise CorruptObjectError(f"chunk {name} is truncated ({len(stored)} bytes)")
    (table_len,) = _U32.unpack_from(stored)
    if table_len > len(stored) - _U32.size:
        raise CorruptObjectError(f"chunk {name}: table of {table_len} bytes past its end")
    return stored[4 : 4 + table_len], stored[4 + table_len :]


def parse_chunk_table(table: bytes, name: str, max_length: int) -> tuple[int, tuple[bytes, ...]]:
    """``(region length, sub-block digests)`` of an unsealed chunk table."""
    if len(table) < _LENGTH.size:
        raise CorruptObjectError(f"chunk {name}: table is truncated")
    (length,) = _LENGTH.unpack_from(table)
    if not 0 < length <= max_length:
        raise CorruptObjectError(f"chunk {name}: region length {length} is out of range")
    n = sub_count(length)
    if len(table) != _LENGTH.size + DIGEST_SIZE * n:
        raise CorruptObjectError(f"chunk {name}: table does not hold {n} digests")
    raw = table[_LENGTH.size :]
    return length, tuple(raw[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] for i in range(n))


@dataclass(frozen=True)
class NewChunk:
    """A region stored whole: its index entry, the chunk's table and body (both unsealed)."""

    region: Region
    digests: tuple[bytes, ...]
    table: bytes
    body: bytes | bytearray | memoryview  # the caller's buffer when nothing is left out


def make_chunk(
    hasher: TreeHasher, data: bytes | bytearray | memoryview, known_zero: Mask = 0
) -> NewChunk | None:
    """The chunk object contents and index entry for region bytes ``data``; None when the
    bytes are all zeros (a ZERO region: nothing is stored). ``known_zero``: sub-blocks the
    caller knows to be zeros (not scanned).

    Everything follows from the bytes (the zero mask too), so equal regions give equal
    chunk objects: content addressing and dedup work as in version 1. Zero sub-blocks are
    found by their digest (the hash is needed anyway, and a scan would copy the region);
    a region without any is its own body, without a copy.
    """
    length = len(data)
    full = full_mask(length)
    if known_zero == full:
        return None
    digests = hasher.sub_digests(data, known_zero)
    zero = known_zero
    for j in bits(full & ~known_zero):
        if digests[j] == hasher.zero_digest(sub_length(length, j)):
            zero |= 1 << j
    if zero == full:
        return None
    rd = hasher.region_digest(length, digests)
    view = memoryview(data)
    body: bytes | bytearray | memoryview = (
        data
        if not zero
        else b"".join(
            view[j * SUB_BLOCK : (j + 1) * SUB_BLOCK]
            for j in range(sub_count(length))
            if not zero >> j & 1
        )
    )
    return NewChunk(chunk_region(length, rd, zero), digests, chunk_table(length, digests), body)


def check_chunk(
    hasher: TreeHasher, name: bytes, table: bytes, body: bytes, max_length: int
) -> tuple[int, Mask]:
    """Check an unsealed chunk object against its name: the table hashes to ``name`` and
    every body sub-block to its table digest. Returns ``(region length, zero mask)``."""
    what = name.hex()
    length, digests = parse_chunk_table(table, what, max_length)
    if hasher.region_digest(length, digests) != name:
        raise CorruptObjectError(f"chunk {what}: its table does not hash to its name")
    zero = sum(
        1 << j for j, d in enumerate(digests) if d == hasher.zero_digest(sub_length(length, j))
    )
    if zero == full_mask(length):
        raise CorruptObjectError(f"chunk {what} holds only zeros")
    _split_body(body, length, zero, what)  # sizes
    pos = 0
    for j in range(len(digests)):
        if zero >> j & 1:
            continue
        size = sub_length(length, j)
        if hasher.digest(body[pos : pos + size]) != digests[j]:
            raise CorruptObjectError(f"chunk {what}: sub-block {j} does not match its digest")
        pos += size
    return length, zero


def _split_body(body: bytes, length: int, zero: Mask, what: str) -> None:
    want = mask_bytes(length, full_mask(length) & ~zero)
    if len(body) != want:
        raise CorruptObjectError(f"{what}: body has {len(body)} bytes, want {want}")


# --------------------------------------------------------------------------- planning


class Action(enum.Enum):
    """What a backup does with one region (plan_region)."""

    KEEP = "keep"  # unchanged: copy the parent's entry
    ZERO = "zero"  # all zeros now
    REBASE = "rebase"  # store the whole region as a CHUNK (a full backup does this)
    PATCH = "patch"  # one new fragment (maybe none: zeros only) on the parent's base


@dataclass(frozen=True)
class RegionPlan:
    """The decision for one region and what the writer must read for it.

    ``read``: sub-blocks whose current bytes the writer needs (REBASE: every non-zero
    one; PATCH: the new fragment's). ``zero``: the zero mask of the result. ``keep``:
    the parent's fragments that stay (PATCH).
    """

    action: Action
    length: int
    read: Mask = 0
    zero: Mask = 0
    keep: tuple[Fragment, ...] = ()

    def __post_init__(self) -> None:
        if self.read & self.zero:
            raise ValueError("plan reads sub-blocks it declares zero")


def _parent_zero(parent: Region) -> Mask:
    if parent.kind is Kind.ZERO:
        return full_mask(parent.length)
    if parent.kind is Kind.LEGACY:
        return 0
    return parent.zero


def plan_region(
    parent: Region | None,
    length: int,
    dirty: Mask,
    zero: Mask,
    rehome: frozenset[PackId] = frozenset(),
) -> RegionPlan:
    """Decide KEEP / ZERO / REBASE / PATCH for one region of ``length`` bytes.

    ``parent``: the parent backup's entry for this region (None: no parent, or the region
    did not exist). ``dirty``: sub-blocks written since the parent (from the dirty
    bitmap). ``zero``: sub-blocks known to read as zeros now (block status); only these
    may be zeroed without reading. ``rehome``: packs whose fragments must not be kept.

    The result keeps the restore bound: a restore of the region fetches at most
    REBASE_NUM/REBASE_DEN of its non-zero bytes (plus at most MAX_FRAGMENTS + 1 objects).
    """
    full = full_mask(length)
    dirty &= full
    zero &= full
    if parent is None:
        return _rebase_or_zero(length, zero)
    # Bytes that kept their place in both lengths keep the parent's state; the boundary
    # sub-block (partial in either length) and everything past the old end are new.
    same = base_usable(parent.length, length)
    dirty |= full & ~same
    now_zero = ((_parent_zero(parent) & same) & ~dirty) | zero
    if now_zero == full:
        if parent.kind is Kind.ZERO and parent.length == length:
            return RegionPlan(Action.KEEP, length, zero=full)
        return RegionPlan(Action.ZERO, length, zero=full)
    if parent.kind is Kind.ZERO:
        # Small writes into an empty region: a fragment without a base (every non-zero
        # sub-block is new); larger ones make it a chunk.
        read = full & ~now_zero
        if mask_bytes(length, read) * BASELESS_DEN <= length * BASELESS_NUM:
            return RegionPlan(Action.PATCH, length, read=read, zero=now_zero)
        return _rebase_or_zero(length, now_zero)
    if parent.kind is Kind.LEGACY:
        # A v1 chunk has no digest table to patch onto. An unchanged one is kept: zeros
        # block status finds in it are taken to be in it already (section 24, rule 3).
        if not dirty and parent.length == length:
            return RegionPlan(Action.KEEP, length)
        return _rebase_or_zero(length, now_zero)

    # Parent fragments that stay: not re-homed, within the kept extent, and still
    # supplying some sub-block; the sub-blocks of the dropped ones are read again.
    reread = 0
    keep: list[Fragment] = []
    hidden = now_zero | dirty
    for frag in reversed(parent.fragments):
        effective = frag.mask & ~hidden
        if frag.pack in rehome or frag.mask & ~same:
            reread |= effective
        elif effective:
            keep.append(frag)
        hidden |= frag.mask
    keep.reverse()
    covered = now_zero | dirty
    for frag in keep:
        covered |= frag.mask
    # What neither zero, nor a kept fragment, nor the base (same extent) can supply.
    reread |= full & ~covered & ~base_usable(parent.base_length, length)
    # (A dropped fragment of a longer parent region may reach past the new end.)
    read = (dirty | reread) & ~now_zero & full
    uses_base = bool(full & ~(now_zero | read) & ~_union(keep))

    if (
        not read
        and now_zero == parent.zero
        and length == parent.length
        and len(keep) == len(parent.fragments)
    ):
        return RegionPlan(Action.KEEP, length, zero=now_zero, keep=tuple(keep))
    data = mask_bytes(length, full & ~now_zero)
    base = mask_bytes(parent.base_length, full_mask(parent.base_length) & ~parent.base_zero)
    fetch = base + sum(f.plain_length(length) for f in keep) + mask_bytes(length, read)
    if len(keep) + (1 if read else 0) > MAX_FRAGMENTS:
        # Too many pieces: merge every fragment into the new one (re-read what they
        # supply). Far cheaper than a rebase while the fragments are a small share.
        read = (read | _union(keep)) & ~now_zero
        keep = []
        fetch = base + mask_bytes(length, read)
    if parent.base_length == 0:
        # No base: the fragments are the region's bytes; a chunk once they pass the cap.
        if fetch * BASELESS_DEN > length * BASELESS_NUM or fetch * REBASE_DEN > data * REBASE_NUM:
            return _rebase_or_zero(length, now_zero)
    elif not uses_base or fetch * REBASE_DEN > data * REBASE_NUM:
        return _rebase_or_zero(length, now_zero)
    return RegionPlan(Action.PATCH, length, read=read, zero=now_zero, keep=tuple(keep))


def _union(fragments: Iterable[Fragment]) -> Mask:
    out = 0
    for f in fragments:
        out |= f.mask
    return out


def _rebase_or_zero(length: int, zero: Mask) -> RegionPlan:
    full = full_mask(length)
    if zero == full:
        return RegionPlan(Action.ZERO, length, zero=full)
    return RegionPlan(Action.REBASE, length, read=full & ~zero, zero=zero)


# --------------------------------------------------------------------------- patching


def fragment_body(data: bytes | bytearray | memoryview, mask: Mask) -> bytes:
    """The body of a fragment holding sub-blocks ``mask`` of region bytes ``data``."""
    view = memoryview(data)
    return b"".join(view[j * SUB_BLOCK : (j + 1) * SUB_BLOCK] for j in bits(mask))


def fragment_digests(
    hasher: TreeHasher, length: int, mask: Mask, body: bytes | bytearray | memoryview
) -> tuple[bytes, ...]:
    """Sub-block digests of a fragment body (sub-blocks ``mask`` of a ``length`` region)."""
    if len(body) != mask_bytes(length, mask):
        raise ValueError(f"fragment body of {len(body)} bytes for mask {mask:#x}")
    view = memoryview(body)
    out = []
    pos = 0
    for j in bits(mask):
        size = sub_length(length, j)
        out.append(hasher.digest(view[pos : pos + size]))
        pos += size
    return tuple(out)


def patched_region(
    hasher: TreeHasher,
    parent: Region,
    plan: RegionPlan,
    new: Fragment | None,
    base_digests: Sequence[bytes],
) -> Region:
    """The PATCHED entry for a PATCH plan: the parent's base, the kept fragments, ``new``
    (holding exactly ``plan.read``) and the zero mask; its RD computed from digests only.

    ``base_digests``: the base chunk's table (``parse_chunk_table``); only the entries of
    sub-blocks still read from the base matter. A ZERO parent, or one without a base,
    gives a region without a base (``base_digests`` empty).
    """
    if plan.action is not Action.PATCH or parent.kind is Kind.LEGACY:
        raise ValueError(f"patched_region for a {plan.action.value} plan")
    if (new.mask if new else 0) != plan.read:
        raise ValueError("the new fragment must hold exactly the sub-blocks the plan reads")
    if parent.kind is Kind.ZERO:
        base, base_length, base_zero = NO_BASE, 0, 0
    else:
        base, base_length, base_zero = parent.base, parent.base_length, parent.base_zero
    if len(base_digests) != sub_count(base_length):
        raise ValueError("base digest table does not fit the base chunk")
    fragments = (*plan.keep, new) if new else plan.keep
    region = Region(
        Kind.PATCHED,
        plan.length,
        bytes(DIGEST_SIZE),  # placeholder: checked for size only, replaced below
        base,
        base_length,
        base_zero,
        plan.zero,
        fragments,
    )
    digests = []
    k = len(fragments)
    for j in range(region.sub_count):
        s = region.source(j)
        if s < 0:
            digests.append(hasher.zero_digest(sub_length(plan.length, j)))
        elif s < k:
            digests.append(fragments[s].digest_of(j))
        else:
            digests.append(base_digests[j])
    return replace(region, digest=hasher.region_digest(plan.length, digests))


# --------------------------------------------------------------------------- restoring


def rebuild_region(
    hasher: TreeHasher,
    region: Region,
    base_body: bytes | None,
    fragment_bodies: Sequence[bytes],
    check: bool = True,
) -> bytes:
    """A region's bytes from its pieces (unsealed), checked against the index's digest.

    ``base_body``: CHUNK/PATCHED the base chunk's body, LEGACY the v1 chunk, ZERO None.
    ``CorruptObjectError`` if a piece has the wrong size or the result does not hash to
    the entry's RD (v1 digest for LEGACY): what lands on the disk is what was backed up.
    ``check=False`` skips that final hash (the piece size checks stay), for a caller that
    hashes the bytes later anyway (a restore's read-back compares them with the RD).
    """
    length = region.length
    if region.kind is Kind.ZERO:
        return bytes(length)
    if base_body is None:
        raise ValueError("rebuild_region needs the base body")
    if region.kind is Kind.LEGACY:
        if len(base_body) != length or hasher.digest(base_body) != region.digest:
            raise CorruptObjectError("v1 chunk does not match its index entry")
        return base_body
    if len(fragment_bodies) != len(region.fragments):
        raise ValueError("one body per fragment")
    if region.base_length:
        _split_body(base_body, region.base_length, region.base_zero, "base chunk")
    elif base_body:
        raise ValueError("a region without a base was given a base body")
    if region.kind is Kind.CHUNK and not region.base_zero:
        # The body is the region as it is (the common case of a full backup): no copy.
        if check and hasher.region_digest(length, hasher.sub_digests(base_body)) != region.digest:
            raise CorruptObjectError("rebuilt region does not match its digest in the index")
        return base_body
    for i, (frag, body) in enumerate(zip(region.fragments, fragment_bodies, strict=True)):
        if len(body) != frag.plain_length(length):
            raise CorruptObjectError(f"fragment {i}: body has {len(body)} bytes")
    out = bytearray(length)
    # Where each sub-block starts inside the base body / a fragment body.
    base_pos = _positions(region.base_length, full_mask(region.base_length) & ~region.base_zero)
    frag_pos = [_positions(length, f.mask) for f in region.fragments]
    k = len(region.fragments)
    zero = region.zero
    for j in range(region.sub_count):
        size = sub_length(length, j)
        at = j * SUB_BLOCK
        s = k if region.kind is Kind.CHUNK else region.source(j)
        if s < 0 or (s == k and region.base_zero >> j & 1):
            zero |= 1 << j
            continue  # already zeros
        if s == k:
            out[at : at + size] = base_body[base_pos[j] : base_pos[j] + size]
        else:
            p = frag_pos[s][j]
            out[at : at + size] = fragment_bodies[s][p : p + size]
    if check and hasher.region_digest(length, hasher.sub_digests(out, zero)) != region.digest:
        raise CorruptObjectError("rebuilt region does not match its digest in the index")
    return bytes(out)


def _positions(length: int, mask: Mask) -> dict[int, int]:
    """Offset of each sub-block of ``mask`` in the concatenation of those sub-blocks."""
    out = {}
    pos = 0
    for j in bits(mask):
        out[j] = pos
        pos += sub_length(length, j)
    return out


# --------------------------------------------------------------------------- a whole disk


def plan_disk(
    parents: Sequence[Region | None],
    lengths: Sequence[int],
    dirty: Sequence[Mask],
    zero: Sequence[Mask],
    pack_sizes: dict[PackId, int],
) -> list[RegionPlan]:
    """``plan_region`` for every region of a disk, with packs re-homed until every old pack
    the new index still uses is at least REHOME_LIVE referenced by it."""
    return plan_disk_rehome(parents, lengths, dirty, zero, pack_sizes)[0]


def plan_disk_rehome(
    parents: Sequence[Region | None],
    lengths: Sequence[int],
    dirty: Sequence[Mask],
    zero: Sequence[Mask],
    pack_sizes: dict[PackId, int],
) -> tuple[list[RegionPlan], frozenset[PackId]]:
    """``plan_disk``, and the packs it re-homes (a region planned again later, after its
    read found zeros, must re-home the same ones).

    ``parents[i]``: the parent's entry for region i (None past the parent's end);
    ``pack_sizes``: stored size of every pack the parent's index names. Packs only ever
    join the re-home set, so this ends after at most one round per pack.
    """
    count = len(lengths)
    if not len(parents) == len(dirty) == len(zero) == count:
        raise ValueError("plan_disk: one parent, dirty and zero mask per region")
    rehome: frozenset[PackId] = frozenset()
    plans = [plan_region(parents[i], lengths[i], dirty[i], zero[i]) for i in range(count)]
    while True:
        refs: dict[PackId, int] = {}
        for plan in plans:
            for frag in plan.keep:
                refs[frag.pack] = refs.get(frag.pack, 0) + frag.stored_length
        more = frozenset(
            pack
            for pack, used in refs.items()
            if used * REHOME_LIVE_DEN < pack_sizes[pack] * REHOME_LIVE_NUM
        )
        if more <= rehome:
            return plans, rehome
        rehome |= more
        for i, plan in enumerate(plans):
            if any(f.pack in more for f in plan.keep):
                plans[i] = plan_region(parents[i], lengths[i], dirty[i], zero[i], rehome)
