"""A two-host fleet end to end: real QEMU VMs, real Celery workers, real Redis.

hv1 runs web1 (and the storage queue), hv2 runs db1. The scheduler (driven with explicit
clock values) enqueues each slot; backups land on their own host's worker; a restore sent
while hv1 has scheduled backups waiting runs first; retention keeps exactly keep_last;
after a Redis restart the workers and the scheduler carry on.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import redis
from kombu.exceptions import OperationalError

from tests.fixtures.common import stop_process, wait_until
from tests.fixtures.qemu import MiB, VmFactory
from tests.fleet.conftest import Fleet
from vmvault.scheduler.enqueue import JobRequest, enqueue
from vmvault.scheduler.scheduler_loop import Scheduler
from vmvault.storage.repository import init_repository, open_repository
from vmvault.storage.verify import verify
from vmvault.worker.jobs import JobStore

SLOT = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


def test_fleet_schedule_restore_retention_and_redis_restart(
    fleet: Fleet, qemu_vm_factory: VmFactory
) -> None:
    web1 = qemu_vm_factory(disk_sizes=[4 * MiB], name="web1")
    db1 = qemu_vm_factory(disk_sizes=[4 * MiB], name="db1")
    repo_url = f"file://{fleet.tmp / 'repo'}"
    init_repository(repo_url, chunk_size=1 * MiB).close()
    config = fleet.write(
        repository={"url": repo_url},
        domains={
            "web1": {"host": "hv1", "qmp": str(web1.qmp_path)},
            "db1": {"host": "hv2", "qmp": str(db1.qmp_path)},
        },
        schedules={
            "nightly": {"cron": "0 2 * * *", "domains": ["*"], "retention": {"keep_last": 2}}
        },
        scheduler={"gc_interval_seconds": None, "lock_ttl_seconds": 5},
        # Queued restores land only under a restore root (worker.job_policy).
        worker={"restore_roots": [str(fleet.tmp)]},
    )
    client = fleet.redis.client()
    store = JobStore(client)
    hv1 = fleet.start_worker("hv1", "--storage")
    fleet.start_worker("hv2")
    sched = Scheduler(config, client, fleet.app(), name="test")

    def run_slot(day: int) -> dict[str, str]:
        slot = SLOT + timedelta(days=day)
        report = sched.tick(slot + timedelta(seconds=1))
        assert len(report.enqueued) == 2, report
        records = fleet.wait_jobs(report.enqueued)
        assert {r.state for r in records.values()} == {"succeeded"}, records
        return {r.domain: r.worker.split("@")[0] for r in records.values()}

    web1.write("vda", 0, 64 * 1024, pattern=0x11)
    # Each backup ran on its own host's worker.
    assert run_slot(0) == {"web1": "hv1", "db1": "hv2"}

    # hv1's worker stops (warm shutdown); the next slot's web1 backup waits in its queue.
    stop_process(hv1, timeout=20)
    assert hv1.returncode == 0
    slot1 = sched.tick(SLOT + timedelta(days=1, seconds=1))
    assert len(slot1.enqueued) == 2
    with open_repository(repo_url) as repo:
        first_web1 = repo.latest_manifest("web1")
    assert first_web1 is not None
    restore_id = enqueue(
        fleet.app(),
        store,
        [
            JobRequest(
                type="restore",
                kwargs={"domain": "web1", "to_dir": str(fleet.tmp / "restored")},
                domain="web1",
                host="hv1",
            )
        ],
    )[0]
    # One job at a time, so the order jobs start in is the queue's priority order (with two
    # slots, the backup and the restore of web1 would race for the domain lock).
    fleet.start_worker("hv1", "--storage", "--concurrency", "1")
    records = fleet.wait_jobs([*slot1.enqueued, restore_id], timeout=90)
    assert {r.state for r in records.values()} == {"succeeded"}, records
    web1_backup = next(r for r in records.values() if r.domain == "web1" and r.type == "backup")
    # The restore jumped ahead of the backup that was queued before it.
    assert records[restore_id].started < web1_backup.started
    assert records[restore_id].worker.startswith("hv1@")
    assert (fleet.tmp / "restored").is_dir()
    # Slot 1 done: the scheduler sends its retention; nothing to remove yet (2 backups).
    prune = sched.tick(SLOT + timedelta(days=1, minutes=5))
    assert prune.enqueued == ["prune-nightly-20260302T020000Z"]
    assert fleet.wait_jobs(prune.enqueued)[prune.enqueued[0]].state == "succeeded"

    # Redis loses everything; workers reconnect, the scheduler keeps its slots.
    fleet.redis.restart()
    wait_until(lambda: bool(fleet.redis.client().ping()), 10, "redis back")
    for _ in range(50):
        try:
            again = sched.tick(SLOT + timedelta(days=1, minutes=6))
            break
        except (redis.RedisError, OSError, OperationalError):
            time.sleep(0.2)  # the first command after the restart may hit a dead socket
    assert again.leader and again.enqueued == []  # memory: slot 1 is not sent again
    run_slot(2)
    retention = sched.tick(SLOT + timedelta(days=2, minutes=5))
    assert retention.enqueued == ["prune-nightly-20260303T020000Z"]
    pruned = fleet.wait_jobs(retention.enqueued)[retention.enqueued[0]]
    assert pruned.state == "succeeded", pruned
    with open_repository(repo_url) as repo:
        for domain in ("web1", "db1"):
            kept = repo.list_manifests(domain)
            # keep_last 2 after three scheduled backups: the two newest remain.
            assert len(kept) == 2, [m.backup_id for m in kept]
            assert all(m.created > first_web1.created for m in kept)
        assert verify(repo).ok
    # A job that reaches the wrong host's worker is refused, not run against the wrong QEMU.
    bad = fleet.app().send_task("vmvault.backup", kwargs={"domain": "web1"}, queue="host.hv2")
    refused = fleet.wait_jobs([bad.id])[bad.id]
    assert refused.state == "failed"
    assert "reached the worker of hv2" in refused.error
