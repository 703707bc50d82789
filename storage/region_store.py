"""Format 2 objects on a backend: chunk objects, fragments in packs, and region rebuilds.

docs/repository-format.md sections 21-23. Every read is capped by what the index says
the object must hold, and every rebuilt region can be checked against its digest::

    chunks/<rd0rd1>/<rd>   u32le table_len | seal(key#table, table) | seal(key, body)
    packs/<p0p1>/<id>      "VMVP" u16 1 u16 0 | seal(key#off, fragment) | seal(...) | ...

Writers and readers (storage/region_writer.py, storage/disk_reader.py, verify and GC)
share this module, so the key names and the sealing rules live in one place.
"""

from __future__ import annotations

from vmvault.storage.backends import Backend, Blob
from vmvault.storage.crypto import Codec
from vmvault.storage.errors import CorruptObjectError
from vmvault.storage.format import stored_limit
from vmvault.storage.region import (
    CHUNK_TABLE_SUFFIX,
    Fragment,
    Kind,
    Mask,
    NewChunk,
    PackId,
    Region,
    TreeHasher,
    check_chunk,
    chunk_object,
    chunk_table_stored,
    full_mask,
    mask_bytes,
    parse_chunk_table,
    rebuild_region,
    split_chunk_object,
)

PACKS_PREFIX = "packs/"


def chunk_name_key(name: bytes | str) -> str:
    """``chunks/<h0h1>/<hex>``: a v2 chunk by its RD (raw or hex), or a v1 chunk."""
    h = name if isinstance(name, str) else name.hex()
    return f"chunks/{h[:2]}/{h}"


def pack_key(pack: PackId) -> str:
    h = pack.hex()
    return f"packs/{h[:2]}/{h}"


def fragment_aad(pack: PackId, offset: int) -> str:
    """The associated data of a fragment: its pack and place (a moved fragment fails)."""
    return f"{pack_key(pack)}#{offset}"


class RegionStore:
    """Format 2 reads and writes of one repository's backend (thread-safe)."""

    def __init__(self, backend: Backend, codec: Codec, region_size: int) -> None:
        self.backend = backend
        self.codec = codec
        self.region_size = region_size
        self.hasher = TreeHasher(codec.raw_digest)

    # -- chunk objects --------------------------------------------------------------

    def seal_chunk(self, new: NewChunk) -> tuple[Blob, ...]:
        """The stored bytes of a chunk object, as pieces a backend writes one after the
        other (the body is not copied behind the table). The table is sealed uncompressed:
        its size is fixed."""
        key = chunk_name_key(new.region.digest)
        table = self.codec.seal(key + CHUNK_TABLE_SUFFIX, new.table, compress=False)
        return (chunk_object(table, b""), *self.codec.seal_parts(key, new.body))

    def chunk_table(self, name: bytes, length: int) -> tuple[bytes, ...]:
        """The sub-block digests of the chunk ``name`` of a region of ``length`` bytes: one
        ranged GET of its table, checked against the name (the RD is a hash of it)."""
        key = chunk_name_key(name)
        table_len = chunk_table_stored(length, self.codec.encrypted)
        stored = self.backend.get_range(key, 0, 4 + table_len)
        sealed, _ = split_chunk_object(stored, name.hex())
        if len(sealed) != table_len:
            raise CorruptObjectError(f"chunk {name.hex()}: table of {len(sealed)} bytes")
        table = self.codec.unseal(key + CHUNK_TABLE_SUFFIX, sealed, limit=len(sealed))
        got_length, digests = parse_chunk_table(table, name.hex(), self.region_size)
        if got_length != length:
            raise CorruptObjectError(f"chunk {name.hex()} holds {got_length} bytes, not {length}")
        if self.hasher.region_digest(length, digests) != name:
            raise CorruptObjectError(f"chunk {name.hex()}: its table does not hash to its name")
        return digests

    def _chunk_parts(self, name: bytes, length: int, body_plain: int) -> tuple[bytes, bytes]:
        """``(sealed table, sealed body)`` of a chunk, fetched whole (the table is a few KiB
        of a 4 MiB object: one GET is cheaper than a second round trip)."""
        key = chunk_name_key(name)
        table_len = chunk_table_stored(length, self.codec.encrypted)
        stored = self.backend.get(key, max_size=4 + table_len + stored_limit(body_plain))
        table, body = split_chunk_object(stored, name.hex())
        if len(table) != table_len:
            raise CorruptObjectError(f"chunk {name.hex()}: table of {len(table)} bytes")
        return table, body

    def chunk_body(self, region: Region) -> bytes:
        """The plaintext body of ``region``'s base chunk (its non-zero sub-blocks)."""
        want = mask_bytes(region.base_length, full_mask(region.base_length) & ~region.base_zero)
        _, sealed = self._chunk_parts(region.base, region.base_length, want)
        body = self.codec.unseal(chunk_name_key(region.base), sealed, limit=want)
        if len(body) != want:
            raise CorruptObjectError(
                f"chunk {region.base.hex()}: a body of {len(body)} bytes does not match its "
                f"table ({want} bytes)"
            )
        return body

    def check_whole_chunk(self, name: bytes, length: int) -> tuple[int, Mask, int]:
        """Fetch a chunk whole and check table and every sub-block against its name
        (``verify --read-data``). Returns ``(length, zero mask, plaintext bytes)``."""
        key = chunk_name_key(name)
        table_sealed, body_sealed = self._chunk_parts(name, length, length)
        table = self.codec.unseal(key + CHUNK_TABLE_SUFFIX, table_sealed, limit=len(table_sealed))
        body = self.codec.unseal(key, body_sealed, limit=length)
        got_length, zero = check_chunk(self.hasher, name, table, body, self.region_size)
        if got_length != length:
            raise CorruptObjectError(f"chunk {name.hex()} holds {got_length} bytes, not {length}")
        return got_length, zero, len(body)

    # -- fragments -----------------------------------------------------------------

    def fragment(self, frag: Fragment, length: int) -> bytes:
        """One fragment's plaintext body: a ranged GET of its bytes in the pack."""
        want = frag.plain_length(length)
        stored = self.backend.get_range(pack_key(frag.pack), frag.offset, frag.stored_length)
        body = self.codec.unseal(fragment_aad(frag.pack, frag.offset), stored, limit=want)
        if len(body) != want:
            raise CorruptObjectError(
                f"fragment at {frag.offset} of pack {frag.pack.hex()}: {len(body)} bytes, "
                f"expected {want}"
            )
        return body

    # -- regions -------------------------------------------------------------------

    def read_region(self, region: Region, check: bool = True) -> bytes | None:
        """A CHUNK or PATCHED region's bytes from its pieces; None for ZERO.

        ``check``: compare the result with the entry's RD (``CorruptObjectError`` if it
        differs). Without it the caller must (a restore's read-back does).
        """
        if region.kind is Kind.ZERO:
            return None
        if region.kind is Kind.LEGACY:
            raise ValueError("a LEGACY region is a version 1 chunk: read it with read_chunk")
        base = self.chunk_body(region) if region.base_length else b""
        bodies = [self.fragment(f, region.length) for f in region.fragments]
        return rebuild_region(self.hasher, region, base, bodies, check)

    def region_digest_hex(self, data: bytes | bytearray | memoryview) -> str:
        """The RD of region bytes ``data`` in hex: what a read-back compares with."""
        view = memoryview(data)
        return self.hasher.region_digest(len(view), self.hasher.sub_digests(view)).hex()
