"""A shut-off domain is backed up from its images (qemu-storage-daemon), and the chain goes on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.fixtures.common import wait_until
from tests.fixtures.guest import e2fsck_clean, ext4_files, needs_recovery
from tests.guest.conftest import GuestEnv
from vmvault.worker.backup import run_backup
from vmvault.worker.offline import ShutOffBackupError, monitor_path
from vmvault.worker.qmp import open_session, socket_is_listening
from vmvault.worker.restore import run_restore


def test_powered_off_between_backups_then_restored_and_booted(guest_env: GuestEnv) -> None:
    env, guest = guest_env, guest_env.guest
    config = env.config(launch=guest.launch())
    guest.start_writer("w", pause=0.02)
    guest.wait_fsynced(3)
    full = run_backup(config, "vm")
    assert (full.kind, full.state) == ("full", "running")
    guest.wait_fsynced(len(guest.fsynced()) + 3)
    guest.stop_writer("w")
    written = guest.fsynced()
    guest.poweroff()

    shut_off = run_backup(config, "vm")
    assert (shut_off.kind, shut_off.state) == ("incremental", "shut-off"), shut_off.reason
    assert shut_off.parent == full.backup_id
    assert env.manifest_extra(shut_off.backup_id)["state"] == "shut-off"
    raw = env.restore_raw(shut_off.backup_id, "shut-off")
    assert not needs_recovery(raw) and e2fsck_clean(raw)[0]  # it was shut down cleanly
    assert {name: ext4_files(raw, "/w").get(name) for name in written} == written

    # Started again: the checkpoint the shut-off backup stored in the qcow2 is there.
    guest.start()
    guest.shell("echo again > /mnt/data/w/after-restart; sync /mnt/data/w/after-restart")
    online = run_backup(config, "vm")
    assert (online.kind, online.state, online.parent) == (
        "incremental", "running", shut_off.backup_id,
    )  # fmt: skip
    guest.poweroff()

    # (e) Restored into the domain and booted: the guest sees its files.
    guest.guest_log.unlink()
    restored = run_restore(config, "vm", online.backup_id, incoming=True, boot=True, force=True)
    try:
        guest.wait_ready()
        for name, digest in written.items():
            assert guest.shell(f"sha256sum /mnt/data/{name}").split()[0] == digest
        assert guest.shell("cat /mnt/data/w/after-restart").strip() == "again"
    finally:
        assert restored.qemu is not None
        restored.qemu.kill()


def test_an_image_in_use_is_refused_by_name(guest_env: GuestEnv) -> None:
    env, guest = guest_env, guest_env.guest
    config = env.config(launch=guest.launch())
    guest.poweroff()
    image = guest.disks["vda"].path
    # Another process holds the image (as a QEMU under another QMP socket would).
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(image)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        with pytest.raises(ShutOffBackupError, match=f"{image} is locked by a running process"):
            run_backup(config, "vm")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    assert run_backup(config, "vm").state == "shut-off"


def test_a_killed_shut_off_backup_leaves_no_daemon_holding_the_images(
    guest_env: GuestEnv,
) -> None:
    env, guest = guest_env, guest_env.guest
    launch = guest.launch()
    config = env.config(launch=launch)
    config_file = env.tmp / "vmvault.yaml"
    config_file.write_text(
        json.dumps(
            {
                "repository": {"url": env.repo_url},
                "state_dir": str(env.state_dir),
                "domains": {
                    "vm": {"host": "hv1", "qmp": str(guest.qmp_path), "launch": launch},
                },
            }
        )
    )
    guest.poweroff()
    monitor = monitor_path(env.state_dir, "vm")
    job = subprocess.Popen(
        [sys.executable, "-m", "vmvault", "--config", str(config_file), "backup", "vm"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: socket_is_listening(monitor), 60, "qemu-storage-daemon", job)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(10)
    # The daemon got SIGTERM with its parent's death and let go of the image.
    try:
        wait_until(lambda: not socket_is_listening(monitor), 30, "the daemon to exit")
    except TimeoutError:
        with open_session("qsd", monitor) as daemon:  # do not leave it behind
            daemon.execute("quit")
        raise
    subprocess.run(
        ["qemu-img", "info", str(guest.disks["vda"].path)], check=True, capture_output=True
    )  # fmt: skip  (fails while another process locks it)
    result = run_backup(config, "vm")
    assert result.state == "shut-off"
    raw = env.restore_raw(result.backup_id, "after-kill")
    assert e2fsck_clean(raw)[0]
