"""The scheduler: every tick the leader plans due slots and enqueues what is ready.

One tick (leader only):

1. per schedule, the newest cron slot <= now becomes the schedule's active slot (missed
   slots collapse into it: one catch-up run, not a burst);
2. the slot's backups whose spread offset has passed are released per host up to
   ``max_concurrent`` minus the backups already queued/running on that host;
3. each released backup is claimed with ``SET NX vmvault:claim:<job id>`` and only the
   winners are sent, so a slot's job is sent once even across leader changes;
4. once every backup of the slot is claimed and has ended, the schedule's retention runs
   (one ``prune`` job, claimed the same way);
5. one ``gc`` per ``gc_interval_seconds`` period;
6. one ``copy`` per ``copy_jobs`` entry and cron slot (the newest slot, claimed the same
   way; the worker takes repositories, domains and retention from its own config).
7. per ``verify_jobs`` entry, one ``verify`` job (storage queue) per cron slot, claimed the
   same way: the newest slot at or before now (so a starting scheduler catches up once).
8. notifications: overdue domains are opened/cleared as problems (``notify_overdue``) and
   the event outbox is handed to the sender threads (``notify_delivery``), which never
   hold up the tick.

State lives in Redis (active slot per schedule, claims) *and* in the leader's memory, so a
Redis restart (no persistence) does not make the running leader re-send a slot.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Protocol

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from vmvault.scheduler.enqueue import JobRequest, enqueue
from vmvault.scheduler.leader import Leadership
from vmvault.scheduler.notify_delivery import Notifier
from vmvault.scheduler.notify_overdue import check_overdue
from vmvault.scheduler.planner import (
    PlannedBackup,
    due_slot,
    gc_period,
    latest_slot,
    next_slot,
    plan_slot,
    restore_test_sample,
    select_ready,
    slot_job_id,
    slot_stamp,
)
from vmvault.worker.config import FleetConfig
from vmvault.worker.jobs import FINAL_STATES, JobStore
from vmvault.worker.redis_keys import CLAIM_PREFIX, SLOT_KEY

log = logging.getLogger(__name__)

# A claim must outlive the time its slot can be planned (until the next slot supersedes
# it), plus a margin for a late tick; see ``claim_ttl``.
CLAIM_MARGIN = 86400


def claim_ttl(cron: str, slot: datetime, now: datetime) -> int:
    """Seconds a claim for ``slot`` must live: until the next slot, plus a margin."""
    remaining = (next_slot(cron, slot) - now).total_seconds()
    return max(int(remaining), 0) + CLAIM_MARGIN


class CronEntry(Protocol):
    """A config entry run once per cron slot (``copy_jobs``, ``verify_jobs``)."""

    @property
    def cron(self) -> str: ...


@dataclass
class TickReport:
    """What one tick did (for logs, tests and the benchmark)."""

    leader: bool
    planned: int = 0
    enqueued: list[str] = field(default_factory=list)
    skipped_claimed: int = 0
    overdue: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Scheduler:
    """Plans and enqueues; call ``tick()`` periodically or ``run()`` forever."""

    def __init__(
        self,
        config: FleetConfig,
        client: redis.Redis,
        app: Celery,
        name: str | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.app = app
        self.store = JobStore(client)
        self.leadership = Leadership(client, config.scheduler.lease_seconds, name)
        self.notifier = Notifier(config, client)
        self._active: dict[str, datetime] = {}
        self._claimed: set[str] = set()
        self._stop = threading.Event()

    # -- state ---------------------------------------------------------------------------

    def _load_active(self, name: str) -> datetime | None:
        raw = self.client.get(SLOT_KEY.format(name=name))
        from_redis = datetime.fromisoformat(raw.decode()) if isinstance(raw, bytes) else None
        remembered = self._active.get(name)
        if remembered is not None and (from_redis is None or from_redis < remembered):
            # Redis lost it (restart without persistence): our memory is the truth.
            self.client.set(SLOT_KEY.format(name=name), remembered.isoformat())
            return remembered
        return from_redis

    def _claim(self, job_ids: list[str], ttl: int) -> list[str]:
        """SET NX each claim (expiring after ``ttl`` s); returns the ids this call won."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.set(CLAIM_PREFIX + job_id, self.leadership.name, nx=True, ex=ttl)
        won = [job_id for job_id, ok in zip(job_ids, pipe.execute(), strict=True) if ok]
        self._claimed.update(job_ids)
        return won

    def _unclaimed(self, jobs: list[PlannedBackup]) -> list[PlannedBackup]:
        unknown = [job for job in jobs if job.job_id not in self._claimed]
        if not unknown:
            return []
        pipe = self.client.pipeline(transaction=False)
        for job in unknown:
            pipe.exists(CLAIM_PREFIX + job.job_id)
        free = []
        for job, exists in zip(unknown, pipe.execute(), strict=True):
            if exists:
                self._claimed.add(job.job_id)
            else:
                free.append(job)
        return free

    # -- one tick ------------------------------------------------------------------------

    def tick(self, now: datetime | None = None) -> TickReport:
        """Plan and enqueue once, if leader. Safe to call from any replica at any time."""
        started = time.monotonic()
        now = now or datetime.now(UTC)
        report = TickReport(leader=self.leadership.is_leader())
        if not report.leader:
            self._follow(now)
            report.seconds = time.monotonic() - started
            return report
        config = self.config
        pending: list[PlannedBackup] = []
        slots: dict[str, tuple[datetime, list[PlannedBackup]]] = {}
        for name, sched in sorted(config.schedules.items()):
            known = self._load_active(name)
            slot = due_slot(sched.cron, known, now)
            if slot is not None:
                log.info("schedule %s: slot %s is due", name, slot.isoformat())
                self.client.set(SLOT_KEY.format(name=name), slot.isoformat())
                self._active[name] = slot
            active = slot or known
            if active is None:
                continue
            self._active[name] = active
            plan = plan_slot(config, name, active)
            report.planned += len(plan)
            slots[name] = (active, plan)
            pending.extend(self._unclaimed(plan))
        hosts = sorted({job.host for job in pending})
        in_flight = self.store.in_flight(hosts) if hosts else {}
        limits = {host: config.host(host).max_concurrent for host in hosts}
        ready = select_ready(pending, now, in_flight, limits)
        if ready:
            report.enqueued += self._send_backups(ready, now)
            report.skipped_claimed += len(ready) - len(report.enqueued)
        for name, (slot, plan) in slots.items():
            report.enqueued += self._retention_if_done(name, slot, plan, now)
        report.enqueued += self._gc_if_due(now)
        report.enqueued += self._copies_if_due(now)
        report.enqueued += self._verify_jobs_if_due(now)
        self._forget_old_claims(slots, now)
        report.overdue = check_overdue(config, self.client, now)
        self.notifier.pump()
        report.seconds = time.monotonic() - started
        if report.enqueued:
            log.info("tick: enqueued %d job(s) in %.2fs", len(report.enqueued), report.seconds)
        return report

    def _forget_old_claims(
        self, slots: dict[str, tuple[datetime, list[PlannedBackup]]], now: datetime
    ) -> None:
        # Only the active slots can be planned again: older claims need no memory.
        current = {job.job_id for _, plan in slots.values() for job in plan}
        current |= {slot_job_id("prune", name, slot) for name, (slot, _) in slots.items()}
        current.add(self._gc_id(now))
        current.update(self._slot_ids(now))
        self._claimed &= current

    def _follow(self, now: datetime) -> None:
        """Standby replica: mirror the leader's active slots and claims in memory.

        If Redis then loses them (restart without persistence) and this replica becomes
        leader, it still knows what was sent and does not send it again.
        """
        slots: dict[str, tuple[datetime, list[PlannedBackup]]] = {}
        for name in sorted(self.config.schedules):
            raw = self.client.get(SLOT_KEY.format(name=name))
            if isinstance(raw, bytes):
                seen = datetime.fromisoformat(raw.decode())
                if name not in self._active or seen > self._active[name]:
                    self._active[name] = seen
            active = self._active.get(name)
            if active is None:
                continue
            plan = plan_slot(self.config, name, active)
            slots[name] = (active, plan)
            self._unclaimed(plan)  # records the leader's claims in self._claimed
        extra = [slot_job_id("prune", name, slot) for name, (slot, _) in slots.items()]
        extra += [job_id for job_id in [self._gc_id(now)] if job_id]
        extra += self._slot_ids(now)
        unknown = [job_id for job_id in extra if job_id not in self._claimed]
        if unknown:
            pipe = self.client.pipeline(transaction=False)
            for job_id in unknown:
                pipe.exists(CLAIM_PREFIX + job_id)
            for job_id, exists in zip(unknown, pipe.execute(), strict=True):
                if exists:
                    self._claimed.add(job_id)
        self._forget_old_claims(slots, now)

    def _send_backups(self, ready: list[PlannedBackup], now: datetime) -> list[str]:
        # One TTL per (schedule, slot), not per job: croniter is slow next to a dict lookup.
        ttls = [
            claim_ttl(self.config.schedules[name].cron, slot, now)
            for name, slot in {(job.schedule, job.slot) for job in ready}
        ]
        won = set(self._claim([job.job_id for job in ready], max(ttls)))
        requests = [
            JobRequest(
                type="backup",
                kwargs={"domain": job.domain},
                domain=job.domain,
                host=job.host,
                job_id=job.job_id,
                schedule=job.schedule,
                slot=job.slot.isoformat(),
            )
            for job in ready
            if job.job_id in won
        ]
        # Counted against the host before sending: the worker removes it when the job ends;
        # the expiry frees the slot if a worker dies and the message is never redelivered.
        expires = time.time() + self.config.scheduler.visibility_timeout_seconds
        by_host: dict[str, list[str]] = {}
        for req in requests:
            by_host.setdefault(req.host or "", []).append(req.job_id)
        for host, ids in by_host.items():
            self.store.add_in_flight(host, ids, expires)
        return enqueue(self.app, self.store, requests)

    def _retention_if_done(
        self, name: str, slot: datetime, plan: list[PlannedBackup], now: datetime
    ) -> list[str]:
        sched = self.config.schedules[name]
        if sched.retention is None or not plan:
            return []
        prune_id = slot_job_id("prune", name, slot)
        if prune_id in self._claimed:
            return []
        ids = [job.job_id for job in plan]
        if any(job_id not in self._claimed for job_id in ids):
            return []
        states = self.store.states(ids)
        # A record gone from Redis cannot block retention forever; neither can a job whose
        # worker died without redelivery (past time limit + redelivery window).
        give_up = slot + timedelta(
            seconds=self.config.scheduler.visibility_timeout_seconds
            + self.config.scheduler.job_time_limit_seconds
        )
        if now < give_up and any(s and s not in FINAL_STATES for s in states.values()):
            return []
        if not self._claim([prune_id], claim_ttl(sched.cron, slot, now)):
            return []
        request = JobRequest(
            type="prune",
            kwargs={
                "domains": [job.domain for job in plan],
                "policy": sched.retention.model_dump(exclude_none=True),
                "schedule": name,
            },
            job_id=prune_id,
            schedule=name,
            slot=slot.isoformat(),
        )
        log.info("schedule %s: slot %s done, retention enqueued", name, slot_stamp(slot))
        return enqueue(self.app, self.store, [request])

    def _gc_id(self, now: datetime) -> str:
        interval = self.config.scheduler.gc_interval_seconds
        return f"gc-{gc_period(now, interval)}" if interval else ""

    def _gc_if_due(self, now: datetime) -> list[str]:
        interval = self.config.scheduler.gc_interval_seconds
        if interval is None:
            return []
        job_id = self._gc_id(now)
        if job_id in self._claimed or not self._claim([job_id], interval + CLAIM_MARGIN):
            return []
        return enqueue(self.app, self.store, [JobRequest(type="gc", kwargs={}, job_id=job_id)])

    def _entry_slots(
        self, kind: str, entries: Mapping[str, CronEntry], now: datetime
    ) -> list[tuple[str, str, datetime]]:
        """``(job id, entry name, slot)`` of each cron entry's newest slot."""
        slots = [(name, latest_slot(entry.cron, now)) for name, entry in sorted(entries.items())]
        return [(slot_job_id(kind, name, slot), name, slot) for name, slot in slots]

    def _slot_ids(self, now: datetime) -> list[str]:
        """The job ids of the copy and verify jobs' newest slots."""
        return [
            job_id
            for kind, entries in (
                ("copy", self.config.copy_jobs),
                ("verify", self.config.verify_jobs),
            )
            for job_id, _, _ in self._entry_slots(kind, entries, now)
        ]

    def _due_slots(
        self, kind: str, entries: Mapping[str, CronEntry], now: datetime
    ) -> list[tuple[str, str, datetime]]:
        """The entries' newest slots that this call claimed (each is sent once)."""
        due = []
        for job_id, name, slot in self._entry_slots(kind, entries, now):
            ttl = claim_ttl(entries[name].cron, slot, now)
            if job_id in self._claimed or not self._claim([job_id], ttl):
                continue
            log.info("%s job %s: slot %s is due", kind, name, slot_stamp(slot))
            due.append((job_id, name, slot))
        return due

    def _copies_if_due(self, now: datetime) -> list[str]:
        requests = [
            JobRequest(
                type="copy",
                kwargs={"copy_job": name},
                job_id=job_id,
                schedule=name,
                slot=slot.isoformat(),
            )
            for job_id, name, slot in self._due_slots("copy", self.config.copy_jobs, now)
        ]
        return enqueue(self.app, self.store, requests)

    def _verify_jobs_if_due(self, now: datetime) -> list[str]:
        requests = []
        for job_id, name, slot in self._due_slots("verify", self.config.verify_jobs, now):
            requests.append(
                JobRequest(
                    type="verify",
                    kwargs={"job": name},
                    job_id=job_id,
                    schedule=name,
                    slot=slot.isoformat(),
                )
            )
            # Restore tests of the slot go with it (the verify claim covers them).
            requests += [
                JobRequest(
                    type="restore-test",
                    kwargs={"domain": domain, "job": name},
                    domain=domain,
                    host=self.config.domains[domain].host,
                    job_id=slot_job_id("restore-test", name, slot, domain),
                    schedule=name,
                    slot=slot.isoformat(),
                )
                for domain in restore_test_sample(self.config, name, slot)
            ]
        return enqueue(self.app, self.store, requests) if requests else []

    # -- forever -------------------------------------------------------------------------

    def run(self) -> None:
        """Tick every ``tick_seconds`` until SIGTERM/SIGINT; Redis outages are waited out."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        interval = self.config.scheduler.tick_seconds
        log.info("scheduler %s: started, tick every %.1fs", self.leadership.name, interval)
        try:
            while not self._stop.is_set():
                try:
                    self.tick()
                except (redis.RedisError, OSError, OperationalError) as err:
                    log.warning("scheduler: tick failed, Redis unreachable? %s", err)
                except Exception:
                    # One bad tick must not stop every future backup: log, retry next tick.
                    log.exception("scheduler: tick failed")
                self._stop.wait(interval)
        finally:
            # A send in progress finishes (bounded by its timeout) before leadership goes.
            self.notifier.join(timeout=30)
            with contextlib.suppress(redis.RedisError):
                self.leadership.resign()
            log.info("scheduler %s: stopped", self.leadership.name)

    def stop(self) -> None:
        """Make ``run()`` return after the current tick."""
        self._stop.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop()
