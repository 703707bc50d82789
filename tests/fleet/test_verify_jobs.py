"""Scheduled verification end to end: real QEMU backups, a real Celery storage worker, real
Redis, the scheduler driven with explicit clock values.

A chain of backups is verified by a ``verify_jobs`` entry; ``outdated_after`` skips what
was verified recently; a chunk corrupted between two runs makes the second run record
FAILED (disk and offset), fail the job, show in ``vmvault list`` and in the metrics, and
the next backup of the domain is full.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.fixtures.common import VENV_BIN, stop_process
from tests.fixtures.qemu import MiB, VmFactory
from tests.fleet.conftest import Fleet
from tests.restore.conftest import make_image, write_backup
from vmvault.scheduler import blank_vm
from vmvault.scheduler.scheduler_loop import Scheduler
from vmvault.storage.format import chunk_key
from vmvault.storage.repository import init_repository, open_repository
from vmvault.storage.verification import load_records
from vmvault.worker.backup import run_backup
from vmvault.worker.metrics import FleetCollector

SLOT = datetime(2026, 3, 1, 3, 0, tzinfo=UTC)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


def test_scheduled_verify_outdated_after_corruption_metrics_and_full_backup(
    fleet: Fleet, qemu_vm_factory: VmFactory
) -> None:
    web1 = qemu_vm_factory(disk_sizes=[4 * MiB], name="web1")
    repo_url = f"file://{fleet.tmp / 'repo'}"
    init_repository(repo_url, chunk_size=1 * MiB).close()
    job = {"cron": "0 3 * * *", "domains": ["web*"], "read_data": True, "outdated_after": 1}
    config = fleet.write(
        repository={"url": repo_url},
        domains={"web1": {"host": "hv1", "qmp": str(web1.qmp_path)}},
        verify_jobs={"nightly": job},
        scheduler={"gc_interval_seconds": None},
    )
    client = fleet.redis.client()
    worker = fleet.start_worker("hv1", "--storage")
    sched = Scheduler(config, client, fleet.app(), name="test")

    def run_slot(day: int) -> tuple[str, str]:
        report = sched.tick(SLOT + timedelta(days=day, seconds=1))
        stamp = (SLOT + timedelta(days=day)).strftime("%Y%m%dT%H%M%SZ")
        assert report.enqueued == [f"verify-nightly-{stamp}"], report
        record = fleet.wait_jobs(report.enqueued, timeout=90)[report.enqueued[0]]
        assert record.queue == "storage"
        return record.state, record.error or record.result

    web1.write("vda", 0, 64 * 1024, pattern=0x11)
    web1.write("vda", 1 * MiB, 256 * 1024, pattern=0x22)
    b1 = run_backup(config, "web1")
    web1.write("vda", 0, 64 * 1024, pattern=0x33)
    b2 = run_backup(config, "web1")
    assert (b1.kind, b2.kind) == ("full", "incremental")

    state, result = run_slot(0)
    assert state == "succeeded", result
    assert (json.loads(result)["due"], json.loads(result)["skipped"]) == (2, 0)
    assert sched.tick(SLOT + timedelta(days=0, minutes=5)).enqueued == []  # once per slot

    # outdated_after: 1 day: the two backups just verified are skipped, the new one is not.
    web1.write("vda", 0, 64 * 1024, pattern=0x44)
    b3 = run_backup(config, "web1")
    with open_repository(repo_url) as repo:
        before = {bid: r.latest.time for (_, bid), r in load_records(repo).items()}
    state, result = run_slot(1)
    assert state == "succeeded", result
    doc = json.loads(result)
    assert (doc["due"], doc["skipped"], doc["backups"]) == (1, 2, 1)
    with open_repository(repo_url) as repo:
        after = {bid: r.latest.time for (_, bid), r in load_records(repo).items()}
    assert after[b1.backup_id] == before[b1.backup_id]
    assert after[b2.backup_id] == before[b2.backup_id]
    assert b3.backup_id in after and b3.backup_id not in before

    # The chunk of region 1 (kept from parent by every incremental) is damaged; the
    # worker is restarted on a config that re-verifies everything each time.
    with open_repository(repo_url) as repo:
        m1 = repo.load_manifest("web1", b1.backup_id)
        name = repo.chunk_names(m1, "vda")[1]
        assert name is not None
        key = chunk_key(name)
        raw = repo.backend.get(key)
        repo.backend.put(key, _flip(raw, len(raw) // 2))
    stop_process(worker, timeout=20)
    config = fleet.write(verify_jobs={"nightly": {**job, "outdated_after": None}})
    fleet.start_worker("hv1", "--storage")
    state, error = run_slot(2)
    assert state == "failed"
    assert "VerificationFailedError" in error and f"disk vda offset {1 * MiB}" in error
    assert b1.backup_id in error

    with open_repository(repo_url) as repo:
        records = load_records(repo)
    failed = {bid for (_, bid), r in records.items() if not r.latest.ok}
    assert failed == {b1.backup_id, b2.backup_id, b3.backup_id}
    summary = records[("web1", b1.backup_id)].summary()
    assert summary.startswith("FAILED ") and f"at vda offset {1 * MiB}" in summary
    # The last good verification is kept beside the failure.
    assert records[("web1", b1.backup_id)].last_ok is not None

    listing = subprocess.run(
        [str(VENV_BIN / "vmvault"), "list", "--json", "--config", str(fleet.config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    status = {b["backup_id"]: b["verification"]["status"] for b in json.loads(listing.stdout)}
    assert status == dict.fromkeys([b1.backup_id, b2.backup_id, b3.backup_id], "failed")

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in FleetCollector(client, []).collect()
        for s in family.samples
    }
    assert samples[("vmvault_backups_verification_failed", (("domain", "web1"),))] == 3
    assert samples[("vmvault_backups_unverified", (("domain", "web1"),))] == 0

    # Nothing was deleted, and the next backup does not build on the damaged chain.
    web1.write("vda", 0, 64 * 1024, pattern=0x55)
    b4 = run_backup(config, "web1")
    assert b4.kind == "full"
    assert "failed its verification" in b4.reason and b3.backup_id in b4.reason
    with open_repository(repo_url) as repo:
        assert len(repo.list_manifests("web1")) == 4


def test_scheduled_restore_test_runs_on_the_domains_host_and_leaves_nothing(
    fleet: Fleet,
) -> None:
    repo_url = f"file://{fleet.tmp / 'repo'}"
    with init_repository(repo_url, chunk_size=256 * 1024) as repo:
        image = make_image(fleet.tmp / "vda.raw", 2 * MiB, 3, [])
        backup = write_backup(repo, "web1", {"vda": image})
    state = Path(fleet.data["state_dir"])
    job = {
        "cron": "0 3 * * *",
        "domains": ["*"],
        "restore_test": {"sample": 1, "timeout_seconds": 30},
    }
    config = fleet.write(
        repository={"url": repo_url},
        domains={
            "web1": {
                "host": "hv1",
                "qmp": str(state / "web1.qmp"),
                "launch": {"argv": blank_vm.launch_argv(["vda"])},
            },
            "db1": {"host": "hv2", "qmp": str(state / "db1.qmp")},  # no launch: not sampled
        },
        verify_jobs={"nightly": job},
        scheduler={"gc_interval_seconds": None},
    )
    fleet.start_worker("hv1", "--storage")
    sched = Scheduler(config, fleet.redis.client(), fleet.app(), name="test")
    report = sched.tick(SLOT + timedelta(seconds=1))
    assert sorted(report.enqueued) == [
        "restore-test-nightly-20260301T030000Z-web1",
        "verify-nightly-20260301T030000Z",
    ]
    records = fleet.wait_jobs(report.enqueued, timeout=120)
    assert {r.state for r in records.values()} == {"succeeded"}, records
    test = records["restore-test-nightly-20260301T030000Z-web1"]
    assert (test.queue, test.worker.split("@")[0]) == ("host.hv1", "hv1")
    doc = json.loads(test.result)
    assert (doc["ok"], doc["status"], doc["backup_id"]) == (True, "prelaunch", backup.backup_id)
    assert list((state / "restore-tests").iterdir()) == []
    with open_repository(repo_url) as repo:
        record = load_records(repo)[("web1", backup.backup_id)]
    assert record.latest.ok and record.last_ok is not None
