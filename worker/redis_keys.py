"""Every Redis key vmvault writes (besides Celery's own), defined once.

Redis holds the job registry, the metrics, the domain leases and the scheduler's state.
The key strings are a contract with a running fleet: a worker or scheduler of the next
release reads what this one wrote, and during a rolling upgrade both run at once.
They are therefore never renamed. Two spellings for scheduler state exist for that
reason — ``vmvault:sched:`` (planned slots) and ``vmvault:scheduler:`` (the leader
lease); new scheduler keys use ``vmvault:sched:``. Everything else is ``vmvault:<what>:``.
"""

from __future__ import annotations

# Job registry (worker/jobs.py): one hash per job, an index by time, backups in flight
# per host.
JOB_PREFIX = "vmvault:job:"
JOBS_INDEX = "vmvault:jobs"
INFLIGHT_PREFIX = "vmvault:inflight:"

# Metrics (worker/metrics.py), aggregated over the fleet.
METRICS_JOBS = "vmvault:metrics:jobs"
METRICS_DURATION_SUM = "vmvault:metrics:duration_sum"
METRICS_DURATION_COUNT = "vmvault:metrics:duration_count"
METRICS_BYTES = "vmvault:metrics:bytes"
METRICS_LAST_SUCCESS = "vmvault:metrics:last_success"
# "<domain>|unverified" / "<domain>|failed" -> backups, as the last verify job counted them.
METRICS_VERIFICATION = "vmvault:metrics:verification"

# One backup or restore per domain fleet-wide (worker/redis_lock.py).
DOMAIN_LOCK_PREFIX = "vmvault:lock:domain:"

# Scheduler (scheduler/leader.py, scheduler/scheduler_loop.py): the leader lease, the
# newest planned slot per schedule, and one claim per planned job.
LEADER_KEY = "vmvault:scheduler:leader"
SLOT_KEY = "vmvault:sched:{name}:slot"
CLAIM_PREFIX = "vmvault:claim:"

# Notifications (worker/notify_events.py, scheduler/notify_delivery.py): the open problems
# (problem key -> its event), the outbox jobs and the scheduler push events to, one queue
# per target the leader delivers from, each target's retry state, and when the scheduler
# first saw a scheduled domain (the overdue rule's start for a never backed-up domain).
NOTIFY_OPEN = "vmvault:notify:open"
NOTIFY_OUTBOX = "vmvault:notify:outbox"
NOTIFY_QUEUE_PREFIX = "vmvault:notify:queue:"
NOTIFY_RETRY = "vmvault:notify:retry"
NOTIFY_FIRST_SEEN = "vmvault:notify:first_seen"
