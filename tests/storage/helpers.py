"""Small helpers for storage tests: deterministic disk images and whole-backup writes."""

from __future__ import annotations

import random

from vmvault.storage.format import Manifest
from vmvault.storage.repository import Repository


def image(size: int, seed: int, zero_every: int = 3, chunk: int = 64 * 1024) -> bytes:
    """A disk image: random chunks, text-like chunks and all-zero chunks, mixed."""
    rnd = random.Random(seed)
    out = bytearray()
    i = 0
    while len(out) < size:
        if i % zero_every == zero_every - 1:
            out += bytes(chunk)
        elif i % 2:
            line = b"log line %d: all is well\n" % rnd.randrange(10**6)
            out += (line * (chunk // len(line) + 1))[:chunk]
        else:
            out += rnd.randbytes(chunk)
        i += 1
    return bytes(out[:size])


def write_full(repo: Repository, domain: str, disks: dict[str, bytes]) -> Manifest:
    """A full backup of ``disks`` (name -> image), every chunk given as data (also into a
    version 1 repository: compatibility tests make those)."""
    w = repo.open_backup(domain, None, "full", "test: first backup", "cp-1", allow_v1=True)
    cs = repo.chunk_size
    for name, data in disks.items():
        d = w.open_disk(name, len(data), "qcow2")
        for off in range(0, len(data), cs):
            d.put_chunk(off, data[off : off + cs])
        d.finish()
    return w.commit({"disks": sorted(disks)})


def read_back(repo: Repository, manifest: Manifest, disk: str) -> bytes:
    out = bytearray()
    for offset, data in repo.read_disk(manifest, disk, prefetch=4):
        assert offset == len(out)
        size = manifest.disk(disk).virtual_size
        out += data if data is not None else bytes(min(repo.chunk_size, size - offset))
    return bytes(out)
