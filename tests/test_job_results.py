"""Job results cross the queue as JSON and come back as the same typed objects.

The CLI prints a queued job's result with the same code as an in-process one, so
``from_json(to_json())`` must give back an object whose JSON is unchanged.
"""

from __future__ import annotations

from pathlib import Path

from vmvault.storage.gc import GcReport
from vmvault.storage.verify import Problem, VerifyReport
from vmvault.worker.backup import BackupResult, DiskResult
from vmvault.worker.restore import RestoredDisk, RestoreResult


def test_backup_result_round_trip() -> None:
    result = BackupResult(
        backup_id="20260102T030405.000006Z-0123abcd", domain="web1", kind="incremental",
        reason="chain intact", parent="20260101T030405.000006Z-0123abcd", checkpoint="cp-2",
        disks=[DiskResult("vda", 1 << 30, dirty_bytes=65536, bytes_read=65536)],
        duration_s=1.23456, paused_ms=4.56, fleece_bytes=196608,
    )  # fmt: skip
    back = BackupResult.from_json(result.to_json())
    assert back.to_json() == result.to_json()
    assert back.disks[0].dirty_bytes == 65536 and back.parent == result.parent


def test_restore_results_round_trip_in_both_modes() -> None:
    disk = RestoredDisk("vda", Path("/srv/r/vda.qcow2"), 1 << 30, 4096, True, 8192, 0.5)
    files = RestoreResult("b1", "web1", "files", [disk], 2.0, checkpoint="cp-1")
    incoming = RestoreResult(
        "b1", "web1", "incoming", [disk], 2.0, checkpoint=None, qmp=Path("/run/web1.qmp"),
        qemu_pid=4242, booted=True, qemu_log=Path("/var/log/web1.log"),
    )  # fmt: skip
    for result in (files, incoming):
        back = RestoreResult.from_json(result.to_json())
        assert back.to_json() == result.to_json()
        assert back.disks[0].path == Path("/srv/r/vda.qcow2")
    assert RestoreResult.from_json(incoming.to_json()).booted is True


def test_storage_reports_round_trip() -> None:
    report = VerifyReport(backups=2, disks=3, problems=[Problem("web1", "b1", "vda", 0, "bad")])
    back = VerifyReport.from_json(report.to_json())
    assert back.to_json() == report.to_json() and str(back.problems[0]) == str(report.problems[0])
    gc = GcReport(backups=1, chunks_deleted=7, dry_run=True)
    assert GcReport.from_json(gc.to_json()) == gc
