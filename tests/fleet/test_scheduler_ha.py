"""Scheduler replicas on a real Redis: one leader, each slot's job sent once, Redis restarts."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from datetime import UTC, datetime

import redis
from kombu.exceptions import OperationalError

from tests.fixtures.common import wait_until
from tests.fleet.conftest import Fleet
from vmvault.scheduler.scheduler_loop import Scheduler

FAST = {"fast": {"cron": "* * * * * */3", "domains": ["*"]}}
SCHED = {"tick_seconds": 0.2, "lease_seconds": 1.5, "gc_interval_seconds": None}
HOSTS = {"hv1": {"max_concurrent": 50}, "hv2": {"max_concurrent": 50}}


def queued_job_ids(client: redis.Redis) -> list[str]:
    """Task ids of every message waiting in any host/storage queue (all priority lists)."""
    ids = []
    for key in client.scan_iter("host.*"):
        for raw in client.lrange(key, 0, -1):
            ids.append(json.loads(raw)["headers"]["id"])
    return ids


def test_two_scheduler_processes_send_each_slot_once(fleet: Fleet) -> None:
    fleet.write(schedules=FAST, scheduler=SCHED, hosts=HOSTS)
    a = fleet.vmvault("scheduler", "-v", log="sched-a.log")
    b = fleet.vmvault("scheduler", "-v", log="sched-b.log")
    client = fleet.redis.client()
    wait_until(lambda: len(queued_job_ids(client)) >= 6, 20, "two slots enqueued")
    leader, follower = (a, b) if "now leader" in fleet.log("sched-a.log") else (b, a)
    os.killpg(leader.pid, signal.SIGKILL)  # no resign: the lease must expire
    leader.wait(5)
    before = len(queued_job_ids(client))
    wait_until(lambda: len(queued_job_ids(client)) >= before + 6, 20, "slots after failover")
    assert follower.poll() is None
    ids = queued_job_ids(client)
    dupes = [job for job, n in Counter(ids).items() if n > 1]
    assert dupes == []
    per_slot = Counter(job.rsplit("-", 1)[0] for job in ids)
    # Every slot that was sent is complete: all three domains, once each.
    assert set(per_slot.values()) == {3}, per_slot
    assert len(per_slot) >= 4
    # Backups went to their domain's host queue only.
    assert all(k.startswith(b"host.hv") for k in client.scan_iter("host.*"))
    for raw in client.lrange("host.hv2:5", 0, -1):
        assert json.loads(raw)["headers"]["id"].endswith("-db1")


def test_redis_restart_does_not_resend_or_lose_the_schedule(fleet: Fleet) -> None:
    """The leader keeps its slot state in memory: after Redis lost everything it neither
    re-sends the current slot nor stops scheduling the next ones."""
    config = fleet.write(
        schedules={"daily": {"cron": "0 2 * * *", "domains": ["*"]}},
        scheduler=SCHED,
        hosts=HOSTS,
    )
    sched = Scheduler(config, fleet.redis.client(), fleet.app(), name="s1")
    t0 = datetime(2026, 3, 1, 2, 30, tzinfo=UTC)
    first = sched.tick(t0)
    assert sorted(first.enqueued) == sorted(
        f"backup-daily-20260301T020000Z-{d}" for d in ("db1", "web1", "web2")
    )
    assert sched.tick(t0).enqueued == []
    fleet.redis.restart()
    wait_until(lambda: fleet.redis.client().ping(), 5, "redis back")
    # The first tick after the restart may hit a dead pooled connection; the loop retries.
    deadline = time.monotonic() + 10
    while True:
        try:
            again = sched.tick(t0.replace(hour=3))
            break
        except (redis.RedisError, OSError, OperationalError):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert again.leader
    assert again.enqueued == []
    assert fleet.redis.client().get("vmvault:sched:daily:slot") is not None
    nxt = sched.tick(datetime(2026, 3, 2, 2, 0, 1, tzinfo=UTC))
    assert len(nxt.enqueued) == 3
    assert all("20260302T020000Z" in job for job in nxt.enqueued)


def test_downtime_gives_one_catch_up_and_max_concurrent(fleet: Fleet) -> None:
    config = fleet.write(
        schedules={"hourly": {"cron": "0 * * * *", "domains": ["*"]}},
        scheduler=SCHED,
        hosts={"hv1": {"max_concurrent": 1}},
    )
    sched = Scheduler(config, fleet.redis.client(), fleet.app(), name="s1")
    first = sched.tick(datetime(2026, 3, 1, 2, 0, 5, tzinfo=UTC))
    # hv1 runs one backup at a time: web1 now, web2 once web1 has ended.
    assert sorted(first.enqueued) == [
        "backup-hourly-20260301T020000Z-db1",
        "backup-hourly-20260301T020000Z-web1",
    ]
    client = fleet.redis.client()
    client.zrem("vmvault:inflight:hv1", "backup-hourly-20260301T020000Z-web1")  # web1 ended
    client.zrem("vmvault:inflight:hv2", "backup-hourly-20260301T020000Z-db1")
    assert sched.tick(datetime(2026, 3, 1, 2, 1, tzinfo=UTC)).enqueued == [
        "backup-hourly-20260301T020000Z-web2"
    ]
    client.delete("vmvault:inflight:hv1", "vmvault:inflight:hv2")
    # Ten hours down: one catch-up slot (the newest), not ten.
    late = sched.tick(datetime(2026, 3, 1, 12, 30, tzinfo=UTC))
    assert sorted(late.enqueued) == [
        "backup-hourly-20260301T120000Z-db1",
        "backup-hourly-20260301T120000Z-web1",
    ]
    # A second replica starting now sees the claims and sends nothing twice.
    fleet_b = Scheduler(config, fleet.redis.client(), fleet.app(), name="s2")
    sched.leadership.resign()
    assert fleet_b.tick(datetime(2026, 3, 1, 12, 31, tzinfo=UTC)).enqueued == []


def test_redis_restart_under_two_scheduler_processes(fleet: Fleet) -> None:
    """Whichever replica leads after Redis lost everything, nothing already sent is sent
    again (the standby mirrors the claims), and the schedule goes on."""
    fleet.write(
        schedules={"fast": {"cron": "* * * * * */4", "domains": ["*"]}},
        scheduler={**SCHED, "lease_seconds": 1.0},
        hosts=HOSTS,
    )
    fleet.vmvault("scheduler", "-v", log="sched-a.log")
    fleet.vmvault("scheduler", "-v", log="sched-b.log")
    client = fleet.redis.client()
    wait_until(lambda: len(queued_job_ids(client)) >= 3, 20, "first slot enqueued")
    time.sleep(0.5)  # the standby's next tick mirrors the claims
    before = set(queued_job_ids(client))
    fleet.redis.restart()
    client = fleet.redis.client()
    wait_until(lambda: len(queued_job_ids(client)) >= 6, 30, "two slots after the restart")
    after = set(queued_job_ids(client))
    assert before.isdisjoint(after), before & after
    per_slot = Counter(job.rsplit("-", 1)[0] for job in after)
    assert set(per_slot.values()) == {3}, per_slot
