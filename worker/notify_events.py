"""Problem and recovery events: one per problem, written to a Redis outbox atomically.

A *problem* has a key (``job:backup:web1``, ``overdue:web1``). The open problems live in
one Redis hash; opening a problem that is already open, or clearing one that is not, does
nothing. The check and the outbox push run as one Lua script, so two workers (a job and
its re-run) or two schedulers (a stalled leader and the new one) never both emit it.

Nothing here sends anything: the scheduler leader delivers the outbox
(scheduler/notify_delivery.py), so a dead SMTP server can never fail or slow a job.

Event JSON (what targets receive)::

    {"event": "problem", "kind": "job_failed", "problem": "job:backup:web1",
     "job_type": "backup", "domain": "web1", "summary": "backup of web1 failed: ...",
     "time": "2026-12-03T02:00:13+00:00"}
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from vmvault.worker.redact import redact
from vmvault.worker.redis_keys import NOTIFY_OPEN, NOTIFY_OUTBOX

log = logging.getLogger(__name__)

# The outbox is capped: with no scheduler running it must not grow without bound.
OUTBOX_MAX = 10_000
# Job errors can quote whole tracebacks; an event carries the first line, this long.
_SUMMARY_MAX = 500

# KEYS: open hash, outbox. ARGV: problem key, event JSON, outbox cap.
_OPEN = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
  return 1
end
return 0
"""
_CLEAR = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Event:
    """One notification: a problem opened or cleared."""

    event: str  # "problem" | "recovery" | "test"
    kind: str  # "job_failed" | "overdue" | "test"
    problem: str
    summary: str
    time: str
    domain: str = ""
    job_type: str = ""

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v != ""}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        """Decode an event; ``ValueError`` when it is not an event object (edited broker)."""
        data: Any = json.loads(text)
        if not isinstance(data, dict) or not data.get("event") or not data.get("problem"):
            raise ValueError("not a notification event (want an object with event, problem)")
        return cls(**{k: str(data.get(k, "")) for k in cls.__dataclass_fields__})


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def open_problem(client: redis.Redis, event: Event) -> bool:
    """Record ``event``'s problem as open and queue the event; False if already open."""
    won = client.eval(
        _OPEN, 2, NOTIFY_OPEN, NOTIFY_OUTBOX, event.problem, event.to_json(), OUTBOX_MAX
    )
    return bool(won)


def clear_problem(client: redis.Redis, event: Event) -> bool:
    """Close ``event``'s problem and queue the recovery; False if it was not open."""
    won = client.eval(
        _CLEAR, 2, NOTIFY_OPEN, NOTIFY_OUTBOX, event.problem, event.to_json(), OUTBOX_MAX
    )
    return bool(won)


def open_problems(client: redis.Redis) -> dict[str, Event]:
    """Every open problem with the event that opened it."""
    raw: dict[bytes, bytes] = client.hgetall(NOTIFY_OPEN)  # type: ignore[assignment]
    return {key.decode(): Event.from_json(value) for key, value in raw.items()}


def job_problem_key(job_type: str, domain: str | None) -> str:
    """A job's problem: its type and domain (repository-wide jobs: ``repository``)."""
    return f"job:{job_type}:{domain or 'repository'}"


def job_ended(
    client: redis.Redis, job_type: str, domain: str | None, outcome: str, error: str = ""
) -> None:
    """A job ended for good: open its problem on failure, clear it on success.

    Never raises: a notification must not change a job's outcome.
    """
    what = f"{job_type} of {domain}" if domain else f"{job_type} of the repository"
    first_line = redact(error).splitlines()[0] if error.strip() else "no error recorded"
    if outcome == "failed":
        event = Event(
            event="problem",
            kind="job_failed",
            problem=job_problem_key(job_type, domain),
            summary=f"{what} failed: {first_line}"[:_SUMMARY_MAX],
            time=now_iso(),
            domain=domain or "",
            job_type=job_type,
        )
    else:
        event = Event(
            event="recovery",
            kind="job_failed",
            problem=job_problem_key(job_type, domain),
            summary=f"{what} succeeded again",
            time=now_iso(),
            domain=domain or "",
            job_type=job_type,
        )
    try:
        if event.event == "problem":
            sent = open_problem(client, event)
        else:
            sent = clear_problem(client, event)
    except redis.RedisError as err:
        log.warning("notify: %s %s not queued: %s", event.event, event.problem, err)
        return
    if sent:
        log.info("notify: %s %s queued", event.event, event.problem)
