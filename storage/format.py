"""The repository format: object keys, names, ``config``, disk indexes and manifests.

Everything here is pure (bytes in, objects out); docs/repository-format.md is the spec.
"""

from __future__ import annotations

import json
import re
import secrets
import struct
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NewType

from vmvault.storage.errors import (
    BackupNotFoundError,
    CorruptObjectError,
    InvalidNameError,
    UnsupportedVersionError,
)

# The newest versions this code reads; ``init`` writes FORMAT_VERSION (sections 15, 20).
FORMAT_VERSION = 2
MANIFEST_VERSION = 2
# Format 2's sub-block size, the only value section 20 defines.
SUB_BLOCK_SIZE = 64 * 1024
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024

# Caps on what a reader accepts from the repository (docs/repository-format.md, section
# 17). A hostile or damaged store must get a clear refusal, never exhaust memory or the
# stack. Metadata objects are tiny (a manifest is a few KiB); the caps are generous.
MAX_CONFIG_BYTES = 64 * 1024
MAX_KEY_BYTES = 64 * 1024
MAX_LOCK_BYTES = 64 * 1024
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 64
# Index bodies: exactly 28 + 33 * ceil(V / C) bytes, from the manifest. This absolute
# cap (2^25 entries, 1.1 GB: 128 TiB disks at 4 MiB chunks) only bounds a manifest that
# lies about its disk size, and indexes read without a manifest.
MAX_INDEX_ENTRIES = 2**25
# A version 2 index body is at most this large (section 28).
MAX_INDEX_V2_BYTES = 2**30
# Sealing adds a kind byte and, encrypted, nonce and tag; a zstd frame can be slightly
# larger than its input. A stored object beyond this is refused unread.
SEAL_OVERHEAD = 1024


def stored_limit(body_limit: int) -> int:
    """The largest stored (sealed) object whose body may have ``body_limit`` bytes."""
    return body_limit + body_limit // 128 + SEAL_OVERHEAD


ChunkDigest = NewType("ChunkDigest", str)
BackupId = NewType("BackupId", str)
Kind = Literal["full", "incremental"]

# Domain, disk, host and schedule names become parts of object keys, queue names and
# file names: a conservative alphabet, no '/', no NUL, cannot start with '.'. The one
# definition: the fleet config (worker/config.py) validates names with it too.
# Always use fullmatch: "$" alone also matches before a trailing newline ("vm\n").
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_NAME_RE = re.compile(NAME_PATTERN)
_BACKUP_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9a-f]{8}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")

CONFIG_KEY = "config"
KEY_KEY = "key"
CHUNKS_PREFIX = "chunks/"
BACKUPS_PREFIX = "backups/"
LOCKS_PREFIX = "locks/"
MANIFEST_NAME = "manifest.json"
VERIFICATION_NAME = "verification.json"  # section 30
INDEX_SUFFIX = ".index"


def check_name(name: str, what: str) -> str:
    """``name`` if it is a safe domain/disk name, else ``InvalidNameError``."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid {what} name {name!r}: use 1-63 characters [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return name


def check_backup_id(backup_id: str) -> BackupId:
    if not isinstance(backup_id, str) or not _BACKUP_ID_RE.fullmatch(backup_id):
        raise InvalidNameError(
            f"invalid backup id {backup_id!r}: expected e.g. 20260101T020000.000000Z-1a2b3c4d"
        )
    return BackupId(backup_id)


def check_digest(digest: str) -> ChunkDigest:
    if not _DIGEST_RE.fullmatch(digest):
        raise CorruptObjectError(f"invalid chunk digest {digest!r}")
    return ChunkDigest(digest)


def new_backup_id(now: datetime) -> BackupId:
    """Ids sort by creation time (UTC, microseconds); 32 random bits break ties."""
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return BackupId(f"{stamp}-{secrets.token_hex(4)}")


def chunk_key(digest: str) -> str:
    return f"{CHUNKS_PREFIX}{digest[:2]}/{digest}"


def backup_prefix(domain: str, backup_id: str) -> str:
    return f"{BACKUPS_PREFIX}{check_name(domain, 'domain')}/{check_backup_id(backup_id)}/"


def manifest_key(domain: str, backup_id: str) -> str:
    return backup_prefix(domain, backup_id) + MANIFEST_NAME


def index_key(domain: str, backup_id: str, disk: str) -> str:
    return backup_prefix(domain, backup_id) + check_name(disk, "disk") + INDEX_SUFFIX


def parse_backup_key(key: str) -> tuple[str, str, str] | None:
    """``(domain, backup_id, leaf)`` of a key under ``backups/``, None if it is not one."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "backups":
        return None
    _, domain, backup_id, leaf = parts
    if not _NAME_RE.fullmatch(domain) or not _BACKUP_ID_RE.fullmatch(backup_id):
        return None
    return domain, backup_id, leaf


def _utc(text: str, what: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError) as err:
        raise CorruptObjectError(f"{what}: bad timestamp {text!r}") from err
    if value.tzinfo is None:
        raise CorruptObjectError(f"{what}: timestamp {text!r} has no time zone")
    return value.astimezone(UTC)


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


# Outside strings, only brackets matter for depth; inside, a backslash escapes one byte.
_JSON_TOKENS = re.compile(rb'["\\\[\]{}]')


def _nests_deeper(data: bytes, limit: int) -> bool:
    """True if ``data`` (JSON text) opens more than ``limit`` arrays/objects at once.

    A loop, not recursion: the point is to refuse what would overflow ``json.loads``.
    """
    depth = 0
    in_string = False
    escaped = -1  # position of a byte escaped by a backslash inside a string
    for match in _JSON_TOKENS.finditer(data):
        pos = match.start()
        char = data[pos]
        if in_string:
            if pos == escaped:
                continue
            if char == 0x5C:  # backslash
                escaped = pos + 1
            elif char == 0x22:  # quote
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif char in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def parse_json(data: bytes, what: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for an object read from the repository, with its size and depth capped.

    ``CorruptObjectError`` names ``what`` for anything too large, too deep or not JSON.
    """
    if len(data) > max_bytes:
        raise CorruptObjectError(f"{what} is {len(data)} bytes, more than the {max_bytes} allowed")
    if _nests_deeper(data, max_depth):
        raise CorruptObjectError(f"{what} nests arrays/objects deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise CorruptObjectError(f"{what} is not valid JSON: {err}") from err


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RepoConfig:
    """The ``config`` object: written once by ``init``, never changed."""

    id: str
    chunk_size: int
    encrypted: bool
    created: datetime
    version: int = FORMAT_VERSION
    hash: str = "blake3"
    compression: str = "zstd"

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": "vmvault-repository",
            "version": self.version,
            "id": self.id,
            "chunk_size": self.chunk_size,
            "hash": self.hash,
            "compression": self.compression,
            "encryption": "aes-256-gcm" if self.encrypted else "none",
            "created": iso(self.created),
        }
        if self.version >= 2:
            doc["sub_block"] = SUB_BLOCK_SIZE
        return json.dumps(doc, indent=2).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, url: str) -> RepoConfig:
        doc = parse_json(data, f"{url}: config object", MAX_CONFIG_BYTES)
        try:
            if doc.get("format") != "vmvault-repository":
                raise ValueError("not a vmvault repository config")
            version = int(doc["version"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptObjectError(f"{url}: config object is unreadable: {err}") from err
        if version > FORMAT_VERSION:
            raise UnsupportedVersionError(
                f"{url}: repository format version {version} is newer than this vmvault "
                f"supports ({FORMAT_VERSION}): upgrade vmvault"
            )
        try:
            cfg = cls(
                id=str(doc["id"]),
                chunk_size=int(doc["chunk_size"]),
                encrypted={"aes-256-gcm": True, "none": False}[doc["encryption"]],
                created=_utc(doc["created"], "config"),
                version=version,
                hash=str(doc["hash"]),
                compression=str(doc["compression"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptObjectError(f"{url}: config object has a bad field: {err}") from err
        if cfg.hash != "blake3" or cfg.compression != "zstd":
            raise UnsupportedVersionError(
                f"{url}: hash {cfg.hash!r}/compression {cfg.compression!r} not supported"
            )
        check_chunk_size(cfg.chunk_size)
        if version < 1:
            raise CorruptObjectError(f"{url}: config object has version {version}")
        if version >= 2 and doc.get("sub_block") != SUB_BLOCK_SIZE:
            raise CorruptObjectError(
                f"{url}: config object has sub_block {doc.get('sub_block')!r}, not {SUB_BLOCK_SIZE}"
            )
        return cfg


def check_chunk_size(size: int) -> int:
    if size < MIN_CHUNK_SIZE or size > MAX_CHUNK_SIZE or size & (size - 1):
        raise CorruptObjectError(
            f"chunk size {size} is invalid: use a power of two from 64 KiB to 64 MiB"
        )
    return size


# --------------------------------------------------------------------------- index

# Index body (before sealing), little-endian:
#   header  magic "VMVI" | u16 version | u16 reserved | u32 chunk_size
#           | u64 virtual_size | u64 count
#   entries count x (u8 flags | 32-byte digest)   flags bit0 = data, bit1 = kept from parent
INDEX_MAGIC = b"VMVI"
INDEX_VERSION = 1
_INDEX_HEADER = struct.Struct("<4sHHIQQ")
ENTRY_SIZE = 33
FLAG_DATA = 0x01
FLAG_FROM_PARENT = 0x02
_ZERO_DIGEST = bytes(32)


@dataclass
class IndexEntry:
    """One chunk of a disk: its digest (None for zeros) and whether the parent had it."""

    digest: str | None
    from_parent: bool = False


def chunk_count(virtual_size: int, chunk_size: int) -> int:
    return -(-virtual_size // chunk_size)


def index_body_limit(virtual_size: int, chunk_size: int) -> int:
    """The size of an index body for this disk, capped at ``MAX_INDEX_ENTRIES`` entries."""
    count = min(chunk_count(max(virtual_size, 0), chunk_size), MAX_INDEX_ENTRIES)
    return _INDEX_HEADER.size + ENTRY_SIZE * count


def encode_index(virtual_size: int, chunk_size: int, entries: list[IndexEntry]) -> bytes:
    if len(entries) != chunk_count(virtual_size, chunk_size):
        raise ValueError("index entry count does not match the disk size")
    out = bytearray(
        _INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, 0, chunk_size, virtual_size, len(entries))
    )
    for e in entries:
        flags = (FLAG_DATA if e.digest else 0) | (FLAG_FROM_PARENT if e.from_parent else 0)
        out.append(flags)
        out += bytes.fromhex(e.digest) if e.digest else _ZERO_DIGEST
    return bytes(out)


def decode_index(body: bytes, what: str) -> tuple[int, int, list[IndexEntry]]:
    """``(virtual_size, chunk_size, entries)``; ``CorruptObjectError`` on any inconsistency."""
    if len(body) < _INDEX_HEADER.size:
        raise CorruptObjectError(f"index {what} is truncated ({len(body)} bytes)")
    magic, version, _, chunk_size, virtual_size, count = _INDEX_HEADER.unpack_from(body)
    if magic != INDEX_MAGIC:
        raise CorruptObjectError(f"index {what}: bad magic {magic!r}")
    if version > INDEX_VERSION:
        raise UnsupportedVersionError(
            f"index {what} has version {version}, newer than supported: upgrade vmvault"
        )
    if chunk_size == 0 or count != chunk_count(virtual_size, chunk_size):
        raise CorruptObjectError(f"index {what}: {count} entries do not fit {virtual_size} bytes")
    if len(body) != _INDEX_HEADER.size + count * ENTRY_SIZE:
        raise CorruptObjectError(f"index {what} is truncated or has trailing bytes")
    entries: list[IndexEntry] = []
    pos = _INDEX_HEADER.size
    for _ in range(count):
        flags = body[pos]
        raw = body[pos + 1 : pos + ENTRY_SIZE]
        pos += ENTRY_SIZE
        if flags & ~(FLAG_DATA | FLAG_FROM_PARENT):
            raise CorruptObjectError(f"index {what}: unknown entry flags 0x{flags:02x}")
        entries.append(IndexEntry(raw.hex() if flags & FLAG_DATA else None, bool(flags & 2)))
    return virtual_size, chunk_size, entries


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class DiskStats:
    """What one disk of a backup cost: chunk counts by kind and bytes moved."""

    chunks_total: int = 0
    chunks_new: int = 0  # uploaded by this backup
    chunks_dedup: int = 0  # given as data but already in the repository
    chunks_zero: int = 0  # all-zero, nothing stored
    chunks_parent: int = 0  # unchanged since the parent (keep_parent)
    bytes_read: int = 0  # plaintext bytes given to put_chunk
    bytes_uploaded: int = 0  # stored (compressed, encrypted) bytes of new chunks
    # Version 2 only (section 26): regions patched with a fragment, bytes the dirty
    # bitmap named, objects written (chunks, packs, the index).
    chunks_patched: int = 0
    bytes_dirty: int = 0
    objects_put: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ManifestDisk:
    """One disk of a backup and where its index lives."""

    name: str
    virtual_size: int
    format: str
    index_key: str
    index_digest: str
    chunks: int
    stats: DiskStats = field(default_factory=DiskStats)
    # Version 2: the index body's exact size, the reader's unsealing limit (section 26).
    index_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "virtual_size": self.virtual_size,
            "format": self.format,
            "index": self.index_key,
            "index_digest": self.index_digest,
            "chunks": self.chunks,
            "stats": self.stats.to_json(),
        }
        if self.index_size is not None:
            doc["index_size"] = self.index_size
        return doc


@dataclass(frozen=True)
class Manifest:
    """A committed backup of one domain. A backup without a manifest does not exist."""

    backup_id: str
    domain: str
    parent: str | None
    kind: Kind
    reason: str
    checkpoint: str | None
    created: datetime
    finished: datetime
    chunk_size: int
    disks: list[ManifestDisk]
    layout: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def key(self) -> str:
        return manifest_key(self.domain, self.backup_id)

    def disk(self, name: str) -> ManifestDisk:
        for d in self.disks:
            if d.name == name:
                return d
        names = ", ".join(d.name for d in self.disks)
        raise BackupNotFoundError(
            f"backup {self.backup_id} of {self.domain} has no disk {name!r} (disks: {names})"
        )

    @property
    def sort_key(self) -> tuple[datetime, str]:
        return (self.created, self.backup_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "backup_id": self.backup_id,
            "domain": self.domain,
            "parent": self.parent,
            "kind": self.kind,
            "reason": self.reason,
            "checkpoint": self.checkpoint,
            "created": iso(self.created),
            "finished": iso(self.finished),
            "chunk_size": self.chunk_size,
            "disks": [d.to_json() for d in self.disks],
            "layout": self.layout,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, doc: Any, what: str) -> Manifest:
        if not isinstance(doc, dict):
            raise CorruptObjectError(f"manifest {what} is not a JSON object")
        version = doc.get("version")
        if not isinstance(version, int):
            raise CorruptObjectError(f"manifest {what} has no version")
        if version > MANIFEST_VERSION:
            raise UnsupportedVersionError(
                f"manifest {what} has version {version}, newer than this vmvault supports "
                f"({MANIFEST_VERSION}): upgrade vmvault"
            )
        try:
            kind = doc["kind"]
            if kind not in ("full", "incremental"):
                raise ValueError(f"bad kind {kind!r}")
            disks = [
                ManifestDisk(
                    name=check_name(d["name"], "disk"),
                    virtual_size=int(d["virtual_size"]),
                    format=str(d["format"]),
                    index_key=str(d["index"]),
                    index_digest=str(d["index_digest"]),
                    chunks=int(d["chunks"]),
                    stats=DiskStats(**{k: int(v) for k, v in d.get("stats", {}).items()}),
                    index_size=None if d.get("index_size") is None else int(d["index_size"]),
                )
                for d in doc["disks"]
            ]
            m = cls(
                backup_id=check_backup_id(doc["backup_id"]),
                domain=check_name(doc["domain"], "domain"),
                parent=check_backup_id(doc["parent"]) if doc["parent"] is not None else None,
                kind=kind,
                reason=str(doc["reason"]),
                checkpoint=None if doc["checkpoint"] is None else str(doc["checkpoint"]),
                created=_utc(doc["created"], f"manifest {what}"),
                finished=_utc(doc["finished"], f"manifest {what}"),
                chunk_size=int(doc["chunk_size"]),
                disks=disks,
                layout=dict(doc.get("layout") or {}),
                extra=dict(doc.get("extra") or {}),
                version=version,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptObjectError(f"manifest {what} has a bad field: {err}") from err
        try:
            check_chunk_size(m.chunk_size)
        except CorruptObjectError as err:
            raise CorruptObjectError(f"manifest {what}: {err}") from None
        for d in m.disks:
            if d.index_key != index_key(m.domain, m.backup_id, d.name):
                raise CorruptObjectError(f"manifest {what}: disk {d.name} points elsewhere")
            if d.virtual_size <= 0:
                raise CorruptObjectError(f"manifest {what}: disk {d.name} has no size")
            if (version >= 2) != (d.index_size is not None) or not 0 < (
                d.index_size or 1
            ) <= MAX_INDEX_V2_BYTES:
                raise CorruptObjectError(
                    f"manifest {what}: disk {d.name} has a bad or misplaced index_size"
                )
        return m


@dataclass(frozen=True)
class DamagedManifest:
    """A manifest object that exists but cannot be read: reported and skipped, never counted
    as a backup (nor kept or removed by prune). ``vmvault verify`` names it as a problem."""

    domain: str
    backup_id: str
    key: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {
            "domain": self.domain,
            "backup_id": self.backup_id,
            "key": self.key,
            "error": self.error,
        }
