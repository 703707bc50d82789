"""Repository format 2: the disk index codec (``VMV2``), strict and capped for hostile input.

Body layout (before sealing, little-endian); docs/repository-format.md, "Format 2":

    header   "VMV2" | u16 version | u16 reserved | u32 region_size | u32 sub_block
             | u64 virtual_size | u64 region_count | u32 pack_count | u32 reserved
    packs    pack_count x (16-byte pack id | u64 stored size)
    regions  region_count entries, each  u8 kind | u8 flags | kind-specific fields

Every count is checked against the bytes left before anything is allocated for it, so a
forged count fails at once; every region is checked by ``Region`` itself (coverage,
hidden fragments), and fragments by their pack's size and by each other (no two
fragments share a byte of a pack).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vmvault.storage.errors import CorruptObjectError, UnsupportedVersionError
from vmvault.storage.format import MAX_INDEX_ENTRIES, check_chunk_size, chunk_count, stored_limit
from vmvault.storage.region import (
    DIGEST_SIZE,
    FORMAT_MAX_FRAGMENTS,
    PACK_ID_SIZE,
    SUB_BLOCK,
    Fragment,
    Kind,
    Mask,
    PackId,
    Region,
    popcount,
    sub_count,
)

INDEX_V2_MAGIC = b"VMV2"
INDEX_V2_VERSION = 2
# Every pack object starts with this header; fragments follow it, each sealed alone with
# the associated data "<pack key>#<offset>".
PACK_MAGIC = b"VMVP"
PACK_HEADER = struct.Struct("<4sHH")
PACK_VERSION = 1
# Sealing adds at least a kind byte (1), encrypted a nonce and a tag (12 + 16).
MIN_FRAGMENT_STORED = 1

FLAG_FROM_PARENT = 0x01

_HEADER = struct.Struct("<4sHHIIQQII")
_PACK = struct.Struct(f"<{PACK_ID_SIZE}sQ")
_KIND = struct.Struct("<BB")
_BASE = struct.Struct("<I")
_FRAG = struct.Struct("<IQI")
_COUNT = struct.Struct("<B")


@dataclass(frozen=True)
class DiskIndex:
    """One disk of one backup: its size, its regions in order and the packs they use."""

    virtual_size: int
    region_size: int
    regions: tuple[Region, ...]
    pack_sizes: dict[PackId, int]  # stored size of every referenced pack


def _mask_len(length: int) -> int:
    return (sub_count(length) + 7) // 8


def _put_mask(out: bytearray, length: int, mask: Mask) -> None:
    out += mask.to_bytes(_mask_len(length), "little")


def region_length(virtual_size: int, region_size: int, i: int) -> int:
    return min(region_size, virtual_size - i * region_size)


def encode_index_v2(index: DiskIndex) -> bytes:
    """The body of an index object; ``ValueError`` if ``index`` breaks a rule of the spec."""
    count = chunk_count(index.virtual_size, index.region_size)
    if len(index.regions) != count:
        raise ValueError(f"{len(index.regions)} regions for a disk of {count}")
    packs = sorted({f.pack for r in index.regions for f in r.fragments})
    order = {p: i for i, p in enumerate(packs)}
    out = bytearray(
        _HEADER.pack(
            INDEX_V2_MAGIC,
            INDEX_V2_VERSION,
            0,
            index.region_size,
            SUB_BLOCK,
            index.virtual_size,
            count,
            len(packs),
            0,
        )
    )
    for p in packs:
        out += _PACK.pack(p, index.pack_sizes[p])
    for i, r in enumerate(index.regions):
        if r.length != region_length(index.virtual_size, index.region_size, i):
            raise ValueError(f"region {i} has {r.length} bytes")
        out += _KIND.pack(r.kind, FLAG_FROM_PARENT if r.from_parent else 0)
        if r.kind is Kind.ZERO:
            continue
        out += r.digest
        if r.kind is Kind.LEGACY:
            continue
        if r.kind is Kind.CHUNK:
            _put_mask(out, r.length, r.zero)
            continue
        out += r.base
        out += _BASE.pack(r.base_length)
        _put_mask(out, r.base_length, r.base_zero)
        _put_mask(out, r.length, r.zero)
        out += _COUNT.pack(len(r.fragments))
        for f in r.fragments:
            out += _FRAG.pack(order[f.pack], f.offset, f.stored_length)
            _put_mask(out, r.length, f.mask)
            out += b"".join(f.digests)
    body = bytes(out)
    decode_index_v2(body, "index being written")  # the writer obeys the reader's rules
    return body


class _Reader:
    """Bounds-checked reading of a body; every short read names the index."""

    def __init__(self, body: bytes, what: str) -> None:
        self.body = memoryview(body)
        self.pos = 0
        self.what = what

    def left(self) -> int:
        return len(self.body) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n > self.left():
            raise CorruptObjectError(f"index {self.what} is truncated (in {field})")
        out = bytes(self.body[self.pos : self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct, field: str) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, field))

    def mask(self, length: int, field: str) -> Mask:
        raw = self.take(_mask_len(length), field)
        mask = int.from_bytes(raw, "little")
        if mask >> sub_count(length):
            raise CorruptObjectError(f"index {self.what}: {field} has bits past the region")
        return mask


def decode_index_v2(
    body: bytes,
    what: str,
    region_size: int | None = None,
    virtual_size: int | None = None,
    encrypted: bool | None = None,
) -> DiskIndex:
    """Parse an index body; ``CorruptObjectError`` naming ``what`` and the region offset on
    any inconsistency. ``region_size``/``virtual_size``: what the repository config and the
    manifest say (checked when given). ``encrypted``: tightens the smallest fragment."""
    rd = _Reader(body, what)
    magic, version, reserved, rsize, sub, vsize, count, npacks, reserved2 = rd.unpack(
        _HEADER, "header"
    )
    if magic != INDEX_V2_MAGIC:
        raise CorruptObjectError(f"index {what}: bad magic {magic!r}")
    if version > INDEX_V2_VERSION:
        raise UnsupportedVersionError(
            f"index {what} has version {version}, newer than supported: upgrade vmvault"
        )
    if version != INDEX_V2_VERSION or reserved or reserved2:
        raise CorruptObjectError(f"index {what}: bad version {version} or reserved fields")
    try:
        check_chunk_size(rsize)
    except CorruptObjectError as err:
        raise CorruptObjectError(f"index {what}: {err}") from None
    if sub != SUB_BLOCK:
        raise CorruptObjectError(f"index {what}: sub-block size {sub}, not {SUB_BLOCK}")
    if region_size is not None and rsize != region_size:
        raise CorruptObjectError(f"index {what}: region size {rsize}, not the repository's")
    if virtual_size is not None and vsize != virtual_size:
        raise CorruptObjectError(f"index {what}: disk size {vsize}, not the manifest's")
    if vsize <= 0 or count != chunk_count(vsize, rsize) or count > MAX_INDEX_ENTRIES:
        raise CorruptObjectError(f"index {what}: {count} regions do not fit {vsize} bytes")
    # Each region takes at least 2 bytes, each pack 24: a forged count fails here.
    if count * _KIND.size + npacks * _PACK.size > rd.left():
        raise CorruptObjectError(
            f"index {what}: {count} regions and {npacks} packs in {rd.left()} bytes"
        )
    pack_ids: list[PackId] = []
    pack_sizes: dict[PackId, int] = {}
    for _ in range(npacks):
        pid, size = rd.unpack(_PACK, "pack table")
        pack: PackId = pid
        if pack in pack_sizes:
            raise CorruptObjectError(f"index {what}: pack {pack.hex()} listed twice")
        if size <= PACK_HEADER.size:
            raise CorruptObjectError(f"index {what}: pack {pack.hex()} of {size} bytes")
        pack_ids.append(pack)
        pack_sizes[pack] = size
    min_stored = 1 + (28 if encrypted else 0)
    used: dict[PackId, list[tuple[int, int]]] = {p: [] for p in pack_ids}
    regions: list[Region] = []
    for i in range(count):
        length = region_length(vsize, rsize, i)
        where = f"region at offset {i * rsize}"
        try:
            regions.append(
                _region(rd, length, rsize, where, pack_ids, pack_sizes, used, min_stored)
            )
        except ValueError as err:
            raise CorruptObjectError(f"index {what}: {where}: {err}") from None
    if rd.left():
        raise CorruptObjectError(f"index {what} has {rd.left()} trailing bytes")
    for pack, spans in used.items():
        if not spans:
            raise CorruptObjectError(f"index {what}: pack {pack.hex()} is listed but unused")
        spans.sort()
        for (a_off, a_len), (b_off, _) in itertools.pairwise(spans):
            if a_off + a_len > b_off:
                raise CorruptObjectError(
                    f"index {what}: fragments overlap in pack {pack.hex()} at offset {b_off}"
                )
    return DiskIndex(vsize, rsize, tuple(regions), pack_sizes)


def _region(
    rd: _Reader,
    length: int,
    region_size: int,
    where: str,
    pack_ids: Sequence[PackId],
    pack_sizes: dict[PackId, int],
    used: dict[PackId, list[tuple[int, int]]],
    min_stored: int,
) -> Region:
    kind_byte, flags = rd.unpack(_KIND, where)
    if flags & ~FLAG_FROM_PARENT:
        raise ValueError(f"unknown flags 0x{flags:02x}")
    try:
        kind = Kind(kind_byte)
    except ValueError:
        raise ValueError(f"unknown region kind {kind_byte}") from None
    parent = bool(flags & FLAG_FROM_PARENT)
    if kind is Kind.ZERO:
        return Region(kind, length, from_parent=parent)
    digest = rd.take(DIGEST_SIZE, where)
    if kind is Kind.LEGACY:
        return Region(kind, length, digest, from_parent=parent)
    if kind is Kind.CHUNK:
        zero = rd.mask(length, "zero mask")
        return Region(kind, length, digest, digest, length, zero, zero, from_parent=parent)
    base = rd.take(DIGEST_SIZE, where)
    (base_length,) = rd.unpack(_BASE, where)
    # The base was a region of this disk at some size: never larger than a region; 0 is
    # no base at all (every sub-block from fragments or zeros; Region checks the rest).
    if not 0 <= base_length <= region_size:
        raise ValueError(f"base chunk of {base_length} bytes")
    base_zero = rd.mask(base_length, "base zero mask")
    zero = rd.mask(length, "zero mask")
    (nfrag,) = rd.unpack(_COUNT, where)
    if nfrag > FORMAT_MAX_FRAGMENTS:
        raise ValueError(f"{nfrag} fragments (at most {FORMAT_MAX_FRAGMENTS})")
    fragments = []
    for n in range(nfrag):
        p_index, offset, stored = rd.unpack(_FRAG, where)
        if p_index >= len(pack_ids):
            raise ValueError(f"fragment {n} names pack #{p_index} of {len(pack_ids)}")
        pack = pack_ids[p_index]
        mask = rd.mask(length, f"fragment {n} mask")
        nsub = popcount(mask)
        if nsub * DIGEST_SIZE > rd.left():
            raise CorruptObjectError(f"index {rd.what} is truncated (in {where})")
        digests = tuple(rd.take(DIGEST_SIZE, where) for _ in range(nsub))
        plain = nsub * SUB_BLOCK
        if offset < PACK_HEADER.size or offset + stored > pack_sizes[pack]:
            raise ValueError(
                f"fragment {n} at {offset}+{stored} is outside pack {pack.hex()} "
                f"of {pack_sizes[pack]} bytes"
            )
        if not min_stored <= stored <= stored_limit(plain):
            raise ValueError(f"fragment {n} of {stored} stored bytes for {nsub} sub-blocks")
        used[pack].append((offset, stored))
        fragments.append(Fragment(pack, offset, stored, mask, digests))
    return Region(
        kind, length, digest, base, base_length, base_zero, zero, tuple(fragments), parent
    )


def from_v1_index(
    virtual_size: int,
    chunk_size: int,
    digests: Sequence[str | None],
    from_parent: Sequence[bool] | None = None,
) -> DiskIndex:
    """A version 1 index (hex digest or None per chunk, and its "from parent" flags) as
    format 2 regions: ZERO and LEGACY. How a v2 writer uses a v1 parent, and a v2 reader
    a v1 backup; nothing is rewritten."""
    count = chunk_count(virtual_size, chunk_size)
    if len(digests) != count:
        raise CorruptObjectError(f"{len(digests)} v1 index entries for {count} chunks")
    regions = []
    for i, d in enumerate(digests):
        length = region_length(virtual_size, chunk_size, i)
        kept = bool(from_parent[i]) if from_parent is not None else False
        regions.append(
            Region(Kind.ZERO, length, from_parent=kept)
            if d is None
            else Region(Kind.LEGACY, length, bytes.fromhex(d), from_parent=kept)
        )
    return DiskIndex(virtual_size, chunk_size, tuple(regions), {})
