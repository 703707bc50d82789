"""Schedule planning: which cron slots are due, which backups they ask for, and in what order.

Pure logic, no I/O: the scheduler loop feeds it the config, the clock and what Redis says
was already enqueued, and gets back the jobs to send now. All times are aware UTC.

    slot 02:00            spread window (spread_seconds)
    |<---------------------------------------------->|
    |  web1 @ +37s   db1 @ +412s   mail @ +1503s ...  |

A domain's offset inside the window is a hash of (schedule, domain): the same on every
scheduler replica and every tick, so a new leader recomputes exactly the same plan.
Only the newest slot at or before "now" is ever planned: after downtime the missed slots
collapse into one catch-up run instead of a burst.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from croniter import croniter

from vmvault.worker.config import FleetConfig


def latest_slot(cron: str, now: datetime) -> datetime:
    """The newest cron slot at or before ``now`` (cron is evaluated in UTC)."""
    if now.tzinfo is None:
        raise ValueError("planner times must be timezone-aware")
    # croniter.get_prev is strictly-before; the next whole second after "now" makes a slot
    # at "now" count (slots fall on whole seconds, so none lies in between).
    probe = now.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
    slot: datetime = croniter(cron, probe).get_prev(datetime)
    return slot.astimezone(UTC).replace(fold=0)


def next_slot(cron: str, slot: datetime) -> datetime:
    """The first cron slot strictly after ``slot``."""
    nxt: datetime = croniter(cron, slot.astimezone(UTC)).get_next(datetime)
    return nxt.astimezone(UTC).replace(fold=0)


def due_slot(cron: str, last_planned: datetime | None, now: datetime) -> datetime | None:
    """The slot to plan now, or None when the newest slot was already planned.

    ``last_planned`` is the newest slot already planned for this schedule (None: never).
    However many slots were missed, at most one (the newest) is returned.
    """
    slot = latest_slot(cron, now)
    if last_planned is not None and slot <= last_planned:
        return None
    return slot


def spread_offset(schedule: str, domain: str, window_seconds: int) -> int:
    """Deterministic start offset in ``[0, window_seconds)`` for one domain of a schedule."""
    if window_seconds <= 0:
        return 0
    digest = hashlib.sha256(f"{schedule}\0{domain}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % window_seconds


@dataclass(frozen=True, order=True)
class PlannedBackup:
    """One backup a slot asks for; sorts by start time, then domain."""

    not_before: datetime
    domain: str
    host: str
    schedule: str
    slot: datetime

    @property
    def job_id(self) -> str:
        """Stable id: the same slot and domain always give the same job id."""
        return slot_job_id("backup", self.schedule, self.slot, self.domain)


def slot_stamp(slot: datetime) -> str:
    """Compact UTC stamp of a slot, used in keys and job ids (``20260102T020000Z``)."""
    # Seconds included: croniter accepts a 6th (seconds) field, used by fast tests.
    return slot.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def slot_job_id(job_type: str, schedule: str, slot: datetime, domain: str | None = None) -> str:
    """Job id for a scheduled job; unique per (type, schedule, slot, domain)."""
    parts = [job_type, schedule, slot_stamp(slot)]
    if domain is not None:
        parts.append(domain)
    return "-".join(parts)


def plan_slot(config: FleetConfig, schedule: str, slot: datetime) -> list[PlannedBackup]:
    """Every backup of ``schedule`` for ``slot``, sorted by start time."""
    sched = config.schedules[schedule]
    window = (
        sched.spread_seconds
        if sched.spread_seconds is not None
        else config.scheduler.spread_seconds
    )
    # A start past the next slot would never come: the next slot replaces this plan, and
    # the offset is the same every slot, so that domain would never be backed up. Half
    # the gap leaves room for discrete ticks (and for max_concurrent queueing).
    gap = int((next_slot(sched.cron, slot) - slot).total_seconds())
    window = min(window, gap // 2)
    plan = [
        PlannedBackup(
            not_before=slot + timedelta(seconds=spread_offset(schedule, domain, window)),
            domain=domain,
            host=config.domains[domain].host,
            schedule=schedule,
            slot=slot,
        )
        for domain in config.domains_matching(sched.domains)
    ]
    plan.sort()
    return plan


def select_ready(
    pending: Iterable[PlannedBackup],
    now: datetime,
    in_flight: Mapping[str, int],
    max_concurrent: Mapping[str, int],
) -> list[PlannedBackup]:
    """The pending backups to enqueue now.

    A backup is ready once its ``not_before`` has passed; per host at most
    ``max_concurrent[host] - in_flight[host]`` are released (default limit 1). Earlier
    start times go first, so a host's queue drains in plan order. A domain is released
    at most once per call even if two schedules ask for it at the same time.
    """
    free = {host: max_concurrent.get(host, 1) - in_flight.get(host, 0) for host in max_concurrent}
    chosen: list[PlannedBackup] = []
    domains: set[str] = set()
    for job in sorted(pending):
        if job.not_before > now:
            continue
        room = free.get(job.host, 1 - in_flight.get(job.host, 0))
        if room <= 0 or job.domain in domains:
            continue
        free[job.host] = room - 1
        domains.add(job.domain)
        chosen.append(job)
    return chosen


def restore_test_sample(config: FleetConfig, job: str, slot: datetime) -> list[str]:
    """The domains verify job ``job`` restore-tests in ``slot``: ``sample`` of those with a
    launch description, chosen by a hash of (job, slot, domain), so that every replica
    picks the same ones and successive slots go round the fleet."""
    test = config.verify_jobs[job].restore_test
    if test is None:
        return []
    stamp = slot_stamp(slot)

    def rank(domain: str) -> bytes:
        return hashlib.sha256(f"{job}\0{stamp}\0{domain}".encode()).digest()

    return sorted(sorted(config.restore_test_domains(job), key=rank)[: test.sample])


def gc_period(now: datetime, interval_seconds: int) -> int:
    """Index of the GC period containing ``now``; one GC is enqueued per period."""
    return int(now.timestamp()) // interval_seconds


def overdue_threshold(cron: str, now: datetime) -> datetime:
    """The slot before the newest one: a backup older than this is overdue (``overdue``)."""
    newest = latest_slot(cron, now)
    return latest_slot(cron, newest - timedelta(seconds=1))


def overdue(cron: str, last_success: datetime | None, now: datetime) -> bool:
    """True when a domain has no successful backup since the slot before the newest one.

    One slot of grace: the newest slot's backup may still be queued or running.
    """
    return last_success is None or last_success < overdue_threshold(cron, now)
