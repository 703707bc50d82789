"""The shared backend suite: every backend (mem://, file://, s3:// on SeaweedFS) passes the same
tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.storage.conftest import Target
from vmvault.storage.backends import FileBackend, check_url, open_backend
from vmvault.storage.backends.mem import forget
from vmvault.storage.errors import (
    CorruptObjectError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    StorageError,
)


def test_put_get_exists_delete(backend_target: Target) -> None:
    b = backend_target.backend()
    assert not b.exists("a/b/c")
    assert b.put("a/b/c", b"hello")
    assert b.exists("a/b/c")
    assert b.get("a/b/c") == b"hello"
    b.put("a/b/c", b"replaced")
    assert b.get("a/b/c") == b"replaced"
    b.delete("a/b/c")
    assert not b.exists("a/b/c")
    b.delete("a/b/c")  # deleting an absent key is fine
    with pytest.raises(ObjectNotFoundError, match="a/b/c"):
        b.get("a/b/c")


def test_conditional_create_never_overwrites(backend_target: Target) -> None:
    b = backend_target.backend()
    assert b.put("chunks/ab/x", b"first", if_absent=True) is True
    assert b.put("chunks/ab/x", b"second", if_absent=True) is False
    assert b.get("chunks/ab/x") == b"first"


def test_list_prefix_sizes_and_times(backend_target: Target) -> None:
    b = backend_target.backend()
    before = datetime.now(UTC) - timedelta(minutes=5)
    for key, body in [("chunks/aa/1", b"x"), ("chunks/ab/2", b"yy"), ("backups/d/m", b"zzz")]:
        b.put(key, body)
    listed = {o.key: o for o in b.list("chunks/")}
    assert set(listed) == {"chunks/aa/1", "chunks/ab/2"}
    assert listed["chunks/ab/2"].size == 2
    after = datetime.now(UTC) + timedelta(minutes=5)
    assert all(before < o.modified < after for o in listed.values())
    assert [o.key for o in b.list("chunks/aa")] == ["chunks/aa/1"]
    assert {o.key for o in b.list("")} >= {"chunks/aa/1", "backups/d/m"}
    assert list(b.list("nothing/")) == []


def test_binary_round_trip(backend_target: Target) -> None:
    b = backend_target.backend()
    body = bytes(range(256)) * 4097
    b.put("bin", body)
    assert b.get("bin") == body


def test_file_backend_refuses_escaping_keys(tmp_path: Path) -> None:
    root = tmp_path / "r"
    b = FileBackend(f"file://{root}", root)
    for key in ("../x", "a/../../x", "/etc/passwd", "a//b", "a/\x00b", ""):
        with pytest.raises(StorageError, match="unsafe object key"):
            b.put(key, b"x")
    assert not (tmp_path / "x").exists()


def test_file_backend_leaves_no_temp_files(file_target: Target) -> None:
    b = file_target.backend()
    for i in range(5):
        b.put(f"k/{i}", b"data", if_absent=True)
        b.put(f"k/{i}", b"data", if_absent=True)
    assert file_target.root is not None
    names = sorted(p.name for p in (file_target.root / "k").iterdir())
    assert names == ["0", "1", "2", "3", "4"]


def test_deferred_put_is_visible_and_flush_is_safe(backend_target: Target) -> None:
    b = backend_target.backend()
    assert b.put("chunks/cd/x", b"deferred", if_absent=True, defer_sync=True)
    assert not b.put("chunks/cd/x", b"other", if_absent=True, defer_sync=True)
    assert b.get("chunks/cd/x") == b"deferred"
    b.flush()
    b.flush()  # nothing pending: a no-op
    assert [o.key for o in b.list("chunks/cd/")] == ["chunks/cd/x"]


def test_put_of_pieces_stores_their_concatenation(backend_target: Target) -> None:
    b = backend_target.backend()
    pieces = (b"\x01", bytearray(b"middle" * 1000), memoryview(b"-end"))
    assert b.put("chunks/ef/p", pieces, if_absent=True, defer_sync=True)
    for i in range(20):  # many directories to sync at once
        b.put(f"chunks/{i:02x}/q", [b"a", b"b"], if_absent=True, defer_sync=True)
    b.flush()
    assert b.get("chunks/ef/p") == b"\x01" + b"middle" * 1000 + b"-end"
    assert b.get("chunks/13/q") == b"ab"


def test_ranged_reads_return_exactly_the_range(backend_target: Target) -> None:
    b = backend_target.backend()
    body = bytes(range(256)) * 64
    b.put("packs/ab/p", body)
    assert b.get_range("packs/ab/p", 0, 4) == body[:4]
    assert b.get_range("packs/ab/p", 1000, 3000) == body[1000:4000]
    assert b.get_range("packs/ab/p", len(body) - 1, 1) == body[-1:]
    # A range past the end is a truncated object, named; a missing object is not found.
    with pytest.raises(CorruptObjectError, match=r"packs/ab/p.*truncated"):
        b.get_range("packs/ab/p", len(body) - 10, 20)
    with pytest.raises(CorruptObjectError, match="truncated"):
        b.get_range("packs/ab/p", len(body) + 5, 20)
    with pytest.raises(ObjectNotFoundError, match="packs/ab/q"):
        b.get_range("packs/ab/q", 0, 1)


def test_too_large_objects_are_refused_unread(backend_target: Target) -> None:
    b = backend_target.backend()
    b.put("big", b"x" * 100)
    assert b.get("big", max_size=100) == b"x" * 100
    with pytest.raises(ObjectTooLargeError, match="big"):
        b.get("big", max_size=99)


def test_mem_repositories_are_shared_by_name_and_forgotten() -> None:
    first, again = open_backend("mem://shared-test"), open_backend("mem://shared-test")
    first.put("k", b"v")
    assert again.get("k") == b"v"
    assert not open_backend("mem://other-test").exists("k")
    forget("mem://shared-test")
    assert not open_backend("mem://shared-test").exists("k")


def test_config_urls_are_file_or_s3_only() -> None:
    assert check_url("file:///srv/backups") == "file:///srv/backups"
    for url, message in [
        ("mem://x", "unsupported repository URL"),
        ("file://host/x", "bad file URL"),
        ("s3://bad bucket/x", "bad bucket name"),
    ]:
        with pytest.raises(StorageError, match=message):
            check_url(url)
