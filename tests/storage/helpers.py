"""Small helpers for storage tests: deterministic disk images and whole-backup writes."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from vmvault.storage.format import (
    IndexEntry,
    Manifest,
    ManifestDisk,
    chunk_key,
    encode_index,
    index_key,
    new_backup_id,
)
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
    """A full backup of ``disks`` (name -> image), every chunk given as data; into a version
    1 repository as version 1 vmvault wrote it (compatibility tests make those)."""
    if repo.config.version < 2:
        return _write_v1_full(repo, domain, disks)
    w = repo.open_backup(domain, None, "full", "test: first backup", "cp-1")
    cs = repo.chunk_size
    for name, data in disks.items():
        d = w.open_disk(name, len(data), "qcow2")
        for off in range(0, len(data), cs):
            d.put_chunk(off, data[off : off + cs])
        d.finish()
    return w.commit({"disks": sorted(disks)})


def _write_v1_full(repo: Repository, domain: str, disks: dict[str, bytes]) -> Manifest:
    """Version 1's objects (docs/repository-format.md sections 7–9): each whole chunk sealed
    under its digest, a ``VMVI`` index, a version 1 manifest written last."""
    cs = repo.chunk_size
    created = datetime.now(UTC)
    backup_id = new_backup_id(created)
    written = []
    for name, data in disks.items():
        entries = []
        for off in range(0, len(data), cs):
            piece = data[off : off + cs]
            if piece == bytes(len(piece)):
                entries.append(IndexEntry(None))
                continue
            digest = repo.codec.digest(piece)
            key = chunk_key(digest)
            repo.backend.put(key, repo.codec.seal(key, piece), if_absent=True)
            entries.append(IndexEntry(digest))
        body = encode_index(len(data), cs, entries)
        key = index_key(domain, backup_id, name)
        repo.backend.put(key, repo.codec.seal(key, body))
        written.append(
            ManifestDisk(name, len(data), "qcow2", key, repo.codec.digest(body), len(entries))
        )
    manifest = Manifest(
        backup_id=backup_id,
        domain=domain,
        parent=None,
        kind="full",
        reason="test: first backup",
        checkpoint="cp-1",
        created=created,
        finished=datetime.now(UTC),
        chunk_size=cs,
        disks=written,
        layout={"disks": sorted(disks)},
        version=1,
    )
    assert repo.backend.put(manifest.key, repo.seal_manifest(manifest), if_absent=True)
    return manifest


def read_back(repo: Repository, manifest: Manifest, disk: str) -> bytes:
    out = bytearray()
    for offset, data in repo.read_disk(manifest, disk, prefetch=4):
        assert offset == len(out)
        size = manifest.disk(disk).virtual_size
        out += data if data is not None else bytes(min(repo.chunk_size, size - offset))
    return bytes(out)
