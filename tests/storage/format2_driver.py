"""A disk model and a backup driver for format 2 tests of the real repository code.

The driver does what worker/region_pull.py does with an NBD export, with the model's
bytes instead: plan every region from dirty and zero masks, read only what each plan
names (again when the writer asks for more), commit. The model tracks what QEMU would
report: sub-blocks written since the last backup (a 64 KiB dirty bitmap) and sub-blocks
that read as zeros (block status; only some of them, as QEMU reports only unallocated
or known-zero ranges).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from vmvault.storage.format import Manifest
from vmvault.storage.region import SUB_BLOCK, Mask, full_mask, mask_of_runs, sub_count
from vmvault.storage.region_writer import RegionDiskWriter
from vmvault.storage.repository import Repository

S = SUB_BLOCK


@dataclass
class Disk:
    """The guest's disk as bytes, with the dirty sub-blocks since the last backup."""

    data: bytearray
    dirty: set[int] = field(default_factory=set)  # absolute sub-block numbers
    # Sub-blocks that were cut by a shrink since the last backup: zeros now, and QEMU's
    # block status reports them as unallocated (zero).
    cut_from: int | None = None

    def write(self, offset: int, payload: bytes) -> None:
        end = min(len(self.data), offset + len(payload))
        if end <= offset:
            return
        self.data[offset:end] = payload[: end - offset]
        self.dirty.update(range(offset // S, (end - 1) // S + 1))

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def resize(self, size: int) -> None:
        old = len(self.data)
        if size < old:
            del self.data[size:]
            # A cut mid-sub-block: qcow2 keeps the rest of that cluster's bytes and a
            # regrow shows them again; the model zeroes them, so it marks the sub-block
            # (the bytes a backup must not take from the parent).
            if size % S:
                self.dirty.add(size // S)
            self.dirty = {j for j in self.dirty if j * S < size}
            start = size // S
            self.cut_from = start if self.cut_from is None else min(self.cut_from, start)
        else:
            self.data += bytes(size - old)

    def zero_masks(self, region_size: int, rng: random.Random) -> list[Mask]:
        """Per region, sub-blocks reported as zeros: every all-zero one past a cut, and
        about half of the other all-zero ones (so reads find zeros too)."""
        out = []
        zero_sub = bytes(S)
        for start in range(0, len(self.data), region_size):
            piece = self.data[start : start + region_size]
            mask = 0
            for j in range(sub_count(len(piece))):
                sub = piece[j * S : (j + 1) * S]
                absolute = start // S + j
                if sub == zero_sub[: len(sub)]:
                    cut = self.cut_from is not None and absolute >= self.cut_from
                    if cut or rng.random() < 0.5:
                        mask |= 1 << j
            out.append(mask)
        return out

    def dirty_masks(self, region_size: int) -> list[Mask]:
        per = region_size // S
        count = -(-len(self.data) // region_size)
        runs: list[list[tuple[int, int]]] = [[] for _ in range(count)]
        for j in self.dirty:
            runs[j // per].append(((j % per) * S, S))
        return [
            mask_of_runs(min(region_size, len(self.data) - i * region_size), runs[i])
            for i in range(count)
        ]


def back_up(
    repo: Repository,
    disk: Disk,
    parent: Manifest | None,
    rng: random.Random,
    domain: str = "vm",
) -> Manifest:
    """A full (no parent) or incremental backup of ``disk`` as the worker makes it."""
    checkpoint = f"cp-{rng.getrandbits(32)}"
    if parent is None:
        writer = repo.open_backup(domain, None, "full", "test", checkpoint)
    else:
        writer = repo.open_backup(domain, parent, "incremental", "test", checkpoint)
    with writer:
        dw = writer.open_disk("vda", len(disk.data), "qcow2")
        assert isinstance(dw, RegionDiskWriter)
        rs = repo.chunk_size
        dirty = None if parent is None else disk.dirty_masks(rs)
        plans = dw.plan(dirty, disk.zero_masks(rs, rng), len(disk.dirty) * S)
        for i, plan in enumerate(plans):
            want = plan.read
            have = 0
            length = dw.lengths[i]
            while want:
                buf = bytearray(length)
                have |= want
                for j in range(sub_count(length)):
                    if have >> j & 1:
                        lo = i * rs + j * S
                        buf[j * S : j * S + S] = disk.data[lo : min(lo + S, i * rs + length)]
                want = dw.put_region(i, buf, have) & full_mask(length)
        dw.finish()
        manifest = writer.commit({"disks": ["vda"]})
    disk.dirty.clear()
    disk.cut_from = None
    return manifest


def restore(repo: Repository, manifest: Manifest) -> bytes:
    """Every region of the backup rebuilt and checked against its digest."""
    size = manifest.disk("vda").virtual_size
    out = bytearray()
    for offset, data in repo.read_disk(manifest, "vda", prefetch=4):
        assert offset == len(out)
        out += data if data is not None else bytes(min(repo.chunk_size, size - offset))
    return bytes(out)
