"""Backups of a Linux guest writing and fsyncing files: crash- and application-consistent.

Every restored file system must pass ``e2fsck -fn`` and hold every file whose fsync had
returned before the backup started, with its checksum. With the guest agent the file
system is frozen for the checkpoint: it is clean without a journal replay.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.fixtures.common import wait_until
from tests.fixtures.guest import e2fsck_clean, ext4_files, needs_recovery, replay_journal
from tests.fixtures.qemu import MiB
from tests.guest.conftest import GuestEnv
from vmvault.storage.repository import open_repository
from vmvault.worker.backup import BackupError, run_backup
from vmvault.worker.cleanup import frozen_marker, paused_marker, write_marker
from vmvault.worker.freeze import guest_frozen
from vmvault.worker.guest_agent import GuestAgent
from vmvault.worker.reaper import reap_host
from vmvault.worker.signals import Terminated, signals_as_exceptions


def _check_restored(env: GuestEnv, backup_id: str, fsynced: dict[str, str], app: bool) -> None:
    raw = env.restore_raw(backup_id, backup_id)
    if app:
        # Frozen: ext4 flushed its journal and cleared needs_recovery before the snapshot.
        assert not needs_recovery(raw), backup_id
    else:
        replay_journal(raw)  # what mounting it would do
    clean, report = e2fsck_clean(raw)
    assert clean, f"{backup_id}: {report}"
    files = ext4_files(raw, "/w")
    missing = {name for name in fsynced if name not in files}
    assert not missing, f"{backup_id}: fsynced before the backup but not in it: {missing}"
    wrong = {name for name, digest in fsynced.items() if files[name] != digest}
    assert not wrong, f"{backup_id}: wrong content: {wrong}"
    raw.unlink()


def test_writing_guest_full_and_incrementals_crash_and_application(guest_env: GuestEnv) -> None:
    env, guest = guest_env, guest_env.guest
    crash, application = env.config(agent=False), env.config()
    guest.start_writer("w", pause=0.02)
    guest.wait_fsynced(3)
    for number, (config, app) in enumerate(
        [(crash, False), (application, True), (crash, False), (application, True)]
    ):
        before = guest.fsynced()
        result = run_backup(config, "vm")
        assert result.kind == ("full" if number == 0 else "incremental"), result.reason
        extra = env.manifest_extra(result.backup_id)
        if app:
            assert result.consistency == extra["consistency"] == "application"
            assert result.frozen_ms is not None and result.frozen_ms > 0
            assert extra["frozen_ms"] == round(result.frozen_ms, 1)
            assert result.to_json()["frozen_ms"] == extra["frozen_ms"]
            print(f"frozen window: {result.frozen_ms:.0f} ms, paused {result.paused_ms:.1f} ms")
        else:
            assert result.consistency == extra["consistency"] == "crash"
            assert "no guest agent configured" in extra["consistency_reason"]
            assert result.frozen_ms is None and extra["frozen_ms"] is None
        _check_restored(env, result.backup_id, before, app)
        guest.wait_fsynced(len(guest.fsynced()) + 2)  # the writer goes on
    guest.stop_writer("w")
    assert not frozen_marker(env.state_dir, "vm").exists()


def test_agent_hung_or_slow_freeze_ends_as_configured_and_thawed(guest_env: GuestEnv) -> None:
    env, guest = guest_env, guest_env.guest
    guest.start_writer("w", pause=0.02)
    guest.wait_fsynced(3)
    # The freeze's answer does not come within the timeout (it flushes dirty data first):
    # the backup goes on crash-consistent, and the guest is thawed all the same.
    slow = env.config(freeze_timeout_seconds=0.001)
    result = run_backup(slow, "vm")
    assert result.consistency == "crash"
    assert "freezing failed" in result.consistency_reason
    with GuestAgent("vm", guest.qga_path) as agent:
        assert agent.fsfreeze_status() == "thawed"
    with pytest.raises(BackupError, match="require_freeze is set"):
        run_backup(env.config(freeze_timeout_seconds=0.001, require_freeze=True), "vm")
    with GuestAgent("vm", guest.qga_path) as agent:
        assert agent.fsfreeze_status() == "thawed"
    assert not frozen_marker(env.state_dir, "vm").exists()

    # A paused guest's agent cannot answer: it is not asked.
    guest.ctl.execute("stop")
    result = run_backup(env.config(), "vm")
    assert result.consistency == "crash" and "not running (paused)" in result.consistency_reason
    guest.ctl.execute("cont")

    # A hung agent (stopped in the guest): crash-consistent with the reason, or refused.
    guest.shell("kill -STOP $(cat /run/qemu-ga.pid)")
    result = run_backup(env.config(), "vm")
    assert (result.consistency, result.kind) == ("crash", "incremental")
    assert "did not answer" in result.consistency_reason
    with pytest.raises(BackupError, match="require_freeze is set"):
        run_backup(env.config(require_freeze=True), "vm")
    # An agent that was killed: the same.
    guest.shell("kill -KILL $(cat /run/qemu-ga.pid)")
    result = run_backup(env.config(), "vm")
    assert result.consistency == "crash" and "did not answer" in result.consistency_reason
    n = len(guest.fsynced())
    guest.wait_fsynced(n + 2)  # never left frozen: the writer goes on
    guest.stop_writer("w")


def test_thawed_after_an_exception_or_sigterm_in_the_frozen_window(guest_env: GuestEnv) -> None:
    env, guest = guest_env, guest_env.guest
    config = env.config()
    marker = frozen_marker(env.state_dir, "vm")

    def frozen_now() -> bool:
        # The agent serves one client at a time: ask the guest's own view instead. A write
        # to a frozen file system waits until the thaw.
        guest.shell("rm -f /run/wrote; (touch /mnt/data/probe; touch /run/wrote) >/dev/null 2>&1 &")
        return guest.shell("sleep 0.5; test -e /run/wrote || echo frozen").strip() == "frozen"

    with pytest.raises(RuntimeError, match="boom"), guest_frozen(config, "vm") as outcome:
        assert outcome.consistency == "application" and marker.exists()
        assert frozen_now()
        raise RuntimeError("boom")
    assert outcome.frozen_ms is not None and not marker.exists()
    assert not frozen_now()

    with (
        pytest.raises(Terminated),
        signals_as_exceptions(),
        guest_frozen(config, "vm") as outcome,
    ):
        os.kill(os.getpid(), signal.SIGTERM)  # waits for the thaw
        assert frozen_now()
    assert not marker.exists() and not frozen_now()


def test_a_guest_a_dead_job_left_frozen_is_thawed(guest_env: GuestEnv) -> None:
    """SIGKILL in the frozen window leaves the marker and a frozen guest: the reaper and the
    next backup thaw it."""
    env, guest = guest_env, guest_env.guest
    config = env.config()
    marker = frozen_marker(env.state_dir, "vm")
    for thaw in ("reaper", "next backup"):
        with GuestAgent("vm", guest.qga_path) as agent:
            write_marker(marker)  # what the killed job wrote before its freeze
            agent.fsfreeze_freeze()
        if thaw == "reaper":
            # Killed in the pause inside the frozen window: the agent of a paused guest
            # cannot answer, so the guest is resumed before the thaw.
            write_marker(paused_marker(env.state_dir, "vm"))
            guest.ctl.execute("stop")
            assert reap_host(config, "hv1") == 1
            assert guest.ctl.query_status() == "running"
        else:
            result = run_backup(config, "vm")
            assert result.consistency == "application"
        assert not marker.exists()
        with GuestAgent("vm", guest.qga_path) as agent:
            assert agent.fsfreeze_status() == "thawed"


# The guest is not trusted: an "agent" in it that answers the handshake, then garbage.
_EVIL_AGENT = (
    "kill -KILL $(cat /run/qemu-ga.pid); "
    "for p in /sys/class/virtio-ports/*; do "
    '[ "$(cat $p/name)" = org.qemu.guest_agent.0 ] && P=/dev/${p##*/}; done; '
    "(while true; do exec 3<>$P; while read -r l <&3; do "
    """id=$(echo "$l" | sed -n 's/.*"id": *\\([0-9]*\\).*/\\1/p'); """
    """if [ -n "$id" ]; then printf '\\377{"return": %s}\\n' "$id" >&3; """
    """else printf '{"return": {"pwned": [1e999]}}\\n' >&3; fi; done; """
    "exec 3>&-; sleep 0.2; done) >/dev/null 2>&1 &"
)


def test_an_agent_answering_garbage_gives_a_crash_consistent_backup(guest_env: GuestEnv) -> None:
    env, guest = guest_env, guest_env.guest
    guest.shell(_EVIL_AGENT)
    result = run_backup(env.config(), "vm")
    assert result.consistency == "crash"
    assert "unexpected answer to guest-fsfreeze-freeze" in result.consistency_reason
    with pytest.raises(BackupError, match="require_freeze is set"):
        run_backup(env.config(require_freeze=True), "vm")
    guest.shell("touch /mnt/data/still-writable")


def _cli_backup_in_a_slow_freeze(env: GuestEnv) -> subprocess.Popen[bytes]:
    """``vmvault backup`` in a child process, returned once its freeze is in flight.

    Dirty data the freeze must write out first, through a disk throttled to 1 MiB/s:
    the freeze takes seconds.
    """
    guest = env.guest
    config_file = env.tmp / "vmvault.yaml"
    dom = {"host": "hv1", "qmp": str(guest.qmp_path), "guest_agent": str(guest.qga_path)}
    config_file.write_text(
        json.dumps(
            {
                "repository": {"url": env.repo_url},
                "state_dir": str(env.state_dir),
                "domains": {"vm": dom},
            }
        )
    )
    guest.shell("dd if=/dev/urandom of=/mnt/data/big bs=1M count=8 2>/dev/null")
    guest.ctl.execute("block_set_io_throttle", _throttle(bps_wr=1 * MiB))
    job = subprocess.Popen(
        [sys.executable, "-m", "vmvault", "--config", str(config_file), "backup", "vm"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(frozen_marker(env.state_dir, "vm").exists, 120, "the freeze to start", job)
    except BaseException:
        job.kill()
        job.wait(10)
        raise
    time.sleep(0.2)  # the freeze command is on its way
    return job


def test_worker_sigkilled_during_the_freeze_leaves_a_guest_the_reaper_thaws(
    guest_env: GuestEnv,
) -> None:
    """A real SIGKILL while the freeze is in flight: nobody thaws but the reaper."""
    env, guest = guest_env, guest_env.guest
    marker = frozen_marker(env.state_dir, "vm")
    job = _cli_backup_in_a_slow_freeze(env)
    job.send_signal(signal.SIGKILL)
    job.wait(10)
    with GuestAgent("vm", guest.qga_path, timeout=60) as agent:
        assert agent.fsfreeze_status() == "frozen"  # answered once the freeze completed
    assert marker.exists()
    guest.ctl.execute("block_set_io_throttle", _throttle())
    assert reap_host(env.config(), "hv1") == 1
    assert not marker.exists()
    with GuestAgent("vm", guest.qga_path) as agent:
        assert agent.fsfreeze_status() == "thawed"
    guest.shell("touch /mnt/data/writable-again")


def test_worker_sigtermed_during_the_freeze_thaws_then_stops(guest_env: GuestEnv) -> None:
    """SIGTERM while the freeze is in flight waits for the thaw, then tears down: exit 143."""
    env, guest = guest_env, guest_env.guest
    job = _cli_backup_in_a_slow_freeze(env)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 143, stderr
    assert not frozen_marker(env.state_dir, "vm").exists()
    guest.ctl.execute("block_set_io_throttle", _throttle())
    with GuestAgent("vm", guest.qga_path) as agent:
        assert agent.fsfreeze_status() == "thawed"
    nodes = [n.node_name for n in guest.ctl.named_block_nodes()]
    assert not [n for n in nodes if n.startswith("vmv-")], nodes
    assert guest.ctl.query_status() == "running"
    with open_repository(env.repo_url) as repo:
        assert repo.list_manifests("vm") == []  # stopped: nothing committed


def _throttle(bps_wr: int = 0) -> dict[str, object]:
    """``block_set_io_throttle`` arguments for the guest's disk (0: no limit)."""
    limits: dict[str, object] = {k: 0 for k in ("bps", "bps_rd", "iops", "iops_rd", "iops_wr")}
    return {"id": "/machine/peripheral/vda/virtio-backend", **limits, "bps_wr": bps_wr}
