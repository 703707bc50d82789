"""Small helpers for storage tests: deterministic disk images and whole-backup writes."""

from __future__ import annotations

import random
from dataclasses import replace

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
    """A full backup of ``disks`` (name -> image), every chunk given as data."""
    w = repo.open_backup(domain, None, "full", "test: first backup", "cp-1")
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


def write_v1_full(repo: Repository, domain: str, disks: dict[str, bytes]) -> Manifest:
    """``write_full`` as a format version 1 writer leaves it: v1 indexes, a v1 manifest.

    The writer on this branch writes v1 indexes but labels its manifest with the newest
    manifest version; until it writes what its repository's version asks for, the
    manifest is re-sealed here as the version 1 manifest it describes.
    """
    m = write_full(repo, domain, disks)
    if m.version != 1:
        m = replace(m, version=1)
        repo.backend.put(m.key, repo.seal_manifest(m))
    return m
