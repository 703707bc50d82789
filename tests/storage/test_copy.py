"""``copy_backups``: file:// ↔ SeaweedFS S3, killed and resumed, across different keys.

Backups are made by the format 2 driver (plans, patches into packs, keeps), so the
copies carry the real incremental structure; every copy is restored and compared
byte for byte with the disk it came from.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tests.storage.conftest import CHUNK, Target
from tests.storage.format2_driver import Disk, back_up
from tests.storage.helpers import image, read_back
from vmvault.storage.copy import copy_backups, same_key_material, select_backups
from vmvault.storage.errors import CorruptObjectError
from vmvault.storage.format import Manifest
from vmvault.storage.repository import Repository

SIZE = 24 * CHUNK


def _chain(repo: Repository, domain: str, seed: int, rounds: int) -> dict[str, bytes]:
    """A full backup and ``rounds`` incrementals with scattered writes; backup id -> bytes."""
    rng = random.Random(seed)
    disk = Disk(bytearray(image(SIZE, seed)))
    images: dict[str, bytes] = {}
    parent: Manifest | None = None
    for _ in range(rounds + 1):
        parent = back_up(repo, disk, parent, rng, domain)
        images[parent.backup_id] = bytes(disk.data)
        disk.dirty.clear()
        for _ in range(12):
            disk.write(rng.randrange(SIZE - 4096), rng.randbytes(4096))
    return images


def _restores(repo: Repository, images: dict[str, bytes]) -> None:
    by_id = {m.backup_id: m for m in repo.list_manifests()}
    for backup_id, data in images.items():
        assert read_back(repo, by_id[backup_id], "vda") == data, backup_id


def _object_count(repo: Repository) -> int:
    return sum(1 for p in ("chunks/", "packs/") for _ in repo.backend.list(p))


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from vmvault.storage.copy import copy_backups, select_backups
    from vmvault.storage.repository import open_repository

    after = int(sys.argv[4])
    src_pass = sys.argv[5].encode() or None
    dst_pass = sys.argv[6].encode() or None
    src = open_repository(sys.argv[1], passphrase=src_pass)
    dst = open_repository(sys.argv[2], endpoint_url=sys.argv[3] or None, passphrase=dst_pass)
    seen = 0

    def progress(phase, done, total):
        # A real SIGKILL in the middle of a backup's objects or regions: no cleanup runs.
        global seen
        if phase.startswith("copy ") and "/" in phase and done:
            seen += 1
            if seen >= after:
                os.kill(os.getpid(), signal.SIGKILL)

    copy_backups(src, dst, select_backups(src), progress)
    """
)


def test_copy_file_to_s3_and_back_killed_resumed_incremental(
    tmp_path: Path, s3_server: object
) -> None:
    src_t = Target("file", f"file://{tmp_path}/src", root=tmp_path / "src")
    s3 = s3_server
    dst_t = Target("s3", s3.repo_url("offsite"), endpoint_url=s3.endpoint_url)  # type: ignore[attr-defined]
    with src_t.init() as src:
        images = _chain(src, "web", 1, 3)
        images |= _chain(src, "db", 2, 1)
    with dst_t.init():
        pass

    # Killed mid-copy: some objects are on the target, no manifest of the backup in flight.
    child = subprocess.run(
        [sys.executable, "-c", KILLER, src_t.url, dst_t.url, str(dst_t.endpoint_url), "5", "", ""],
        env={**os.environ},
        capture_output=True,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    with src_t.open() as src, dst_t.open() as dst:
        assert same_key_material(src, dst)
        left = _object_count(dst)
        assert left >= 3
        assert dst.list_manifests() == []

        report = copy_backups(src, dst, select_backups(src))
        assert report.mode == "raw"
        assert len(report.copied) == len(images)
        assert report.objects_skipped >= left  # what the killed copy stored is not sent again
        assert _object_count(dst) == _object_count(src)
        _restores(dst, images)

        # Everything is there: the second copy transfers nothing.
        again = copy_backups(src, dst, select_backups(src))
        assert again.objects_copied == 0 and again.bytes_copied == 0
        assert len(again.skipped) == len(images)

        # A new incremental: exactly its new objects (chunks, packs, index) and its manifest.
        latest = src.latest_manifest("web")
        assert latest is not None
        rng = random.Random(9)
        disk = Disk(bytearray(images[latest.backup_id]))
        for _ in range(5):
            disk.write(rng.randrange(SIZE - 4096), rng.randbytes(4096))
        new = back_up(src, disk, latest, rng, "web")
        images[new.backup_id] = bytes(disk.data)
        inc = copy_backups(src, dst, select_backups(src, ["web"]))
        assert inc.copied == [f"web/{new.backup_id}"]
        assert inc.objects_copied == sum(d.stats.objects_put for d in new.disks) + 1
        _restores(dst, images)

    # And back to another file:// repository.
    back_t = Target("file", f"file://{tmp_path}/back", root=tmp_path / "back")
    with dst_t.open() as dst, back_t.init() as back:
        report = copy_backups(dst, back, select_backups(dst))
        assert len(report.copied) == len(images)
        _restores(back, images)


def test_copy_between_different_keys_rebuilds_and_dedups(tmp_path: Path) -> None:
    src_t = Target("file", f"file://{tmp_path}/src")
    enc_t = Target("file", f"file://{tmp_path}/enc")
    plain_t = Target("file", f"file://{tmp_path}/plain")
    with src_t.init(passphrase=b"source secret") as src:
        images = _chain(src, "web", 3, 2)
        # The same disk under another domain name: stored once on the targets.
        twin = Disk(bytearray(image(SIZE, 3)))
        twin_m = back_up(src, twin, None, random.Random(5), "twin")
        images[twin_m.backup_id] = bytes(twin.data)
    with enc_t.init(passphrase=b"target secret"), plain_t.init():
        pass
    for target, passphrase in ((enc_t, b"target secret"), (plain_t, None)):
        with src_t.open(b"source secret") as src, target.open(passphrase) as dst:
            assert not same_key_material(src, dst)
            web_only = copy_backups(src, dst, select_backups(src, ["web"]))
            assert web_only.mode == "rebuild"
            chunks_web = _object_count(dst)
            report = copy_backups(src, dst, select_backups(src, ["twin"]))
            assert report.copied == [f"twin/{twin_m.backup_id}"]
            # Only the index and the manifest: every chunk of the twin's full backup is
            # the web chain's first backup's, already on the target.
            assert _object_count(dst) == chunks_web
            assert report.objects_copied == 2
            _restores(dst, images)
            # The incremental structure survives: unchanged regions are kept from the parent.
            child = dst.list_manifests("web")[1]
            assert child.parent == dst.list_manifests("web")[0].backup_id
            assert child.disks[0].stats.chunks_parent > 0


def test_rebuild_killed_and_resumed(tmp_path: Path) -> None:
    src_t = Target("file", f"file://{tmp_path}/src")
    dst_t = Target("file", f"file://{tmp_path}/dst")
    with src_t.init(passphrase=b"one") as src:
        images = _chain(src, "web", 8, 2)
    with dst_t.init():
        pass
    child = subprocess.run(
        [sys.executable, "-c", KILLER, src_t.url, dst_t.url, "", "30", "one", ""],
        capture_output=True,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    with src_t.open(b"one") as src, dst_t.open() as dst:
        before = len(dst.list_manifests())
        assert before < len(images)  # killed before the end
        left = _object_count(dst)
        report = copy_backups(src, dst, select_backups(src))
        assert report.mode == "rebuild" and len(report.copied) == len(images) - before
        # Every chunk it reports stored is new on the target (one index and one manifest
        # per backup besides): what the killed copy left is not stored again.
        assert _object_count(dst) == left + report.objects_copied - 2 * len(report.copied)
        _restores(dst, images)


@pytest.mark.parametrize("key", [None, b"other"], ids=["raw", "rebuild"])
def test_tampered_source_object_is_refused(tmp_path: Path, key: bytes | None) -> None:
    src_t = Target("file", f"file://{tmp_path}/src", root=tmp_path / "src")
    dst_t = Target("file", f"file://{tmp_path}/dst")
    with src_t.init() as src:
        images = _chain(src, "web", 4, 0)
        assert len(images) == 1
    chunk = sorted((tmp_path / "src" / "chunks").rglob("*"))[-1]
    assert chunk.is_file()
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with src_t.open() as src, dst_t.init(passphrase=key) as dst:
        with pytest.raises(CorruptObjectError, match=chunk.name):
            copy_backups(src, dst, select_backups(src))
        assert dst.list_manifests() == []


@pytest.mark.parametrize(("a", "b"), [(None, None), (b"a", b"b")], ids=["raw", "rebuild"])
def test_two_copies_at_once_do_not_corrupt_the_target(
    tmp_path: Path, a: bytes | None, b: bytes | None
) -> None:
    src_t = Target("file", f"file://{tmp_path}/src")
    dst_t = Target("file", f"file://{tmp_path}/dst")
    with src_t.init(passphrase=a) as src:
        images = _chain(src, "web", 6, 2)
    with dst_t.init(passphrase=b):
        pass
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with src_t.open(a) as src, dst_t.open(b) as dst:
                copy_backups(src, dst, select_backups(src))
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with dst_t.open(b) as dst:
        assert len(dst.list_manifests()) == len(images)
        _restores(dst, images)


def test_select_backups_by_domain_and_an_empty_selection_selects_nothing(tmp_path: Path) -> None:
    with Target("file", f"file://{tmp_path}/src").init() as src:
        web = _chain(src, "web", 7, 1)
        db = _chain(src, "db", 8, 0)
        assert {m.backup_id for m in select_backups(src)} == set(web) | set(db)
        assert {m.backup_id for m in select_backups(src, ["db"])} == set(db)
        # A copy job whose patterns matched no domain must not copy the whole repository.
        assert select_backups(src, []) == []
