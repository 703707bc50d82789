"""Packs: many small fragments of one disk of one backup, written as one object.

docs/repository-format.md section 22. 300 scattered 4 KiB writes become 300 fragments
in one pack and one PUT, not 300 tiny objects::

    pack = "VMVP" u16 1 u16 0 | frag @8 | frag @8+n0 | ...      one PUT at ~16 MiB or at the end

A fragment is compressed outside the lock (the costly part, in the writer's pool threads)
and encrypted under it, because its associated data names its offset in the pack.
"""

from __future__ import annotations

import secrets
import threading

from vmvault.storage.backends import Backend
from vmvault.storage.crypto import Codec
from vmvault.storage.errors import WriterError
from vmvault.storage.index_v2 import PACK_HEADER, PACK_MAGIC, PACK_VERSION
from vmvault.storage.region import PACK_ID_SIZE, PackId
from vmvault.storage.region_store import fragment_aad, pack_key

# Target size of a pack (not part of the format): large enough that a backup of small
# changes is a handful of PUTs, small enough that a partly superseded pack is cheap to keep.
PACK_TARGET = 16 << 20


class PackWriter:
    """Appends sealed fragments to the open pack and PUTs each full pack (thread-safe)."""

    def __init__(self, backend: Backend, codec: Codec, target: int = PACK_TARGET) -> None:
        self.backend = backend
        self.codec = codec
        self.target = target
        self._lock = threading.Lock()
        self._pack: PackId = b""
        self._buf: bytearray | None = None
        self.sizes: dict[PackId, int] = {}  # every pack written: its stored size
        self.uploaded = 0
        self.puts = 0

    def add(self, body: bytes) -> tuple[PackId, int, int]:
        """Seal ``body`` into the open pack; returns ``(pack id, offset, stored length)``.
        A pack that reaches the target is written before this returns."""
        frame = self.codec.frame(body)
        full: tuple[PackId, bytes] | None = None
        with self._lock:
            if self._buf is None:
                self._pack = secrets.token_bytes(PACK_ID_SIZE)
                self._buf = bytearray(PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, 0))
            pack, offset = self._pack, len(self._buf)
            stored = self.codec.seal_frame(fragment_aad(pack, offset), frame)
            self._buf += stored
            if len(self._buf) >= self.target:
                full = (pack, bytes(self._buf))
                self._buf = None
        if full is not None:
            self._put(*full)
        return pack, offset, len(stored)

    def close(self) -> None:
        """Write the open pack, if any (the disk is done)."""
        with self._lock:
            buf, self._buf = self._buf, None
        if buf is not None:
            self._put(self._pack, bytes(buf))

    def _put(self, pack: PackId, data: bytes) -> None:
        # A random 128-bit id: if_absent only guards against the impossible collision.
        if not self.backend.put(pack_key(pack), data, if_absent=True, defer_sync=True):
            raise WriterError(f"pack {pack.hex()} already exists")
        with self._lock:
            self.sizes[pack] = len(data)
            self.uploaded += len(data)
            self.puts += 1
