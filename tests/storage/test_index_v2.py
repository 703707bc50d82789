"""The format 2 index codec: round trips, and hostile bodies (truncated, forged counts,
fragments outside or overlapping their pack, hidden fragments, bad magic) refused with
``CorruptObjectError`` naming the index, before anything large is allocated."""

from __future__ import annotations

import struct
import tracemalloc
from dataclasses import replace

import pytest

from tests.storage.region_model import Store, backup, dirty_masks
from vmvault.storage import index_v2
from vmvault.storage.errors import CorruptObjectError, UnsupportedVersionError
from vmvault.storage.index_v2 import DiskIndex, decode_index_v2, encode_index_v2, from_v1_index
from vmvault.storage.region import (
    SUB_BLOCK,
    Fragment,
    Kind,
    Region,
    chunk_region,
    legacy_region,
    zero_region,
)

MiB = 1024 * 1024
R = MiB  # region size of the hand-made index
P = bytes(range(16))
Q = bytes(range(16, 32))


def digest(n: int) -> bytes:
    return bytes([n]) * 32


def hand_made() -> DiskIndex:
    """Three regions of 1 MiB, 1 MiB and 100 KiB: a chunk, a patched region with two
    fragments in one pack, a legacy chunk. Digests are made up: the codec checks structure,
    restores check digests."""
    f1 = Fragment(P, 8, 200, 0b110, (digest(3), digest(4)))
    f2 = Fragment(P, 208, 100, 0b100, (digest(5),))
    patched = Region(Kind.PATCHED, R, digest(1), digest(2), R, 0, 0b1, (f1, f2))
    return DiskIndex(
        2 * R + 100 * 1024,
        R,
        (
            chunk_region(R, digest(9), 0b10),
            patched,
            legacy_region(100 * 1024, digest(7)),
        ),
        {P: 400},
    )


def decode(body: bytes, **kw: object) -> DiskIndex:
    return decode_index_v2(body, "backups/vm/x/vda.index", **kw)  # type: ignore[arg-type]


def test_round_trip_by_hand() -> None:
    index = hand_made()
    body = encode_index_v2(index)
    assert decode(body, region_size=R, virtual_size=index.virtual_size) == index
    kept = replace(index, regions=tuple(r.kept() for r in index.regions))
    assert decode(encode_index_v2(kept)).regions[1].from_parent


def test_round_trip_of_a_real_chain() -> None:
    """Indexes written by the reference writer (chunks, patches, zeros) decode to themselves."""
    store = Store()
    size = 6 * MiB + 512
    disk = bytearray(b"\x5a" * size)
    disk[MiB : 2 * MiB] = bytes(MiB)
    index, _ = backup(store, None, bytes(disk), 4 * MiB, None, [0, 0])
    for n in range(6):
        at = (n * 7 + 1) * SUB_BLOCK
        disk[at : at + 100] = bytes([n + 1]) * 100
        dirty = dirty_masks(size, 4 * MiB, [at // SUB_BLOCK], SUB_BLOCK)
        index, _ = backup(store, index, bytes(disk), 4 * MiB, dirty, [0, 0])
        body = encode_index_v2(index)
        assert decode(body, region_size=4 * MiB, virtual_size=size, encrypted=True) == index
    assert index.regions[0].kind is Kind.PATCHED


def test_encode_refuses_what_decode_would() -> None:
    index = hand_made()
    bad = replace(index, pack_sizes={P: 250})  # fragment 2 ends at 308
    with pytest.raises(CorruptObjectError, match="outside pack"):
        encode_index_v2(bad)
    with pytest.raises(ValueError, match="regions for a disk"):
        encode_index_v2(replace(index, virtual_size=5 * R))


# --------------------------------------------------------------------------- hostile bodies


def unchecked(index: DiskIndex, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Encode without the writer's own check, as an attacker would."""
    with monkeypatch.context() as m:
        m.setattr(index_v2, "decode_index_v2", lambda *a, **k: None)
        return encode_index_v2(index)


def with_fragments(index: DiskIndex, *frags: Fragment) -> DiskIndex:
    """The hand-made index with region 1's fragments replaced, invariants bypassed."""
    region = index.regions[1]
    forged = replace(region)
    object.__setattr__(forged, "fragments", frags)
    return replace(index, regions=(index.regions[0], forged, index.regions[2]))


def test_bad_magic_and_newer_version() -> None:
    body = encode_index_v2(hand_made())
    with pytest.raises(CorruptObjectError, match="bad magic"):
        decode(b"VMVI" + body[4:])
    with pytest.raises(UnsupportedVersionError, match="upgrade vmvault"):
        decode(body[:4] + struct.pack("<H", 3) + body[6:])


def test_every_truncation_and_trailing_bytes_are_refused() -> None:
    body = encode_index_v2(hand_made())
    for cut in range(len(body)):
        with pytest.raises(CorruptObjectError, match=r"vda\.index"):
            decode(body[:cut])
    with pytest.raises(CorruptObjectError, match="trailing"):
        decode(body + b"\0")


def test_sizes_must_match_the_manifest_and_config() -> None:
    body = encode_index_v2(hand_made())
    with pytest.raises(CorruptObjectError, match="region size"):
        decode(body, region_size=4 * MiB)
    with pytest.raises(CorruptObjectError, match="disk size"):
        decode(body, virtual_size=3 * R)


def _header(body: bytes, **fields: int) -> bytes:
    names = ["magic", "version", "res", "rsize", "sub", "vsize", "count", "npacks", "res2"]
    values = dict(zip(names, struct.unpack_from("<4sHHIIQQII", body), strict=True))
    values.update(fields)
    return struct.pack("<4sHHIIQQII", *values.values()) + body[40:]


@pytest.mark.parametrize(
    "fields",
    [
        {"vsize": 2**62, "count": 2**62 // R},  # a huge disk claimed in a small body
        {"vsize": 2**40, "count": 2**40 // R},  # under the entry cap, still far too few bytes
        {"npacks": 2**32 - 1},
        {"count": 7},  # does not fit the size
        {"sub": 4096},
        {"rsize": 3 * MiB},
    ],
)
def test_forged_counts_fail_without_allocating(fields: dict[str, int]) -> None:
    body = _header(encode_index_v2(hand_made()), **fields)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptObjectError):
            decode(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB


def test_fragments_outside_their_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    index = hand_made()
    f2 = index.regions[1].fragments[1]
    for bad in (replace(f2, offset=399), replace(f2, offset=4), replace(f2, stored_length=2**31)):
        body = unchecked(with_fragments(index, index.regions[1].fragments[0], bad), monkeypatch)
        with pytest.raises(CorruptObjectError, match="outside pack"):
            decode(body)


def test_overlapping_fragments_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    index = hand_made()
    f1, f2 = index.regions[1].fragments
    body = unchecked(with_fragments(index, f1, replace(f2, offset=150)), monkeypatch)
    with pytest.raises(CorruptObjectError, match="overlap in pack"):
        decode(body)


def test_hidden_and_foreign_fragments_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    index = hand_made()
    f1, f2 = index.regions[1].fragments
    # f1 entirely under a newer fragment: a writer must have dropped it.
    hidden = replace(f2, mask=0b110, digests=(digest(5), digest(6)), stored_length=150)
    with pytest.raises(CorruptObjectError, match="hidden by newer"):
        decode(unchecked(with_fragments(index, f1, hidden), monkeypatch))
    # A fragment naming a pack past the table (its u32 pack index at byte 175).
    body = bytearray(encode_index_v2(index))
    struct.pack_into("<I", body, 175, 1)
    with pytest.raises(CorruptObjectError, match="names pack #1 of 1"):
        decode(bytes(body))
    # A pack listed but used by no fragment.
    plain = replace(index, regions=(index.regions[0], zero_region(R), index.regions[2]))
    raw = encode_index_v2(plain)
    listed = _header(raw[:40] + struct.pack("<16sQ", Q, 400) + raw[40:], npacks=1)
    with pytest.raises(CorruptObjectError, match="listed but unused"):
        decode(listed)


def test_masks_kinds_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    body = bytearray(encode_index_v2(hand_made()))
    first = 40 + 24  # the first region entry
    for pos, value, message in [
        (first, 9, "unknown region kind"),
        (first + 1, 0x80, "unknown flags"),
        (first + 2 + 32 + 1, 0xFF, None),  # a zero mask of 16 bits is fine at 0xFF...
    ]:
        bad = bytearray(body)
        bad[pos] = value
        if message is None:
            decode(bytes(bad))
        else:
            with pytest.raises(CorruptObjectError, match=message):
                decode(bytes(bad))
    # A tail region of 100 KiB has two sub-blocks: bit 2 of its mask is past its end.
    tail = replace(
        hand_made(), regions=(*hand_made().regions[:2], chunk_region(100 * 1024, digest(8), 0))
    )
    body = bytearray(encode_index_v2(tail))
    body[-1] = 0b100
    with pytest.raises(CorruptObjectError, match="bits past the region"):
        decode(bytes(body))


def test_a_v1_index_becomes_zero_and_legacy_regions() -> None:
    index = from_v1_index(2 * R + 5, R, ["ab" * 32, None, "cd" * 32])
    assert [r.kind for r in index.regions] == [Kind.LEGACY, Kind.ZERO, Kind.LEGACY]
    assert [r.length for r in index.regions] == [R, R, 5]
    assert decode(encode_index_v2(index)) == index
    with pytest.raises(CorruptObjectError, match="v1 index entries"):
        from_v1_index(2 * R + 5, R, [None])
