"""GC: mark and sweep, exclusive lock vs. backups in flight, grace window, killed writers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.storage.conftest import CHUNK, Target
from tests.storage.helpers import image, read_back, write_full
from vmvault.storage.errors import LeaseExpiredError, RepositoryLockedError
from vmvault.storage.format import chunk_key
from vmvault.storage.gc import GcAbortedError, collect_garbage
from vmvault.storage.locks import Lease
from vmvault.storage.repository import Repository
from vmvault.storage.verify import verify

REPO_ROOT = Path(__file__).resolve().parents[2]


def _aborted_backup(repo: Repository, chunks: list[bytes]) -> None:
    w = repo.open_backup("junk", None, "full", "test: will abort", None)
    d = w.open_disk("vda", len(chunks) * CHUNK, "raw")
    for i, c in enumerate(chunks):
        d.put_chunk(i * CHUNK, c)
    d.finish()  # its index object is written too
    w.abort()


def _chunk_keys(repo: Repository) -> set[str]:
    return {o.key for o in repo.backend.list("chunks/")}


def test_gc_collects_orphans_after_grace_and_keeps_referenced(target: Target) -> None:
    repo = target.init()
    data = image(5 * CHUNK, 11)
    kept = write_full(repo, "vm", {"vda": data})
    referenced = _chunk_keys(repo)
    _aborted_backup(repo, [os.urandom(CHUNK) for _ in range(3)])
    assert len(_chunk_keys(repo)) == len(referenced) + 3

    young = collect_garbage(repo, grace=3600)
    assert (young.chunks_deleted, young.chunks_in_grace, young.orphan_objects_in_grace) == (0, 3, 1)
    dry = collect_garbage(repo, grace=0, dry_run=True)
    assert dry.chunks_deleted == 3 and len(_chunk_keys(repo)) == len(referenced) + 3

    report = collect_garbage(repo, grace=0)
    assert (report.chunks_deleted, report.orphan_objects_deleted) == (3, 1)
    assert report.chunks_referenced == len(referenced) and report.backups == 1
    assert _chunk_keys(repo) == referenced
    assert list(repo.backend.list("backups/junk/")) == []
    assert verify(repo, read_data=True).ok
    assert read_back(repo, kept, "vda") == data


def test_gc_deletes_nothing_when_an_index_is_unreadable(file_target: Target) -> None:
    repo = file_target.init()
    m = write_full(repo, "vm", {"vda": os.urandom(2 * CHUNK)})
    _aborted_backup(repo, [os.urandom(CHUNK)])
    before = _chunk_keys(repo)
    repo.backend.put(m.disk("vda").index_key, b"\x00garbage")
    with pytest.raises(GcAbortedError, match=f"nothing deleted.*{m.backup_id}"):
        collect_garbage(repo, grace=0)
    assert _chunk_keys(repo) == before
    assert list(repo.backend.list("locks/")) == []


def test_gc_and_backups_exclude_each_other(target: Target) -> None:
    repo = target.init()
    w = repo.open_backup("vm", None, "full", "test", None)
    with pytest.raises(RepositoryLockedError, match=f"backup vm/{w.backup_id}"):
        collect_garbage(repo, grace=0)
    w.abort()
    gc_lock = Lease(repo.backend, "exclusive", "gc", 60).acquire()
    try:
        with pytest.raises(RepositoryLockedError, match="exclusive lock for gc"):
            repo.open_backup("vm", None, "full", "test", None)
    finally:
        gc_lock.release()
    assert list(repo.backend.list("locks/")) == []


def test_backup_in_flight_never_loses_a_chunk(file_target: Target) -> None:
    """The writer deduplicates against garbage that GC would collect: GC must wait."""
    repo = file_target.init()
    garbage = [os.urandom(CHUNK) for _ in range(2)]
    _aborted_backup(repo, garbage)  # unreferenced, outside any grace window below
    w = repo.open_backup("vm", None, "full", "test: in flight", None)
    d = w.open_disk("vda", 3 * CHUNK, "raw")
    d.put_chunk(0, garbage[0])
    d.put_chunk(CHUNK, os.urandom(CHUNK))
    with pytest.raises(RepositoryLockedError):
        collect_garbage(repo, grace=0)
    d.put_chunk(2 * CHUNK, garbage[1])
    d.finish()
    stats = d.result.stats if d.result else None
    assert stats is not None and stats.chunks_dedup == 2
    m = w.commit()
    report = collect_garbage(repo, grace=0)
    assert report.chunks_deleted == 0  # both "garbage" chunks are referenced now
    assert read_back(repo, m, "vda")[: 2 * CHUNK - CHUNK] == garbage[0]
    assert verify(repo, read_data=True).ok


def test_lapsed_lease_makes_commit_fail(file_target: Target) -> None:
    """A writer stalled past its lease (GC ran meanwhile) must not commit."""
    repo = file_target.init()
    garbage = os.urandom(CHUNK)
    _aborted_backup(repo, [garbage])
    repo = file_target.open(lease_ttl=0.5)
    w = repo.open_backup("vm", None, "full", "test: stalls", None)
    d = w.open_disk("vda", CHUNK, "raw")
    d.put_chunk(0, garbage)  # dedup against a chunk GC is about to collect
    d.finish()
    w.lease.stop_renewing()  # the process "freezes"
    time.sleep(0.6)
    # The lapsed lease no longer blocks GC (which runs with the default ttl itself, so
    # a slow machine cannot make *its* lease lapse).
    report = collect_garbage(file_target.open(), grace=0)
    assert report.chunks_deleted == 1
    assert not repo.backend.exists(chunk_key(repo.chunk_digest(garbage)))
    w.lease._write()  # the process wakes up and renews, late
    with pytest.raises(LeaseExpiredError, match="lapsed"):
        w.commit()
    assert repo.list_manifests() == []


_WRITER = """
import os, sys, time
from vmvault.storage.repository import open_repository
repo = open_repository(sys.argv[1], endpoint_url=sys.argv[2] or None, lease_ttl=1.0)
w = repo.open_backup("victim", None, "full", "test: will be killed", None)
d = w.open_disk("vda", 8 * repo.chunk_size, "raw")
for i in range(5):
    d.put_chunk(i * repo.chunk_size, os.urandom(repo.chunk_size))
e = w.open_disk("vdb", repo.chunk_size, "raw")
e.put_chunk(0, os.urandom(repo.chunk_size))
e.finish()
print("ready", w.backup_id, flush=True)
time.sleep(120)
"""


def test_writer_killed_mid_backup(target: Target) -> None:
    repo = target.init()
    data = image(4 * CHUNK, 12)
    kept = write_full(repo, "vm", {"vda": data})
    referenced = _chunk_keys(repo)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, target.url, target.endpoint_url or ""],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().split()
        assert line[:1] == ["ready"], line
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    victim = line[1]
    assert [m.backup_id for m in repo.list_manifests()] == [kept.backup_id]  # no manifest
    assert len(_chunk_keys(repo)) == len(referenced) + 6
    assert len(list(repo.backend.list("locks/"))) == 1  # its lease, now unrenewed

    time.sleep(1.1)  # the lease ttl: the dead writer no longer blocks GC
    within = collect_garbage(repo, grace=3600)
    assert within.chunks_deleted == 0 and within.chunks_in_grace == 6
    assert within.locks_removed == 1

    after = collect_garbage(repo, grace=0)
    assert after.chunks_deleted == 6 and after.orphan_objects_deleted == 1  # vdb.index
    assert _chunk_keys(repo) == referenced
    assert list(repo.backend.list(f"backups/victim/{victim}/")) == []
    assert read_back(repo, kept, "vda") == data
    assert verify(repo, read_data=True).ok
