"""Format 2 through the real repository code: incrementals that cost what changed, restores
from every backup's own index, resizes, GC of packs, damage and bombs, version 1 parents.

The pure core has its own model test (tests/storage/test_region.py); here the writer,
reader, verify and GC run on file:// and s3:// (SeaweedFS), driven like the worker
drives them (tests/storage/format2_driver.py).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.fixtures.s3 import S3Bucket
from tests.storage.conftest import FAST_SCRYPT, Target
from tests.storage.format2_driver import Disk, back_up, restore
from tests.storage.helpers import write_full
from vmvault.storage.disk_reader import DiskReader
from vmvault.storage.errors import CorruptObjectError, FormatUpgradeNeededError
from vmvault.storage.gc import collect_garbage
from vmvault.storage.region import Kind
from vmvault.storage.region_store import chunk_name_key, pack_key
from vmvault.storage.region_writer import RegionDiskWriter
from vmvault.storage.repository import Repository, init_repository
from vmvault.storage.upgrade import upgrade_repository
from vmvault.storage.verify import verify

KiB, MiB = 1024, 1024 * 1024
REGION = 512 * KiB  # 8 sub-blocks per region: small disks, every planning case


def _init(target: Target, passphrase: bytes | None = None) -> Repository:
    return target.init(passphrase, chunk_size=REGION)


def _disk(size: int, seed: int = 1, kinds: tuple[str, ...] = ("random", "text", "zero")) -> Disk:
    rng = random.Random(seed)
    data = bytearray(size)
    for start in range(0, size, REGION):
        kind = rng.choice(kinds)
        end = min(size, start + REGION)
        if kind == "random":
            data[start:end] = rng.randbytes(end - start)
        elif kind == "text":
            data[start:end] = (b"vmvault format 2 " * (REGION // 16 + 1))[: end - start]
    return Disk(data)


def _objects(target: Target) -> dict[str, int]:
    return {o.key: o.size for o in target.backend().list("") if not o.key.startswith("locks/")}


@pytest.mark.parametrize("passphrase", [None, b"pw"])
def test_scattered_small_writes_store_about_the_dirty_bytes(
    target: Target, passphrase: bytes | None
) -> None:
    # The default 4 MiB regions (64 sub-blocks): 20 writes rarely share a region.
    repo = target.init(passphrase, chunk_size=4 * MiB)
    rng = random.Random(7)
    disk = _disk(32 * MiB, kinds=("random", "text"))  # writes into zero regions: below
    full = back_up(repo, disk, None, rng)
    assert restore(repo, full) == disk.data
    before = _objects(target)
    for _ in range(20):
        disk.write(rng.randrange(0, 32 * MiB - 4 * KiB) // 512 * 512, rng.randbytes(4 * KiB))
    dirty = len(disk.dirty) * 64 * KiB
    inc = back_up(repo, disk, full, rng)
    stats = inc.disk("vda").stats
    added = {k: v for k, v in _objects(target).items() if k not in before}
    # One pack, the index and the manifest: small writes never become objects of their own.
    assert sorted(k.split("/")[0] for k in added) == ["backups", "backups", "packs"]
    assert stats.objects_put == 2 and stats.bytes_dirty == dirty
    assert stats.bytes_read <= dirty  # zero sub-blocks among the dirty ones are not stored
    assert sum(added.values()) < 1.1 * dirty + 4 * KiB
    assert stats.chunks_patched >= 1 and stats.chunks_new == 0
    assert restore(repo, inc) == disk.data
    assert restore(repo, full) != disk.data  # the full still restores its own bytes
    report = verify(repo, read_data=True)
    assert report.ok, report.problems
    assert report.regions_rebuilt == stats.chunks_patched

    # Writes into all-zero regions are fragments without a base: the same one pack.
    disk.resize(40 * MiB)
    inc2 = back_up(repo, disk, inc, rng)
    disk.write(32 * MiB + 100 * KiB, rng.randbytes(4 * KiB))
    disk.write(36 * MiB + 600 * KiB, rng.randbytes(4 * KiB))
    before = _objects(target)
    inc3 = back_up(repo, disk, inc2, rng)
    new_keys = [k.split("/")[0] for k in _objects(target) if k not in before]
    assert sorted(new_keys) == ["backups", "backups", "packs"]
    assert inc3.disk("vda").stats.chunks_new == 0
    assert inc3.disk("vda").stats.chunks_patched == 2
    assert restore(repo, inc3) == disk.data


def test_resizes_mid_region_are_exact(file_target: Target) -> None:
    repo = _init(file_target)
    rng = random.Random(3)
    disk = _disk(3 * MiB + 100 * KiB)
    snapshots = [(back_up(repo, disk, None, rng), bytes(disk.data))]
    steps = [3 * MiB + 300 * KiB + 512, 2 * MiB + 7 * KiB, 2 * MiB + 7 * KiB + 64 * KiB, 4 * MiB]
    for size in steps:
        disk.resize(size)
        disk.write(size - 1024, rng.randbytes(1024))
        parent = snapshots[-1][0]
        snapshots.append((back_up(repo, disk, parent, rng), bytes(disk.data)))
    for manifest, data in snapshots:
        assert manifest.disk("vda").virtual_size == len(data)
        assert restore(repo, manifest) == data
    # A shrink and a grow back between two backups (the cut range reads as zeros).
    disk.resize(3 * MiB)
    disk.resize(4 * MiB)
    last = back_up(repo, disk, snapshots[-1][0], rng)
    assert restore(repo, last) == disk.data
    assert verify(repo, read_data=True).ok


def test_gc_deletes_packs_only_when_no_backup_uses_them(target: Target) -> None:
    repo = _init(target)
    rng = random.Random(5)
    disk = _disk(4 * MiB)
    chain = [back_up(repo, disk, None, rng)]
    images = [bytes(disk.data)]
    for _ in range(6):
        for _ in range(8):
            disk.write(rng.randrange(0, 4 * MiB - 8 * KiB), rng.randbytes(8 * KiB))
        chain.append(back_up(repo, disk, chain[-1], rng))
        images.append(bytes(disk.data))
    packs = {k for k in _objects(target) if k.startswith("packs/")}
    assert len(packs) == 6
    # Prune all but the newest two, then collect with no grace window.
    for m in chain[:-2]:
        repo.delete_backup(m)
    report = collect_garbage(repo, grace=0)
    left = {k for k in _objects(target) if k.startswith("packs/")}
    used = set()
    for m in chain[-2:]:
        index = DiskReader(repo, m, "vda").index
        used |= {pack_key(f.pack) for r in index.regions for f in r.fragments}
        used_chunks = {chunk_name_key(r.base) for r in index.regions if r.base}
        assert used_chunks <= set(_objects(target))
    assert left == used and report.packs_deleted == len(packs - used) > 0
    for m, data in zip(chain[-2:], images[-2:], strict=True):
        assert restore(repo, m) == data
    assert verify(repo, read_data=True).ok


def test_damaged_pieces_fail_the_restore_and_verify_names_them(file_target: Target) -> None:
    repo = _init(file_target, b"pw")
    rng = random.Random(11)
    disk = _disk(4 * MiB, seed=2)
    disk.data[:REGION] = rng.randbytes(REGION)
    full = back_up(repo, disk, None, rng)
    full_data = bytes(disk.data)
    disk.write(3 * 64 * KiB, rng.randbytes(4 * KiB))
    inc = back_up(repo, disk, full, rng)
    region = DiskReader(repo, inc, "vda").index.regions[0]
    assert region.kind is Kind.PATCHED and len(region.fragments) == 1
    frag = region.fragments[0]
    root = file_target.root
    assert root is not None
    path = root / pack_key(frag.pack)
    body = bytearray(path.read_bytes())
    body[frag.offset + 20] ^= 1
    path.write_bytes(bytes(body))
    with pytest.raises(CorruptObjectError, match=f"vm backup {inc.backup_id} disk vda offset 0"):
        restore(repo, inc)
    assert restore(repo, full) == full_data  # the full shares the base chunk, not the pack
    report = verify(repo, read_data=True)
    assert [(p.backup_id, p.disk, p.offset) for p in report.problems] == [(inc.backup_id, "vda", 0)]
    assert "failed authentication" in report.problems[0].message
    # A pack cut short: the structure check sees its size disagree with the index.
    path.write_bytes(bytes(body[:-10]))
    problems = verify(repo).problems
    assert problems and all(p.offset == 0 for p in problems)
    assert "the index says" in problems[0].message


def test_a_chunk_body_bomb_is_refused_without_inflating(file_target: Target) -> None:
    from tests.storage.test_caps import RSS_SLACK, PeakRss, rle_frame

    repo = _init(file_target)
    disk = _disk(REGION)
    disk.data[:] = os.urandom(REGION)
    m = back_up(repo, disk, None, random.Random(1))
    name = DiskReader(repo, m, "vda").index.regions[0].base
    key = chunk_name_key(name)
    root = file_target.root
    assert root is not None
    stored = (root / key).read_bytes()
    table_len = int.from_bytes(stored[:4], "little")
    (root / key).write_bytes(stored[: 4 + table_len] + b"\x01" + rle_frame(1 << 30))
    peak = PeakRss()
    with pytest.raises(CorruptObjectError, match=key):
        restore(repo, m)
    assert not verify(repo, read_data=True).ok
    assert peak.growth() < RSS_SLACK


def test_a_version_1_repository_refuses_backups_until_upgraded(target: Target) -> None:
    repo = target.init(chunk_size=REGION, format_version=1)
    rng = random.Random(9)
    disk = _disk(2 * MiB)
    v1 = write_full(repo, "vm", {"vda": bytes(disk.data)})
    with pytest.raises(FormatUpgradeNeededError, match="vmvault upgrade"):
        back_up(repo, disk, v1, rng)
    repo.close()
    upgrade_repository(target.open(), None)
    repo = target.open()
    assert repo.config.version == 2
    disk.write(100 * KiB, rng.randbytes(4 * KiB))
    first = back_up(repo, disk, v1, rng)  # a version 2 backup with a version 1 parent
    kinds = [r.kind for r in DiskReader(repo, first, "vda").index.regions]
    assert Kind.LEGACY in kinds and kinds[0] is Kind.CHUNK  # the changed region, rewritten
    disk.write(1 * MiB + 64 * KiB, rng.randbytes(4 * KiB))
    second = back_up(repo, disk, first, rng)
    assert restore(repo, second) == disk.data
    assert restore(repo, v1) != disk.data
    assert verify(repo, read_data=True).ok


# --------------------------------------------------------------------------- the model


class Chain(RuleBasedStateMachine):
    """Random guest writes, zeroes, discards, resizes, backups, prunes and GCs; after every
    step every remaining backup restores bit-exact."""

    open_repo: object = None  # set by the test: () -> Repository on a fresh location

    @initialize(size=st.integers(1, 6 * 8).map(lambda k: k * 64 * KiB - 512 * (k % 3)))
    def start(self, size: int) -> None:
        factory = type(self).open_repo
        assert callable(factory)
        self.repo: Repository = factory()
        self.rng = random.Random(size)
        self.disk = _disk(size, seed=size)
        self.backups = [(back_up(self.repo, self.disk, None, self.rng), bytes(self.disk.data))]

    @rule(
        at=st.floats(0, 1),
        size=st.sampled_from([512, 4 * KiB, 60 * KiB, 64 * KiB, 200 * KiB, 1 * MiB]),
        what=st.sampled_from(["random", "zero", "text"]),
    )
    def write(self, at: float, size: int, what: str) -> None:
        offset = int(at * len(self.disk.data)) // 512 * 512
        if what == "zero":
            self.disk.zero(offset, size)
        elif what == "text":
            self.disk.write(offset, (b"sixteen bytes!! " * (size // 16 + 1))[:size])
        else:
            self.disk.write(offset, self.rng.randbytes(size))

    @rule(size=st.integers(1, 6 * 8 * 128).map(lambda k: k * 512))
    def resize(self, size: int) -> None:
        self.disk.resize(size)

    @rule(full=st.booleans())
    def backup(self, full: bool) -> None:
        parent = None if full else self.backups[-1][0]
        self.backups.append(
            (back_up(self.repo, self.disk, parent, self.rng), bytes(self.disk.data))
        )

    @rule(which=st.integers(0, 100), collect=st.booleans())
    def prune(self, which: int, collect: bool) -> None:
        if len(self.backups) < 2:
            return
        manifest, _ = self.backups.pop(which % (len(self.backups) - 1))  # never the newest
        self.repo.delete_backup(manifest)
        if collect:
            collect_garbage(self.repo, grace=0)

    @invariant()
    def every_backup_restores(self) -> None:
        for manifest, data in self.backups:
            assert restore(self.repo, manifest) == data

    def teardown(self) -> None:
        repo = getattr(self, "repo", None)
        if repo is not None:
            collect_garbage(repo, grace=0)
            report = verify(repo, read_data=True)
            assert report.ok, report.problems
            repo.close()


def _run_chain(open_repo: object, examples: int, steps: int) -> None:
    machine = type("ChainRun", (Chain,), {"open_repo": staticmethod(open_repo)})  # type: ignore[arg-type]
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        ),
    )


def test_the_chain_model_on_file(tmp_path: Path) -> None:
    def open_repo() -> Repository:
        where = tempfile.mkdtemp(dir=tmp_path)
        return init_repository(
            f"file://{where}/repo", passphrase=b"pw", chunk_size=REGION, scrypt_n=FAST_SCRYPT
        )

    _run_chain(open_repo, examples=25, steps=25)


def test_the_chain_model_on_s3(s3_server: S3Bucket) -> None:
    count = iter(range(1000))

    def open_repo() -> Repository:
        return init_repository(
            s3_server.repo_url(f"chain{next(count)}"),
            endpoint_url=s3_server.endpoint_url,
            chunk_size=REGION,
        )

    _run_chain(open_repo, examples=3, steps=12)


def test_a_backup_that_dies_after_its_pack_leaves_nothing_gc_keeps(target: Target) -> None:
    """Killed between the disk's pack and index and the manifest: the pack and the index are
    unreferenced, GC (past its grace window) removes them, the committed chain is intact."""
    repo = _init(target)
    rng = random.Random(13)
    disk = _disk(2 * MiB, kinds=("random",))
    full = back_up(repo, disk, None, rng)
    disk.write(64 * KiB, rng.randbytes(4 * KiB))
    before = set(_objects(target))
    writer = repo.open_backup("vm", full, "incremental", "test", "cp-x")
    dw = writer.open_disk("vda", len(disk.data), "qcow2")
    assert isinstance(dw, RegionDiskWriter)
    plans = dw.plan(disk.dirty_masks(REGION), [0] * len(dw.lengths))
    for i, plan in enumerate(plans):
        if plan.read:
            buf = bytearray(dw.lengths[i])
            for j in range(8):
                if plan.read >> j & 1:
                    lo = i * REGION + j * 64 * KiB
                    buf[j * 64 * KiB : (j + 1) * 64 * KiB] = disk.data[lo : lo + 64 * KiB]
            assert dw.put_region(i, buf, plan.read) == 0
    dw.finish()
    left = set(_objects(target)) - before
    assert sorted(k.split("/")[0] for k in left) == ["backups", "packs"]
    writer.abort()  # what a SIGKILL leaves: no manifest
    assert [m.backup_id for m in repo.list_manifests("vm")] == [full.backup_id]
    report = collect_garbage(repo, grace=0)
    assert report.packs_deleted == 1 and report.orphan_objects_deleted == 1
    assert set(_objects(target)) == before
    assert verify(repo, read_data=True).ok
