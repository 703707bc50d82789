"""Safety under concurrency and hostile input: name checks, unreadable locks, flush ordering
between concurrent writers, GC's lease during a long sweep, a parent pruned mid-backup."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

import vmvault.storage.backends.file as backends
from tests.storage.conftest import CHUNK, Target
from vmvault.storage.backends import Backend, Data, Litter, ObjectInfo, open_backend
from vmvault.storage.errors import (
    BackendUnavailableError,
    InvalidNameError,
    LeaseExpiredError,
    RepositoryLockedError,
    WriterError,
)
from vmvault.storage.format import check_backup_id, check_digest, check_name, parse_backup_key
from vmvault.storage.gc import collect_garbage


@pytest.mark.parametrize("name", ["web1\n", "vda\n"])
def test_name_with_trailing_newline_is_refused(file_target: Target, name: str) -> None:
    # Python's "$" matches before a final newline: the check must anchor at the very end.
    with pytest.raises(InvalidNameError):
        check_name(name, "domain")
    repo = file_target.init()
    with pytest.raises(InvalidNameError):
        repo.open_backup(name, None, "full", "test", None)
    with pytest.raises(InvalidNameError):
        check_backup_id("20261125T020000.123456Z-1a2b3c4d\n")
    with pytest.raises(Exception, match="invalid chunk digest"):
        check_digest("0" * 64 + "\n")
    assert parse_backup_key(f"backups/{name}/20261125T020000.123456Z-1a2b3c4d/m") is None


class _LockReadsFail:
    """A real backend whose GETs of lock objects fail (endpoint trouble on those keys)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.url = inner.url

    def get(self, key: str, max_size: int | None = None) -> bytes:
        if key.startswith("locks/"):
            raise BackendUnavailableError(f"GET {key} kept failing (injected)")
        return self.inner.get(key, max_size)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.inner.get_range(key, offset, length)

    def put(self, key: str, data: Data, if_absent: bool = False, defer_sync: bool = False) -> bool:
        return self.inner.put(key, data, if_absent, defer_sync)

    def flush(self) -> None:
        self.inner.flush()

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def sweep_litter(self, older_than: datetime, dry_run: bool = False) -> Litter:
        return self.inner.sweep_litter(older_than, dry_run)

    def close(self) -> None:
        self.inner.close()


def test_gc_does_not_ignore_a_lock_it_cannot_read(target: Target) -> None:
    """A lock object GC cannot read may be a live backup's: GC must not run."""
    repo = target.init()
    garbage = os.urandom(CHUNK)
    w = repo.open_backup("vm", None, "full", "test: in flight", None)
    d = w.open_disk("vda", CHUNK, "raw")
    d.put_chunk(0, garbage)
    d.finish()
    gc_repo = target.open()
    gc_repo.backend = _LockReadsFail(gc_repo.backend)
    try:
        with pytest.raises((RepositoryLockedError, BackendUnavailableError)):
            collect_garbage(gc_repo, grace=0)
        m = w.commit()
        assert [data for _, data in repo.read_disk(m, "vda")] == [garbage]
    finally:
        gc_repo.close()
        repo.close()


def test_concurrent_flush_waits_for_the_fsyncs_it_relies_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers flush at once: the second must not return before the first has made
    the shared chunk directories durable (it writes an index right after)."""
    backend = open_backend(f"file://{tmp_path}/repo")
    backend.put("chunks/aa/one", b"1", if_absent=True, defer_sync=True)
    entered, release = threading.Event(), threading.Event()
    synced: list[Path] = []
    real = backends._fsync_dir

    def slow_fsync(path: Path) -> None:
        entered.set()
        release.wait(5)
        real(path)
        synced.append(path)

    monkeypatch.setattr(backends, "_fsync_dir", slow_fsync)
    first = threading.Thread(target=backend.flush)
    first.start()
    try:
        assert entered.wait(5)
        second_done = threading.Event()

        def second_flush() -> None:
            backend.flush()
            second_done.set()

        second = threading.Thread(target=second_flush)
        second.start()
        # The second flush must still be waiting: chunks/aa is not durable yet.
        returned_early = second_done.wait(0.5)
        release.set()
        second.join(5)
        assert not returned_early, "flush returned before the pending fsync finished"
        assert synced
    finally:
        release.set()
        first.join(5)


class _SlowDeletes:
    """Deletes that take long and a lock that cannot be renewed (endpoint trouble)."""

    def __init__(self, inner: Backend, delay: threading.Event) -> None:
        self.inner = inner
        self.url = inner.url
        self.deletes = 0
        self._delay = delay

    def get(self, key: str, max_size: int | None = None) -> bytes:
        return self.inner.get(key, max_size)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.inner.get_range(key, offset, length)

    def put(self, key: str, data: Data, if_absent: bool = False, defer_sync: bool = False) -> bool:
        if key.startswith("locks/") and self.deletes:
            raise BackendUnavailableError(f"PUT {key} kept failing (injected)")
        return self.inner.put(key, data, if_absent, defer_sync)

    def flush(self) -> None:
        self.inner.flush()

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        if key.startswith("chunks/"):
            self.deletes += 1
            self._delay.wait(0.4)  # each delete is slow; the lease lapses meanwhile
        self.inner.delete(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def sweep_litter(self, older_than: datetime, dry_run: bool = False) -> Litter:
        return self.inner.sweep_litter(older_than, dry_run)

    def close(self) -> None:
        self.inner.close()


def test_gc_stops_sweeping_once_its_lease_lapsed(file_target: Target) -> None:
    repo = file_target.init(concurrency=1)
    w = repo.open_backup("junk", None, "full", "test: will abort", None)
    d = w.open_disk("vda", 6 * CHUNK, "raw")
    for i in range(6):
        d.put_chunk(i * CHUNK, os.urandom(CHUNK))
    d.finish()
    w.abort()
    gc_repo = file_target.open(lease_ttl=0.6, concurrency=1)
    slow = _SlowDeletes(gc_repo.backend, threading.Event())
    gc_repo.backend = slow
    with pytest.raises(LeaseExpiredError):
        collect_garbage(gc_repo, grace=0)
    # Once the lock lapsed, others may take it: GC must not go on deleting.
    assert slow.deletes < 6
    gc_repo.close()
    repo.close()


def test_parent_pruned_before_the_lease_is_refused(file_target: Target) -> None:
    """The caller read the parent manifest before taking the lease; a prune that stopped
    after deleting that manifest, then a GC, may have removed the parent's chunks while
    its index (younger than the grace window) is still there. Building on it would
    commit a backup that references missing chunks."""
    repo = file_target.init()
    data = os.urandom(2 * CHUNK)
    w = repo.open_backup("vm", None, "full", "test: parent", None)
    d = w.open_disk("vda", len(data), "raw")
    for off in range(0, len(data), CHUNK):
        d.put_chunk(off, data[off : off + CHUNK])
    d.finish()
    parent = w.commit()
    assert file_target.root is not None
    old = time.time() - 7200
    for o in repo.backend.list("chunks/"):
        os.utime(file_target.root / o.key, (old, old))
    repo.backend.delete(parent.key)  # prune stopped after deleting the manifest
    collect_garbage(repo, grace=3600)  # the chunks go; the young index stays
    with pytest.raises(WriterError, match="no longer exists"):
        w2 = repo.open_backup("vm", parent, "incremental", "test: child", None)
        d2 = w2.open_disk("vda", len(data), "raw")
        d2.keep_parent(0, len(data))
        d2.finish()
        w2.commit()
    assert repo.list_manifests() == []
    assert list(repo.backend.list("locks/")) == []
