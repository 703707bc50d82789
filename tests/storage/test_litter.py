"""GC leaves no litter: temp files of killed file:// writers, empty backup directories,
and index objects of backups that never got a manifest, once older than the grace window."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.storage.conftest import CHUNK, Target
from tests.storage.helpers import image, read_back, write_full
from vmvault.storage.format import index_key, new_backup_id
from vmvault.storage.gc import collect_garbage
from vmvault.storage.verify import verify

REPO_ROOT = Path(__file__).resolve().parents[2]

# A writer that stops in the middle of a put (after its first piece reached the temp
# file) until told to go on through stdin, or until it is killed.
_SLOW_PUT = """
import sys
from vmvault.storage.backends import open_backend

class Pieces(list):
    def __iter__(self):
        yield b"x" * 4096
        print("writing", flush=True)
        sys.stdin.readline()
        yield b"y" * 4096

backend = open_backend(sys.argv[1])
backend.put(sys.argv[2], Pieces(), if_absent=True)
print("done", flush=True)
"""

HOUR = 3600.0


def _start_writer(url: str, key: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PUT, url, key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == b"writing\n", line
    return proc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _temp_files(root: Path) -> set[Path]:
    return {p for p in root.rglob(".tmp-*") if p.is_file()}


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


@pytest.fixture
def writers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(30)


def test_gc_removes_old_temp_files_and_empty_backup_dirs_only(
    file_target: Target, writers: list[subprocess.Popen[bytes]]
) -> None:
    repo = file_target.init()
    root = file_target.root
    assert root is not None
    data = image(4 * CHUNK, 21)
    kept = write_full(repo, "vm", {"vda": data})

    # Writers killed mid-put: one in a chunk directory, one writing a pack, one writing
    # the only object of a backup directory (which holds nothing but the temp file).
    orphan_id = new_backup_id(kept.created)
    dead_keys = [
        "chunks/ab/" + "ab" * 32,
        "packs/ef/" + "ef" * 16,
        index_key("vm", orphan_id, "vda"),
    ]
    for key in dead_keys:
        proc = _start_writer(file_target.url, key)
        writers.append(proc)
        _kill(proc)
    dead_temps = _temp_files(root)
    assert len(dead_temps) == 3
    for tmp in dead_temps:
        _age(tmp, 2 * HOUR)
    orphan_dir = root / "backups" / "vm" / orphan_id
    _age(orphan_dir, 2 * HOUR)

    # A directory a writer made and died before writing anything into.
    empty = root / "backups" / "gone" / new_backup_id(kept.created)
    empty.mkdir(parents=True)
    _age(empty, 2 * HOUR)
    _age(empty.parent, 2 * HOUR)

    # A live writer, in the middle of its put: its temp file is young and must stay.
    live_key = "chunks/cd/" + "cd" * 32
    live = _start_writer(file_target.url, live_key)
    writers.append(live)
    live_temps = _temp_files(root) - dead_temps
    assert len(live_temps) == 1

    dry = collect_garbage(repo, grace=HOUR, dry_run=True)
    assert (dry.temp_files_deleted, dry.temp_files_in_grace) == (3, 1)
    assert _temp_files(root) == dead_temps | live_temps

    report = collect_garbage(repo, grace=HOUR)
    assert (report.temp_files_deleted, report.temp_files_in_grace) == (3, 1)
    assert report.empty_dirs_removed >= 4  # vm/<orphan>, gone/<id>, gone, packs/ef
    assert _temp_files(root) == live_temps
    assert not orphan_dir.exists()
    assert not (root / "backups" / "gone").exists()
    assert (root / "backups" / "vm" / kept.backup_id / "manifest.json").is_file()

    # The live writer finishes undisturbed.
    assert live.stdin is not None and live.stdout is not None
    live.stdin.write(b"go\n")
    live.stdin.flush()
    assert live.stdout.readline() == b"done\n"
    assert live.wait(30) == 0
    assert repo.backend.get(live_key) == b"x" * 4096 + b"y" * 4096
    assert _temp_files(root) == set()

    assert verify(repo, read_data=True).ok
    assert read_back(repo, kept, "vda") == data


def test_young_temp_files_and_dirs_are_kept(
    file_target: Target, writers: list[subprocess.Popen[bytes]]
) -> None:
    repo = file_target.init()
    root = file_target.root
    assert root is not None
    proc = _start_writer(file_target.url, index_key("vm", new_backup_id(repo.config.created), "x"))
    writers.append(proc)
    _kill(proc)
    young = _temp_files(root)
    assert len(young) == 1
    report = collect_garbage(repo, grace=HOUR)
    assert (report.temp_files_deleted, report.temp_files_in_grace) == (0, 1)
    assert _temp_files(root) == young
    # Once past the window, the next run collects it and its directory.
    later = collect_garbage(repo, grace=0)
    assert later.temp_files_deleted == 1
    assert not list((root / "backups").iterdir())


def test_orphan_index_of_a_backup_without_manifest_goes_after_grace(target: Target) -> None:
    repo = target.init()
    kept = write_full(repo, "vm", {"vda": os.urandom(2 * CHUNK)})
    w = repo.open_backup("vm", kept, "incremental", "test: never committed", None)
    d = w.open_disk("vda", 2 * CHUNK, "raw")
    d.keep_parent(0, 2 * CHUNK)
    d.finish()  # the index object exists, the manifest never will
    w.lease.release()  # the writer dies without aborting
    orphan = f"backups/vm/{w.backup_id}/"
    assert [o.key for o in repo.backend.list(orphan)] == [orphan + "vda.index"]

    young = collect_garbage(repo, grace=HOUR)
    assert (young.orphan_objects_deleted, young.orphan_objects_in_grace) == (0, 1)
    report = collect_garbage(repo, grace=0)
    assert report.orphan_objects_deleted == 1
    assert list(repo.backend.list(orphan)) == []
    if target.root is not None:
        assert not (target.root / "backups" / "vm" / w.backup_id).exists()
    assert [m.backup_id for m in repo.list_manifests()] == [kept.backup_id]
    assert verify(repo, read_data=True).ok
