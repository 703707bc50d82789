"""Repository writer/reader on both backends: round trips, incrementals, dedup, misuse, names."""

from __future__ import annotations

import json
import os

import pytest

from tests.storage.conftest import CHUNK, Target
from tests.storage.helpers import image, read_back, write_full
from vmvault.storage.backends import Data
from vmvault.storage.errors import (
    BackupNotFoundError,
    InvalidNameError,
    RepositoryExistsError,
    RepositoryNotFoundError,
    UnsupportedVersionError,
    WriterError,
)
from vmvault.storage.format import CONFIG_KEY
from vmvault.storage.region import chunk_table_stored


@pytest.mark.parametrize("passphrase", [None, b"correct horse"])
def test_full_then_incremental_round_trip(target: Target, passphrase: bytes | None) -> None:
    repo = target.init(passphrase)
    size = 10 * CHUNK + 1234  # a short tail chunk
    vda, vdb = image(size, 1), image(3 * CHUNK, 2)
    full = write_full(repo, "web1", {"vda": vda, "vdb": vdb})
    assert read_back(repo, full, "vda") == vda
    assert read_back(repo, full, "vdb") == vdb
    stats = full.disk("vda").stats
    assert stats.chunks_zero == 3 and stats.chunks_new == 8 and stats.chunks_total == 11

    # Incremental: chunk 1 rewritten, chunk 4 trimmed to zeros, the rest unchanged.
    new_vda = bytearray(vda)
    new_vda[CHUNK : 2 * CHUNK] = os.urandom(CHUNK)
    new_vda[4 * CHUNK : 5 * CHUNK] = bytes(CHUNK)
    w = repo.open_backup("web1", full, "incremental", "test: changes", "cp-2")
    d = w.open_disk("vda", size, "qcow2")
    d.keep_parent(0, CHUNK)
    d.put_chunk(CHUNK, bytes(new_vda[CHUNK : 2 * CHUNK]))
    d.keep_parent(2 * CHUNK, 2 * CHUNK)
    d.put_zero(4 * CHUNK, CHUNK)
    d.keep_parent(5 * CHUNK, size - 5 * CHUNK)
    st = d.finish()
    assert (st.chunks_new, st.chunks_parent, st.chunks_zero) == (1, 9, 1)
    assert st.bytes_read == CHUNK
    inc = w.commit()
    assert inc.parent == full.backup_id and inc.kind == "incremental"
    assert read_back(repo, inc, "vda") == bytes(new_vda)
    assert read_back(repo, full, "vda") == vda  # the parent is untouched

    again = target.open(passphrase)
    assert [m.backup_id for m in again.list_manifests("web1")] == [full.backup_id, inc.backup_id]
    latest = again.latest_manifest("web1")
    assert latest is not None and latest.backup_id == inc.backup_id
    assert again.find_backup(full.backup_id).disks[1].name == "vdb"
    assert again.load_manifest("web1", inc.backup_id).checkpoint == "cp-2"
    assert again.latest_manifest("other") is None
    digests = again.chunk_names(inc, "vda")
    # Format 2 names a whole-region chunk by its region digest (a tree hash).
    assert digests[1] == again.regions.region_digest_hex(bytes(new_vda[CHUNK : 2 * CHUNK]))
    assert digests[4] is None and digests[0] == again.chunk_names(full, "vda")[0]


def test_duplicate_data_is_stored_once(target: Target) -> None:
    repo = target.init()
    block = os.urandom(CHUNK)
    data = block * 4
    m1 = write_full(repo, "a", {"vda": data})
    st1 = m1.disk("vda").stats
    assert (st1.chunks_new, st1.chunks_dedup) == (1, 3)
    m2 = write_full(repo, "b", {"vda": data})
    assert m2.disk("vda").stats.chunks_new == 0
    assert m2.disk("vda").stats.objects_put == 1  # its index, nothing else
    assert len(list(target.backend().list("chunks/"))) == 1
    assert read_back(repo, m2, "vda") == data


def test_put_chunk_of_zeros_is_not_stored(target: Target) -> None:
    repo = target.init()
    m = write_full(repo, "z", {"vda": bytes(3 * CHUNK)})
    assert m.disk("vda").stats.chunks_zero == 3
    assert list(target.backend().list("chunks/")) == []
    assert [d for _, d in repo.read_disk(m, "vda")] == [None, None, None]


def test_compressible_chunks_shrink_random_ones_stay_raw(file_target: Target) -> None:
    repo = file_target.init()
    text = (b"the quick brown fox " * 4000)[:CHUNK]
    m = write_full(repo, "c", {"vda": text + os.urandom(CHUNK)})
    sizes = sorted(o.size for o in file_target.backend().list("chunks/"))
    assert sizes[0] < CHUNK // 10  # zstd
    # The chunk's table (its size fixed by the length), one compression byte, raw payload.
    assert sizes[1] == 4 + chunk_table_stored(CHUNK, encrypted=False) + CHUNK + 1
    assert read_back(repo, m, "vda")[:CHUNK] == text


def test_writer_misuse_is_refused(file_target: Target) -> None:
    repo = file_target.init()
    w = repo.open_backup("vm", None, "full", "test", None)
    d = w.open_disk("vda", 4 * CHUNK, "raw")
    with pytest.raises(WriterError, match="chunk-aligned"):
        d.put_chunk(100, bytes(CHUNK))
    with pytest.raises(WriterError, match="one chunk"):
        d.put_chunk(0, os.urandom(2 * CHUNK))
    with pytest.raises(WriterError, match="ends mid-chunk"):
        d.put_chunk(0, os.urandom(100))
    with pytest.raises(WriterError, match="inside"):
        d.put_zero(3 * CHUNK, 2 * CHUNK)
    d.put_chunk(0, os.urandom(CHUNK))
    with pytest.raises(WriterError, match="given twice"):
        d.put_zero(0, 2 * CHUNK)
    with pytest.raises(WriterError, match="parent"):
        d.keep_parent(CHUNK, CHUNK)
    with pytest.raises(WriterError, match="opened twice"):
        w.open_disk("vda", CHUNK, "raw")
    with pytest.raises(WriterError, match="never given, first at offset 65536"):
        d.finish()
    with pytest.raises(WriterError, match="not finished"):
        w.commit()
    with pytest.raises(WriterError, match="needs a parent"):
        repo.open_backup("vm", None, "incremental", "x", None)
    assert repo.list_manifests() == []  # the failed commit aborted: no manifest


def test_abort_leaves_no_manifest(target: Target) -> None:
    repo = target.init()
    w = repo.open_backup("vm", None, "full", "test", None)
    d = w.open_disk("vda", 2 * CHUNK, "raw")
    d.put_chunk(0, os.urandom(CHUNK))
    d.put_chunk(CHUNK, os.urandom(CHUNK))
    d.finish()
    w.abort()
    assert repo.list_manifests() == []
    assert len(list(target.backend().list("chunks/"))) == 2  # orphans, left for GC
    assert list(target.backend().list("locks/")) == []  # the lease was released
    with pytest.raises(WriterError, match="already committed or aborted"):
        w.commit()


def test_context_manager_aborts_on_error(file_target: Target) -> None:
    repo = file_target.init()
    with pytest.raises(RuntimeError), repo.open_backup("vm", None, "full", "t", None) as w:
        w.open_disk("vda", CHUNK, "raw").put_chunk(0, os.urandom(CHUNK))
        raise RuntimeError("reader failed")
    assert repo.list_manifests() == []
    assert list(file_target.backend().list("locks/")) == []


@pytest.mark.parametrize("bad", ["../etc", "a/b", "a\x00b", "", ".hidden", "x" * 64, "/abs"])
def test_escaping_names_are_refused(file_target: Target, bad: str) -> None:
    repo = file_target.init()
    with pytest.raises(InvalidNameError, match="invalid domain name"):
        repo.open_backup(bad, None, "full", "t", None)
    w = repo.open_backup("ok", None, "full", "t", None)
    with pytest.raises(InvalidNameError, match="invalid disk name"):
        w.open_disk(bad, CHUNK, "raw")
    w.abort()
    with pytest.raises(InvalidNameError):
        repo.list_manifests(bad)
    with pytest.raises(InvalidNameError, match="invalid backup id"):
        repo.find_backup("../../config")
    with pytest.raises(InvalidNameError):
        repo.load_manifest("ok", bad)
    assert file_target.root is not None
    assert sorted(p.name for p in file_target.root.parent.iterdir()) == ["repo"]


def test_init_refuses_existing_and_open_needs_one(target: Target) -> None:
    with pytest.raises(RepositoryNotFoundError, match="vmvault init"):
        target.open()
    target.init()
    with pytest.raises(RepositoryExistsError, match="nothing was changed"):
        target.init()
    with pytest.raises(BackupNotFoundError):
        target.open().find_backup("20260101T000000.000000Z-00000000")


def test_newer_format_version_is_refused(target: Target) -> None:
    target.init()
    b = target.backend()
    doc = json.loads(b.get(CONFIG_KEY))
    doc["version"] = 3
    b.put(CONFIG_KEY, json.dumps(doc).encode())
    with pytest.raises(UnsupportedVersionError, match=r"version 3 is newer.*upgrade vmvault"):
        target.open()


def test_newer_manifest_version_is_refused(file_target: Target) -> None:
    repo = file_target.init()
    m = write_full(repo, "vm", {"vda": os.urandom(CHUNK)})
    doc = m.to_json()
    doc["version"] = 7
    from vmvault.storage.format import canonical_json

    doc["checksum"] = repo.codec.digest(canonical_json(doc))
    repo.backend.put(m.key, json.dumps(doc).encode())
    with pytest.raises(UnsupportedVersionError, match="version 7"):
        repo.list_manifests()


def test_memory_is_bounded_by_in_flight_limit(file_target: Target) -> None:
    """put_chunk blocks while concurrency + 2 chunks are in flight."""
    import threading
    import time

    repo = file_target.init()
    repo = file_target.open(concurrency=2)
    inner_put = repo.backend.put
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    def slow_put(key: str, data: Data, if_absent: bool = False, defer_sync: bool = False) -> bool:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.01)
        with lock:
            state["now"] -= 1
        return inner_put(key, data, if_absent, defer_sync)

    repo.backend.put = slow_put  # type: ignore[method-assign]
    w = repo.open_backup("vm", None, "full", "t", None)
    d = w.open_disk("vda", 24 * CHUNK, "raw")
    for i in range(24):
        d.put_chunk(i * CHUNK, os.urandom(CHUNK))
        assert d._tasks._slots._value >= 0
        assert len(d._tasks._futures) <= 4
    d.finish()
    w.commit()
    assert 1 <= state["peak"] <= 2
