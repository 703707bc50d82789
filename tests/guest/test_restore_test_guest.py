"""A restore test that boots the real Linux test guest's latest backup, isolated, and
waits for its guest agent; the live guest is left alone and nothing stays behind."""

from __future__ import annotations

from pathlib import Path

from tests.guest.conftest import GuestEnv
from vmvault.storage.verification import read_record
from vmvault.worker.backup import run_backup
from vmvault.worker.guest_agent import GuestAgent
from vmvault.worker.restore_test import run_restore_test, scratch_root


def _qemus_under(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(path).encode() in cmdline and b"qemu-system" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_agent_restore_test_boots_the_backup_and_leaves_nothing(guest_env: GuestEnv) -> None:
    guest = guest_env.guest
    config = guest_env.config(launch=guest.launch())
    backup = run_backup(config, "vm")
    console = guest.console.read_bytes()

    out = run_restore_test(config, "vm", timeout=120, boot="agent")
    assert out["ok"] is True, out
    assert (out["status"], out["backup_id"]) == ("agent answered", backup.backup_id)
    assert list(scratch_root(guest_env.state_dir).iterdir()) == []
    assert _qemus_under(guest_env.state_dir) == []
    with config.repository.open() as repo:
        record = read_record(repo, "vm", backup.backup_id)
    assert record is not None and record.latest.ok and record.latest.kind == "restore-test"

    # The live guest kept its agent socket and its console log.
    with GuestAgent("vm", guest.qga_path) as agent:
        agent.connect()
        agent.ping()
    assert guest.console.read_bytes().startswith(console)
    assert guest.shell("echo alive").strip() == "alive"
