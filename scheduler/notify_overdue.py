"""Overdue backups as notification problems, checked by the scheduler leader each tick.

The rule is ``vmvault status``'s (``planner.overdue``): a scheduled domain is overdue
when its newest successful backup is older than the slot *before* its schedule's newest
slot (one slot of grace: the newest slot's backup may still be queued or running).
The time of the newest success comes from the job results the workers record in Redis
(one HGETALL per tick, no repository listing). A domain with no recorded success counts
from when the scheduler first saw it scheduled, so a new domain, or a Redis that lost
its data, does not raise an alarm before two slots have passed.
"""

from __future__ import annotations

from datetime import UTC, datetime

import redis

from vmvault.scheduler.planner import overdue_threshold
from vmvault.worker.config import FleetConfig
from vmvault.worker.notify_events import Event, clear_problem, open_problem
from vmvault.worker.redis_keys import METRICS_LAST_SUCCESS, NOTIFY_FIRST_SEEN, NOTIFY_OPEN

PREFIX = "overdue:"


def check_overdue(config: FleetConfig, client: redis.Redis, now: datetime) -> list[str]:
    """Open the overdue problem of each late domain, clear it for the others.

    Returns the domains found overdue. Only changes cost a script call; a quiet tick
    with every domain backed up once is one round trip whatever the fleet's size.
    """
    if not config.notifications.overdue:
        return []
    # One threshold per schedule, not per domain: croniter is slow (10,000 domains took
    # 5 s per tick when each domain evaluated its cron; bench/notify_bench.py).
    crons: dict[str, list[tuple[str, datetime]]] = {}
    for name, sched in sorted(config.schedules.items()):
        threshold = overdue_threshold(sched.cron, now)
        for domain in config.domains_matching(sched.domains):
            crons.setdefault(domain, []).append((name, threshold))
    stamp = now.timestamp()
    pipe = client.pipeline(transaction=False)
    pipe.hkeys(NOTIFY_OPEN)
    pipe.hgetall(METRICS_LAST_SUCCESS)
    replies = pipe.execute()
    open_now = {key.decode() for key in replies[0]}
    last = {k.decode(): float(v) for k, v in replies[1].items()}
    # Only domains without a recorded success need (and get) a first-seen time.
    unseen = [domain for domain in crons if domain not in last]
    first_seen: dict[str, bytes | None] = {}
    if unseen:
        pipe = client.pipeline(transaction=False)
        for domain in unseen:
            pipe.hsetnx(NOTIFY_FIRST_SEEN, domain, stamp)
        pipe.hmget(NOTIFY_FIRST_SEEN, unseen)
        first_seen = dict(zip(unseen, pipe.execute()[-1], strict=True))
    late: list[str] = []
    for domain, schedules in crons.items():
        success = last.get(domain)
        since = success if success is not None else float(first_seen.get(domain) or stamp)
        when = datetime.fromtimestamp(since, UTC)
        behind = [name for name, threshold in schedules if when < threshold]
        problem = PREFIX + domain
        if behind:
            late.append(domain)
            if problem not in open_now:
                what = "last good backup" if success is not None else "no good backup since"
                summary = (
                    f"backup of {domain} is overdue: {what} {when.isoformat()} "
                    f"(schedule {', '.join(behind)})"
                )
                open_problem(client, _event("problem", domain, summary, now))
        elif problem in open_now:
            summary = f"backup of {domain} is no longer overdue: good backup at {when.isoformat()}"
            clear_problem(client, _event("recovery", domain, summary, now))
    for problem in sorted(open_now):
        domain = problem.removeprefix(PREFIX)
        if problem.startswith(PREFIX) and domain not in crons:
            # No schedule covers it any more (config changed): nothing will ever clear it.
            summary = f"backup of {domain} is no longer overdue: no schedule covers it"
            clear_problem(client, _event("recovery", domain, summary, now))
    return late


def _event(event: str, domain: str, summary: str, now: datetime) -> Event:
    """The overdue problem's ``problem`` or ``recovery`` event for ``domain``."""
    return Event(
        event=event,
        kind="overdue",
        problem=PREFIX + domain,
        summary=summary,
        time=now.replace(microsecond=0).isoformat(),
        domain=domain,
        job_type="backup",
    )
