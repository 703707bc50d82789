"""A hostile repository gets a clear refusal, not an exhausted machine: every decompression
is capped at the size the reader expects, every JSON object in size and depth, every
metadata object in size before it is read, and scrypt parameters in cost."""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

import pytest

from tests.storage.conftest import CHUNK, Target
from tests.storage.helpers import read_back, write_full
from vmvault.storage.disk_reader import load_disk_index
from vmvault.storage.errors import CorruptObjectError, RepositoryLockedError
from vmvault.storage.format import CONFIG_KEY, KEY_KEY, chunk_key
from vmvault.storage.gc import collect_garbage
from vmvault.storage.verify import verify

MiB = 1024 * 1024
GiB = 1024 * MiB
# Reading any bomb below must not grow this process by more than this.
RSS_SLACK = 256 * MiB


def rle_frame(total: int, declare: bool = True, claim: int | None = None) -> bytes:
    """A zstd frame of ``total`` bytes of 'a' made of RLE blocks: 4 bytes per 128 KiB.

    ``declare``: write the content size in the frame header (``claim`` if given, which
    may lie); else the frame says nothing about its size (a 128 KiB window).
    """
    out = bytearray(b"\x28\xb5\x2f\xfd")
    if declare:
        out.append(0xE0)  # single segment, 8-byte frame content size
        out += struct.pack("<Q", total if claim is None else claim)
    else:
        out += bytes([0x00, 7 << 3])  # no content size; window 2^(10+7)
    left = total
    while left:
        n = min(left, 1 << 17)
        left -= n
        out += ((n << 3) | (1 << 1) | (0 if left else 1)).to_bytes(3, "little")  # RLE block
        out.append(0x61)
    return bytes(out)


class PeakRss:
    """This process's peak RSS growth from now on (``/proc/self/clear_refs`` resets the
    peak, Linux 4.0+; ru_maxrss could not, so earlier tests would hide a bomb)."""

    def __init__(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        self.start = self._read("VmHWM")

    @staticmethod
    def _read(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc/self/status")

    def growth(self) -> int:
        return self._read("VmHWM") - self.start


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


# --------------------------------------------------------------------------- decompression


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(rle_frame(GiB), id="32KB-declaring-1GiB"),
        pytest.param(rle_frame(GiB, declare=False), id="32KB-inflating-to-1GiB-undeclared"),
        pytest.param(rle_frame(1, claim=1 << 40), id="17B-claiming-1TiB"),
    ],
)
def test_a_chunk_bomb_is_refused_by_restore_and_verify(target: Target, frame: bytes) -> None:
    """Version 1 chunks (still read); format 2's pieces: tests/storage/test_format2.py."""
    repo = target.init(format_version=1)
    data = os.urandom(3 * CHUNK)
    m = write_full(repo, "vm", {"vda": data})
    digest = repo.chunk_names(m, "vda")[1]
    assert digest is not None
    key = chunk_key(digest)
    repo.backend.put(key, b"\x01" + frame)
    peak = PeakRss()
    with pytest.raises(CorruptObjectError, match=key):
        read_back(repo, m, "vda")
    with pytest.raises(CorruptObjectError, match=key):
        repo.read_chunk(digest, check=False)
    report = verify(repo, read_data=True)
    assert [(p.disk, p.offset) for p in report.problems] == [("vda", CHUNK)]
    assert key in report.problems[0].message
    assert peak.growth() < RSS_SLACK


def test_a_frame_that_fits_its_cap_still_reads(file_target: Target) -> None:
    """The caps refuse only what exceeds the expected size: an undeclared-size frame
    (legal zstd, which vmvault itself does not write) of exactly one chunk reads."""
    repo = file_target.init(format_version=1)
    data = b"a" * CHUNK
    m = write_full(repo, "vm", {"vda": data})
    digest = repo.chunk_names(m, "vda")[0]
    assert digest is not None
    repo.backend.put(chunk_key(digest), b"\x01" + rle_frame(CHUNK, declare=False))
    assert read_back(repo, m, "vda") == data
    assert verify(repo, read_data=True).ok


@pytest.mark.parametrize("declare", [True, False])
def test_an_index_bomb_is_refused(file_target: Target, declare: bool) -> None:
    repo = file_target.init()
    m = write_full(repo, "vm", {"vda": os.urandom(2 * CHUNK)})
    key = m.disk("vda").index_key
    repo.backend.put(key, b"\x01" + rle_frame(GiB, declare=declare))
    peak = PeakRss()
    with pytest.raises(CorruptObjectError, match=key):
        load_disk_index(repo, m, "vda")
    assert peak.growth() < RSS_SLACK


# --------------------------------------------------------------------------- JSON objects


# Deeper than Python's recursion limit (json.loads raised RecursionError), yet within
# the size caps (64 KiB); the 100,000-deep objects are refused by size first.
DEEP = 20_000
TOO_DEEP = "nests arrays/objects deeper than 64 levels"
TOO_BIG = "200000 bytes, more than the 65536"


@pytest.mark.parametrize(("depth", "message"), [(DEEP, TOO_DEEP), (100_000, TOO_BIG)])
def test_deeply_nested_config_is_refused(target: Target, depth: int, message: str) -> None:
    target.init()
    target.backend().put(CONFIG_KEY, _deep(depth))
    with pytest.raises(CorruptObjectError, match=rf"config.*{message}"):
        target.open()


@pytest.mark.parametrize(("depth", "message"), [(DEEP, TOO_DEEP), (100_000, TOO_BIG)])
def test_deeply_nested_key_object_is_refused(target: Target, depth: int, message: str) -> None:
    target.init(b"pw")
    target.backend().put(KEY_KEY, _deep(depth))
    with pytest.raises(CorruptObjectError, match=rf"key.*{message}"):
        target.open(b"pw")


def test_deeply_nested_manifest_is_a_damaged_manifest(file_target: Target) -> None:
    repo = file_target.init()
    good = write_full(repo, "vm", {"vda": os.urandom(CHUNK)})
    bad = write_full(repo, "vm", {"vda": os.urandom(CHUNK)})
    repo.backend.put(bad.key, _deep(100_000))
    scan = repo.scan_manifests()
    assert [m.backup_id for m in scan.manifests] == [good.backup_id]
    assert [d.key for d in scan.damaged] == [bad.key] and TOO_DEEP in scan.damaged[0].error
    assert [p.backup_id for p in verify(repo).problems] == [bad.backup_id]


def test_deeply_nested_lock_counts_as_an_unreadable_live_lock(target: Target) -> None:
    repo = target.init()
    for depth in (DEEP, 100_000):
        repo.backend.put("locks/evil.json", _deep(depth))
        with pytest.raises(RepositoryLockedError, match=r"unreadable lock.*locks/evil\.json"):
            collect_garbage(repo, grace=0)


def test_nesting_inside_strings_does_not_count(file_target: Target) -> None:
    """Brackets and escaped quotes inside JSON strings are text, not depth."""
    repo = file_target.init()
    w = repo.open_backup("vm", None, "full", 'tricky \\" [[[[ ' + "[" * 500, None)
    w.open_disk("vda", CHUNK, "raw").put_zero(0, CHUNK)
    w.disks["vda"].finish()
    m = w.commit(layout={"note": "{" * 1000 + '"' + "]" * 10})
    assert repo.list_manifests()[0].layout == m.layout


# --------------------------------------------------------------------------- object sizes


def test_a_huge_manifest_is_not_read(file_target: Target) -> None:
    """A 10 GB "manifest" (sparse file) is refused from its size, never loaded."""
    repo = file_target.init()
    good = write_full(repo, "vm", {"vda": os.urandom(CHUNK)})
    bad = write_full(repo, "vm", {"vda": os.urandom(CHUNK)})
    assert file_target.root is not None
    path = file_target.root / bad.key
    with path.open("r+b") as f:
        f.truncate(10 * 1000**3)
    peak = PeakRss()
    scan = repo.scan_manifests()
    assert [m.backup_id for m in scan.manifests] == [good.backup_id]
    assert "10000000000 bytes" in scan.damaged[0].error
    assert peak.growth() < RSS_SLACK


def test_a_huge_chunk_object_is_not_read(file_target: Target) -> None:
    repo = file_target.init(format_version=1)
    m = write_full(repo, "vm", {"vda": os.urandom(CHUNK)})
    digest = repo.chunk_names(m, "vda")[0]
    assert digest is not None and file_target.root is not None
    with (file_target.root / chunk_key(digest)).open("r+b") as f:
        f.truncate(10 * 1000**3)
    peak = PeakRss()
    with pytest.raises(CorruptObjectError, match="10000000000 bytes"):
        repo.read_chunk(digest)
    assert peak.growth() < RSS_SLACK


def test_an_oversized_config_on_s3_is_refused_before_reading(target: Target) -> None:
    target.init()
    target.backend().put(CONFIG_KEY, b" " * (2 * MiB) + b"{}")
    with pytest.raises(CorruptObjectError, match=r"config.*2097154 bytes"):
        target.open()


# --------------------------------------------------------------------------- scrypt


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n": 2**22, "r": 32}, "16384 MiB"),  # 128 * r * n: 16 GiB
        ({"n": 2**24, "r": 8}, "16384 MiB"),
        ({"n": 2**14, "r": 8, "p": 64}, "p=64"),
        ({"n": 1e400}, "bad scrypt parameters"),
        ({"n": "32768"}, "bad scrypt parameters"),
        ({"n": True}, "bad scrypt parameters"),
        ({"n": 3}, "n=3"),
        ({"nonce": base64.b64encode(b"short").decode()}, "nonce"),
        ({"salt": None}, "salt"),
    ],
)
def test_bad_scrypt_parameters_are_refused_not_tried(
    file_target: Target, changes: dict[str, object], message: str
) -> None:
    file_target.init(b"pw")
    b = file_target.backend()
    doc = json.loads(b.get(KEY_KEY))
    doc.update(changes)
    # json.dumps writes an infinite float as "Infinity"; 1e400 is what a file would say.
    b.put(KEY_KEY, json.dumps(doc).replace("Infinity", "1e400").encode())
    with pytest.raises(CorruptObjectError, match=message):
        file_target.open(b"pw")
