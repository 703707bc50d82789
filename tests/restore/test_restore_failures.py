"""Restore failures that must leave the user's existing files alone."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from tests.restore.conftest import (
    CHUNK,
    ConfigFactory,
    MiB,
    images_equal,
    make_image,
    short_tmp,
    write_backup,
)
from vmvault.storage.repository import Repository
from vmvault.worker.launch import LaunchError
from vmvault.worker.restore import RestoreError, run_restore


def test_incoming_force_into_running_domain_keeps_existing_images(
    tmp_path: Path, file_repo: Repository, fleet_config: ConfigFactory
) -> None:
    """A domain whose QMP socket answers is refused before --force replaces any image."""
    ref = make_image(tmp_path / "vda.raw", 1 * MiB, 4, [(0, CHUNK)])
    write_backup(file_repo, "web1", {"vda": ref})
    sockdir = short_tmp()
    qmp = sockdir / "q"
    argv = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-nodefaults",
            "-display", "none", "-qmp", "unix:{qmp},server=on,wait=off",
            "-drive", "file={disk:vda},format=qcow2,if=virtio"]  # fmt: skip
    config = fleet_config(
        file_repo.url,
        domains={"web1": {"host": "h", "qmp": str(qmp), "launch": {"argv": argv}}},
    )
    images = tmp_path / "images"
    images.mkdir()
    (images / "vda.qcow2").write_bytes(b"precious")
    # Something (the domain's own QEMU) listens on the QMP socket.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(qmp))
        listener.listen(1)
        with pytest.raises(LaunchError, match="already listens on its QMP socket"):
            run_restore(config, "web1", incoming=True, to_dir=images, force=True)
    finally:
        listener.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert (images / "vda.qcow2").read_bytes() == b"precious"


class _Interrupted(Exception):
    pass


def test_start_qemu_interrupted_while_waiting_leaves_no_process(tmp_path: Path) -> None:
    """Ctrl-C (any exception) while waiting for the QMP socket must not leak the process."""
    import os
    import signal
    import time

    from vmvault.worker.launch import start_qemu

    pidfile = tmp_path / "pid"
    # Stands in for a QEMU that is slow to open its QMP socket.
    argv = ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"]

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(_Interrupted):
            start_qemu("web1", argv, tmp_path / "q", tmp_path / "log", timeout=20)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pid = int(pidfile.read_text())
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists(), "the started process was left running"
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


def test_failed_incoming_force_restore_puts_the_old_images_back(
    tmp_path: Path, file_repo: Repository, fleet_config: ConfigFactory
) -> None:
    """--force replaces the domain's images only when the restore succeeds: a restore that
    fails (here QEMU refuses the launch argv) must not leave the domain without disks."""
    ref = make_image(tmp_path / "vda.raw", 1 * MiB, 4, [(0, CHUNK)])
    write_backup(file_repo, "web1", {"vda": ref})
    sockdir = short_tmp()
    argv = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-nodefaults",
            "-display", "none", "-qmp", "unix:{qmp},server=on,wait=off",
            "-drive", "file={disk:vda},format=qcow2,if=virtio,bogus-option=1"]  # fmt: skip
    config = fleet_config(
        file_repo.url,
        domains={"web1": {"host": "h", "qmp": str(sockdir / "q"), "launch": {"argv": argv}}},
    )
    images = tmp_path / "images"
    images.mkdir()
    (images / "vda.qcow2").write_bytes(b"precious")
    good_argv = [*argv[:-1], argv[-1].removesuffix(",bogus-option=1")]
    good = fleet_config(
        file_repo.url,
        domains={"web1": {"host": "h", "qmp": str(sockdir / "q"), "launch": {"argv": good_argv}}},
    )
    result = None
    try:
        with pytest.raises(LaunchError, match="bogus-option"):
            run_restore(config, "web1", incoming=True, to_dir=images, force=True)
        assert sorted(p.name for p in images.iterdir()) == ["vda.qcow2"]
        assert (images / "vda.qcow2").read_bytes() == b"precious"
        # A restore that succeeds replaces the image and leaves no old copy behind.
        result = run_restore(good, "web1", incoming=True, to_dir=images, force=True)
        assert result.disks[0].verified
        assert sorted(p.name for p in images.iterdir()) == ["vda.qcow2"]
        assert images_equal(ref, images / "vda.qcow2")
    finally:
        if result is not None and result.qemu is not None:
            result.qemu.kill()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_restoring_a_damaged_backup_names_the_damage(
    tmp_path: Path, file_repo: Repository, fleet_config: ConfigFactory
) -> None:
    """A damaged manifest is skipped by the listing; asked for by id, it is named as such."""
    ref = make_image(tmp_path / "vda.raw", 1 * MiB, 7, [])
    good = write_backup(file_repo, "web1", {"vda": ref})
    bad = write_backup(file_repo, "web1", {"vda": ref}, parent=good)
    manifest_file = Path(file_repo.url.removeprefix("file://")) / bad.key
    manifest_file.write_text("{ truncated")
    config = fleet_config(file_repo.url)
    with pytest.raises(RestoreError, match=rf"backup {bad.backup_id} cannot be restored.*damaged"):
        run_restore(config, "web1", backup_id=bad.backup_id, to_dir=tmp_path / "out")
    # The intact backup still restores, and is the newest readable one.
    result = run_restore(config, "web1", to_dir=tmp_path / "out")
    assert result.backup_id == good.backup_id
