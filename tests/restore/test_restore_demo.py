"""The demo's restore step: newest backup into a paused incoming-mode QEMU, bit-exact."""

from __future__ import annotations

import os

import pytest

from vmvault.scheduler import demo
from vmvault.scheduler.restore_demo import restore_newest_step


def test_demo_restore_step() -> None:
    # scheduler/demo.py runs restore_newest_step after its own steps.
    assert demo.STEPS[-1] is restore_newest_step
    said: list[str] = []
    report = demo.run_demo(say=said.append)
    restore = report["restore"]
    assert restore["bit_exact"] is True
    assert restore["state"] == "paused-incoming"
    assert restore["backup_id"] == report["backups"][-1]["backup_id"]
    assert {d["name"] for d in restore["disks"]} == set(demo.DISKS)
    assert all(d["verified"] for d in restore["disks"])
    assert any("bit for bit" in line and "restored disks" in line for line in said)
    # The clone QEMU was stopped again.
    with pytest.raises(ProcessLookupError):
        os.kill(restore["qemu_pid"], 0)
