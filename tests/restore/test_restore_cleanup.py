"""``remove_restore_leftovers`` on journals a dead restore can leave, at each of its phases.

The killed-restore tests (test_restore_killed.py) catch a restore while it writes; the
commit is too short to catch a real process in, so its journals are written here the way
``_commit`` writes them, with real files, and a real qemu-nbd stands in for the orphans.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.restore.conftest import CHUNK, MiB, images_equal, make_image, short_tmp, write_backup
from vmvault.storage.repository import Repository
from vmvault.worker.config import FleetConfig, parse_config
from vmvault.worker.restore import RestoreError, create_image, run_restore
from vmvault.worker.restore_cleanup import (
    COMMITTED,
    COMMITTING,
    JournalProcess,
    RestoreCleanupError,
    RestoreJournal,
    journal_path,
    process_start_time,
    remove_restore_leftovers,
)


@pytest.fixture
def state() -> Iterator[Path]:
    path = short_tmp()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def config_for(state: Path, repo_url: str = "file:///nonexistent") -> FleetConfig:
    return parse_config(
        {
            "repository": {"url": repo_url},
            "state_dir": str(state),
            "domains": {"web1": {"host": "h", "qmp": str(state / "q")}},
        },
        "t.yaml",
    )


def alive(pid: int) -> bool:
    return process_start_time(pid) is not None


def start_qemu_nbd(image: Path, socket: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["qemu-nbd", "--format=qcow2", f"--socket={socket}", str(image)],
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not socket.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
        time.sleep(0.02)
    return proc


def test_orphan_qemu_nbd_recorded_by_pid_is_killed(tmp_path: Path, state: Path) -> None:
    """A restore to files killed between starting qemu-nbd and connecting to it."""
    journal = RestoreJournal(state, "web1", "files")
    final = tmp_path / "vda.qcow2"
    partial = tmp_path / "vda.qcow2.partial"
    journal.add_disk("vda", final, partial)
    create_image(partial, 4 * MiB)
    sockdir = journal.new_socket_dir()
    proc = start_qemu_nbd(partial, sockdir / "d0.nbd")
    try:
        journal.add_process("qemu-nbd", proc.pid)
        removed = remove_restore_leftovers(config_for(state), "web1")
        proc.wait(30)  # killed; reaped here, as init would reap a real orphan
        assert f"killed qemu-nbd pid {proc.pid}" in removed
        assert f"removed {partial}" in removed
        assert f"removed socket directory {sockdir}" in removed
        assert not partial.exists() and not sockdir.exists()
        assert not journal_path(state, "web1").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_process_started_but_not_yet_recorded_is_found_by_its_socket_dir(
    tmp_path: Path, state: Path
) -> None:
    """Killed right after the start, before the pid was saved: the private socket directory
    its command line names (saved before the start) identifies it."""
    journal = RestoreJournal(state, "web1", "files")
    partial = tmp_path / "vda.qcow2.partial"
    journal.add_disk("vda", tmp_path / "vda.qcow2", partial)
    create_image(partial, 4 * MiB)
    sockdir = journal.new_socket_dir()
    proc = start_qemu_nbd(partial, sockdir / "d0.nbd")
    try:
        removed = remove_restore_leftovers(config_for(state), "web1")
        proc.wait(30)
        assert f"killed pid {proc.pid} (it used {sockdir})" in removed
        assert not partial.exists() and not sockdir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_reused_pid_is_not_killed(state: Path) -> None:
    """A recorded pid whose start time differs is another process now: left alone."""
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        journal = RestoreJournal(state, "web1", "files")
        start = process_start_time(other.pid)
        assert start is not None
        journal.processes.append(JournalProcess("qemu-nbd", other.pid, start + 1))
        journal.save()
        assert remove_restore_leftovers(config_for(state), "web1") == []
        assert alive(other.pid)
        assert not journal_path(state, "web1").exists()
    finally:
        other.kill()
        other.wait()


def commit_state(tmp_path: Path, state: Path, step: int) -> tuple[RestoreJournal, Path]:
    """Two disks being committed, vda replacing an old image, vdb new; stopped after ``step``
    of: 0 aside recorded, 1 vda moved aside, 2 vda renamed, 3 vdb renamed."""
    images = tmp_path / "images"
    images.mkdir()
    journal = RestoreJournal(state, "web1", "incoming")
    for name in ("vda", "vdb"):
        final = images / f"{name}.qcow2"
        journal.add_disk(name, final, images / f"{name}.qcow2.partial")
        (images / f"{name}.qcow2.partial").write_bytes(b"restored " + name.encode())
    (images / "vda.qcow2").write_bytes(b"old vda")
    journal.disks[0].aside = str(images / "vda.qcow2.pre-restore")
    journal.set_phase(COMMITTING)
    if step >= 1:
        os.replace(images / "vda.qcow2", images / "vda.qcow2.pre-restore")
    if step >= 2:
        os.replace(images / "vda.qcow2.partial", images / "vda.qcow2")
    if step >= 3:
        os.replace(images / "vdb.qcow2.partial", images / "vdb.qcow2")
    return journal, images


@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_restore_killed_while_committing_gets_the_old_images_back(
    tmp_path: Path, state: Path, step: int
) -> None:
    _, images = commit_state(tmp_path, state, step)
    removed = remove_restore_leftovers(config_for(state), "web1")
    assert removed
    assert sorted(p.name for p in images.iterdir()) == ["vda.qcow2"]
    assert (images / "vda.qcow2").read_bytes() == b"old vda"
    assert not journal_path(state, "web1").exists()


def test_restore_killed_after_committing_keeps_the_restored_images(
    tmp_path: Path, state: Path
) -> None:
    journal, images = commit_state(tmp_path, state, 3)
    journal.set_phase(COMMITTED)
    removed = remove_restore_leftovers(config_for(state), "web1")
    assert removed == [f"removed {images / 'vda.qcow2.pre-restore'} (replaced by the restore)"]
    assert sorted(p.name for p in images.iterdir()) == ["vda.qcow2", "vdb.qcow2"]
    assert (images / "vda.qcow2").read_bytes() == b"restored vda"


def test_socket_directories_of_other_domains_and_live_ones_are_kept(state: Path) -> None:
    run = state / "run"
    run.mkdir()
    ours = run / "vmvr-web1-0123456789abcdef"
    other = run / "vmvr-web1-2-0123456789abcdef"  # domain "web1-2"
    old_dead = run / "vmvrabcd1234"  # named before journals; nothing listens, old
    old_live = run / "vmvrlive1234"
    for path in (ours, other, old_dead, old_live):
        path.mkdir()
    import socket as sockets

    listener = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    try:
        listener.bind(str(old_live / "nbd.sock"))
        listener.listen(1)
        hour_ago = time.time() - 3600
        for path in (old_dead, old_live):
            os.utime(path, (hour_ago, hour_ago))
        removed = remove_restore_leftovers(config_for(state), "web1")
    finally:
        listener.close()
    assert sorted(removed) == sorted(
        [f"removed socket directory {ours}", f"removed socket directory {old_dead}"]
    )
    assert sorted(p.name for p in run.iterdir()) == sorted([other.name, old_live.name])


def test_unreadable_journal_refuses_the_next_restore(
    tmp_path: Path, state: Path, file_repo: Repository
) -> None:
    ref = make_image(tmp_path / "vda.raw", 1 * MiB, 2, [(0, CHUNK)])
    write_backup(file_repo, "web1", {"vda": ref})
    config = config_for(state, file_repo.url)
    (state / "run").mkdir()
    journal_path(state, "web1").write_text("{not json")
    with pytest.raises(RestoreCleanupError, match=r"cannot read the restore journal .* delete it"):
        remove_restore_leftovers(config, "web1")
    with pytest.raises(RestoreCleanupError, match=r"restore-web1\.json"):
        run_restore(config, "web1", to_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    journal_path(state, "web1").unlink()
    assert images_equal(ref, run_restore(config, "web1", to_dir=tmp_path / "out").disks[0].path)


def test_failed_commit_in_process_puts_the_old_images_back(
    tmp_path: Path, file_repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--force over two images; the rename of the second fails (fault injected): both old
    images are back, nothing else is left, the journal is gone."""
    refs = {d: make_image(tmp_path / f"{d}.raw", 1 * MiB, i, []) for i, d in enumerate("ab")}
    write_backup(file_repo, "web1", {"vda": refs["a"], "vdb": refs["b"]})
    state = short_tmp()
    try:
        config = config_for(state, file_repo.url)
        out = tmp_path / "out"
        out.mkdir()
        (out / "vda.qcow2").write_bytes(b"old vda")
        (out / "vdb.qcow2").write_bytes(b"old vdb")
        real_replace = os.replace

        def failing_replace(src: str | Path, dst: str | Path) -> None:
            if str(src).endswith("vdb.qcow2.partial"):
                raise OSError(28, "No space left on device (injected)")
            real_replace(src, dst)

        monkeypatch.setattr("vmvault.worker.restore.os.replace", failing_replace)
        with pytest.raises(RestoreError, match=r"domain 'web1' \(backup .*\) failed: .*injected"):
            run_restore(config, "web1", to_dir=out, force=True)
        monkeypatch.undo()
        assert sorted(p.name for p in out.iterdir()) == ["vda.qcow2", "vdb.qcow2"]
        assert (out / "vda.qcow2").read_bytes() == b"old vda"
        assert (out / "vdb.qcow2").read_bytes() == b"old vdb"
        assert not journal_path(state, "web1").exists()
        assert list((state / "run").glob("vmvr*")) == []
    finally:
        shutil.rmtree(state, ignore_errors=True)
