"""The nbdkit Python plugin behind ``vmvault serve``: one backup's disks as read-only exports.

nbdkit (``nbdkit python worker/nbdkit_plugin.py config=... domain=... backup=...
disk=vda disk=vdb``) speaks the NBD protocol; this script only answers its callbacks
(nbdkit-python-plugin(3), API version 2). Each disk is one export, named after the disk;
the first disk is the default export (a client that asks for no name gets it).

    pread(offset, count)      region i = offset // C
       ZERO region, or only zero sub-blocks      zeros, no I/O
       else RegionCache.get((disk, i))            fetch + rebuild + digest check, cached
    extents(offset, count)    from the index alone: holes for ZERO regions and for the
                              zero sub-blocks of CHUNK/PATCHED ones (base:allocation)

A region whose bytes do not hash to its index entry raises ``CorruptObjectError``: the
callback raises with EIO set, so the client's read fails and no wrong byte is sent.
The script runs in nbdkit's embedded interpreter, where the ``nbdkit`` module exists;
it is imported lazily so that the rest of the package (and its tests) can import this
module without nbdkit.
"""

from __future__ import annotations

import errno
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmvault.storage.disk_reader import DiskReader
from vmvault.storage.errors import StorageError
from vmvault.storage.region import SUB_BLOCK, Kind, Mask, Region, full_mask
from vmvault.storage.repository import Repository
from vmvault.worker.region_cache import DEFAULT_READ_AHEAD, ReadAhead, RegionCache

API_VERSION = 2

DEFAULT_CACHE_BYTES = 256 * 2**20
# extents(): at most this many regions described per call (a client asks again for the
# rest); bounds the work of one request on a huge disk.
MAX_EXTENT_REGIONS = 4096
EXTENT_DATA = 0
EXTENT_HOLE_ZERO = 3  # nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO


def _nbdkit() -> Any:
    """nbdkit's own module: only importable inside nbdkit."""
    return importlib.import_module("nbdkit")


def zero_mask(r: Region) -> Mask:
    """Sub-blocks of region ``r`` that read as zeros, from its index entry alone."""
    if r.kind is Kind.ZERO:
        return full_mask(r.length)
    if r.kind is Kind.LEGACY:
        return 0
    covered = r.zero
    for f in r.fragments:
        covered |= f.mask
    # The base supplies what neither the zero mask nor a fragment does; its zero
    # sub-blocks are absent from its body and read as zeros.
    return r.zero | (r.base_zero & full_mask(r.length) & ~covered)


@dataclass
class Export:
    """One disk of the served backup."""

    name: str
    reader: DiskReader
    size: int
    zero: list[Mask] = field(default_factory=list)  # per region, see zero_mask

    def __post_init__(self) -> None:
        self.zero = [zero_mask(r) for r in self.reader.index.regions]

    def needs_io(self, i: int) -> bool:
        r = self.reader.index.regions[i]
        return self.zero[i] != full_mask(r.length)

    def load(self, i: int) -> bytes:
        """Region ``i``'s verified bytes (read_region checks the digest)."""
        data = self.reader.read_region(i, check=True)
        return bytes(self.reader.index.regions[i].length) if data is None else data


@dataclass
class Settings:
    """The plugin's parameters (``key=value`` on nbdkit's command line)."""

    config: Path | None = None
    repository: str | None = None  # a key of the config's repositories; None: primary
    domain: str | None = None
    backup: str | None = None
    disks: list[str] = field(default_factory=list)
    cache_bytes: int = DEFAULT_CACHE_BYTES
    read_ahead: int = DEFAULT_READ_AHEAD


class Server:
    """What the process serves: the repository, one backup, its exports, the cache."""

    def __init__(self, settings: Settings) -> None:
        from vmvault.worker.config import load_config
        from vmvault.worker.restore_select import open_repo

        if settings.config is None or settings.domain is None or settings.backup is None:
            raise ValueError("the plugin needs config=, domain= and backup=")
        config = load_config(settings.config).with_primary(settings.repository)
        self.repo: Repository = open_repo(config)
        manifest = self.repo.load_manifest(settings.domain, settings.backup)
        names = settings.disks or [d.name for d in manifest.disks]
        self.exports: dict[str, Export] = {}
        for name in names:
            reader = self.repo.disk_reader(manifest, name)
            self.exports[name] = Export(name, reader, manifest.disk(name).virtual_size)
        self.default = names[0]
        self.region_size = manifest.chunk_size
        self.cache: RegionCache[tuple[str, int]] = RegionCache(self._load, settings.cache_bytes)
        # Read-ahead never takes more than half the cache: it must not evict what the
        # connections are reading now.
        fits = settings.cache_bytes // (2 * self.region_size)
        self.read_ahead = max(0, min(settings.read_ahead, fits))

    def _load(self, key: tuple[str, int]) -> bytes:
        name, i = key
        return self.exports[name].load(i)

    def close(self) -> None:
        self.cache.close()
        self.repo.close()


class Connection:
    """One NBD connection: its export and its read-ahead position."""

    def __init__(self, server: Server, export: Export) -> None:
        self.server = server
        self.export = export
        self.ahead = ReadAhead(
            server.cache,
            lambda i: (export.name, i),
            len(export.reader.index.regions),
            export.needs_io,
            server.read_ahead,
        )

    def pread(self, buf: Any, offset: int) -> None:
        view = memoryview(buf).cast("B")
        size = self.export.size
        count = len(view)
        if offset < 0 or offset + count > size:
            raise ValueError(f"read of {count} bytes at {offset} beyond the disk ({size})")
        rs = self.server.region_size
        regions = self.export.reader.index.regions
        done = 0
        while done < count:
            at = offset + done
            i = at // rs
            start = at - i * rs
            n = min(count - done, regions[i].length - start)
            if _all_zero(self.export.zero[i], start, n):
                view[done : done + n] = bytes(n)
            else:
                # Through a memoryview: one copy, straight into nbdkit's buffer.
                view[done : done + n] = memoryview(self.ahead.get(i))[start : start + n]
            done += n

    def extents(self, count: int, offset: int) -> list[tuple[int, int, int]]:
        rs = self.server.region_size
        regions = self.export.reader.index.regions
        end = min(offset + count, self.export.size)
        out: list[tuple[int, int, int]] = []
        first = offset // rs
        for i in range(first, min(len(regions), first + MAX_EXTENT_REGIONS)):
            base = i * rs
            if base >= end:
                break
            for lo, length, kind in _region_extents(regions[i].length, self.export.zero[i]):
                a, b = max(base + lo, offset), min(base + lo + length, end)
                if a >= b:
                    continue
                if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == a:
                    out[-1] = (out[-1][0], out[-1][1] + b - a, kind)
                else:
                    out.append((a, b - a, kind))
        return out


def _all_zero(mask: Mask, start: int, n: int) -> bool:
    """True when every sub-block touched by bytes ``[start, start + n)`` is in ``mask``."""
    first, last = start // SUB_BLOCK, (start + n - 1) // SUB_BLOCK
    want = ((1 << (last - first + 1)) - 1) << first
    return mask & want == want


def _region_extents(length: int, zero: Mask) -> list[tuple[int, int, int]]:
    """``(offset, length, type)`` runs of one region: data, or hole+zero."""
    out: list[tuple[int, int, int]] = []
    j = 0
    count = -(-length // SUB_BLOCK)
    while j < count:
        kind = EXTENT_HOLE_ZERO if zero >> j & 1 else EXTENT_DATA
        k = j
        while k < count and (EXTENT_HOLE_ZERO if zero >> k & 1 else EXTENT_DATA) == kind:
            k += 1
        lo = j * SUB_BLOCK
        out.append((lo, min(k * SUB_BLOCK, length) - lo, kind))
        j = k
    return out


# --------------------------------------------------------------------------- callbacks
# The names below are nbdkit's: it looks them up in this script's __main__ module.

_settings = Settings()
_server: Server | None = None


def _eio(err: Exception) -> None:
    """Tell nbdkit to answer EIO, and say why on its stderr (the operator's log)."""
    nbdkit = _nbdkit()
    nbdkit.set_error(errno.EIO)
    print(f"vmvault serve: read failed: {err}", file=sys.stderr, flush=True)


def config(key: str, value: str) -> None:
    if key == "config":
        _settings.config = Path(value)
    elif key == "repository":
        _settings.repository = value
    elif key == "domain":
        _settings.domain = value
    elif key == "backup":
        _settings.backup = value
    elif key == "disk":
        _settings.disks.append(value)
    elif key == "cache":
        _settings.cache_bytes = int(value)
    elif key == "readahead":
        _settings.read_ahead = int(value)
    else:
        raise ValueError(f"unknown parameter {key!r}")


def thread_model() -> int:
    # Reads of different regions run at once: fetches, decompression and hashing release
    # the GIL. The shared state (the cache) has its own lock.
    return int(_nbdkit().THREAD_MODEL_PARALLEL)


def get_ready() -> None:
    # nbdkit runs in the foreground (worker/serve.py), so there is no fork after this:
    # the repository's threads and connections stay valid.
    global _server
    _server = Server(_settings)


def cleanup() -> None:
    if _server is not None:
        _server.close()


def list_exports(readonly: bool, is_tls: bool) -> list[str]:
    assert _server is not None
    return list(_server.exports)


def default_export(readonly: bool, is_tls: bool) -> str:
    assert _server is not None
    return _server.default


def open(readonly: bool) -> Connection:  # nbdkit's callback name (shadows the builtin)
    assert _server is not None
    name = _nbdkit().export_name() or _server.default
    export = _server.exports.get(name)
    if export is None:
        raise ValueError(f"no export {name!r} (exports: {', '.join(_server.exports)})")
    return Connection(_server, export)


def get_size(h: Connection) -> int:
    return h.export.size


def can_write(h: Connection) -> bool:
    return False


def can_multi_conn(h: Connection) -> bool:
    # Read-only and immutable: every connection sees the same bytes.
    return True


def can_extents(h: Connection) -> bool:
    return True


def pread(h: Connection, buf: Any, offset: int, flags: int) -> None:
    try:
        h.pread(buf, offset)
    except StorageError as err:
        _eio(err)
        # A fresh exception: nbdkit prints its traceback, and the storage stack's frames
        # add nothing to the line above.
        raise OSError(errno.EIO, str(err)) from None


def extents(h: Connection, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    return h.extents(count, offset)
