"""Prometheus metrics of the fleet, kept in Redis so every process reports the same numbers.

Jobs run in Celery's forked pool processes on many hosts; per-process counters would need
a multiprocess registry on every host and a scrape per worker. Instead a job's outcome is
added to a few Redis hashes (one pipelined round trip per job) and any ``vmvault worker``
or ``vmvault scheduler`` started with ``--metrics-port`` serves them, together with live
queue depths, through a custom collector. Counters survive worker restarts; a Redis
restart resets them (Prometheus handles counter resets).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import redis
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from vmvault.worker.redis_keys import (
    METRICS_BYTES,
    METRICS_DURATION_COUNT,
    METRICS_DURATION_SUM,
    METRICS_JOBS,
    METRICS_LAST_SUCCESS,
    METRICS_VERIFICATION,
)

log = logging.getLogger(__name__)

# Result fields (BackupResult/RestoreResult.to_json()) that count bytes, by direction.
_BYTE_FIELDS = {
    "bytes_read": "read",
    "bytes_uploaded": "uploaded",
    "bytes_written": "restored",
    "bytes_restored": "restored",
}


def byte_counts(result: Mapping[str, Any]) -> dict[str, int]:
    """Bytes per direction in a job result: top-level fields, else summed over ``disks``."""
    counts: dict[str, int] = {}
    disks = [d for d in result.get("disks") or [] if isinstance(d, Mapping)]
    for key, direction in _BYTE_FIELDS.items():
        value = result.get(key)
        if not _is_int(value):
            per_disk = [int(d[key]) for d in disks if _is_int(d.get(key))]
            value = sum(per_disk) if per_disk else None
        if value is not None:
            counts[direction] = counts.get(direction, 0) + int(value)
    return counts


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def record_job(
    client: redis.Redis,
    job_type: str,
    outcome: str,
    duration: float,
    domain: str = "",
    finished_at: float = 0.0,
    result: Mapping[str, Any] | None = None,
) -> None:
    """Add one finished job to the fleet counters (never raises: metrics must not fail jobs)."""
    try:
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(METRICS_JOBS, f"{job_type}|{outcome}", 1)
        pipe.hincrbyfloat(METRICS_DURATION_SUM, job_type, duration)
        pipe.hincrby(METRICS_DURATION_COUNT, job_type, 1)
        for direction, count in byte_counts(result or {}).items():
            pipe.hincrby(METRICS_BYTES, direction, count)
        if outcome == "succeeded" and job_type == "backup" and domain:
            pipe.hset(METRICS_LAST_SUCCESS, domain, finished_at)
        pipe.execute()
    except redis.RedisError as err:
        log.warning("metrics: could not record %s job: %s", job_type, err)


def record_verification_counts(
    client: redis.Redis, counts: Mapping[str, Mapping[str, int]]
) -> None:
    """Replace the per-domain counts of unverified and failed backups (never raises)."""
    try:
        pipe = client.pipeline(transaction=True)
        pipe.delete(METRICS_VERIFICATION)
        for domain, per in counts.items():
            for what, n in per.items():
                pipe.hset(METRICS_VERIFICATION, f"{domain}|{what}", n)
        pipe.execute()
    except redis.RedisError as err:
        log.warning("metrics: could not record verification counts: %s", err)


def queue_depths(client: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting per queue, summed over the transport's priority sub-lists."""
    names = list(queues)
    pipe = client.pipeline(transaction=False)
    for name in names:
        # kombu's Redis transport keeps priority p>0 in "<queue>:<p>" (sep ':' in our config).
        pipe.llen(name)
        for prio in range(1, 10):
            pipe.llen(f"{name}:{prio}")
    replies = pipe.execute()
    return {
        name: sum(int(n) for n in replies[i * 10 : (i + 1) * 10]) for i, name in enumerate(names)
    }


def _decode_hash(raw: Any) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (raw or {}).items()}


class FleetCollector(Collector):
    """Reads the Redis counters and queue depths at scrape time."""

    def __init__(self, client: redis.Redis, queues: Iterable[str]) -> None:
        self.client = client
        self.queues = list(queues)

    def collect(self) -> Iterator[Any]:
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in (METRICS_JOBS, METRICS_DURATION_SUM, METRICS_DURATION_COUNT, METRICS_BYTES):
                pipe.hgetall(key)
            pipe.hgetall(METRICS_LAST_SUCCESS)
            pipe.hgetall(METRICS_VERIFICATION)
            jobs, dsum, dcount, nbytes, last, verified = (_decode_hash(r) for r in pipe.execute())
            depths = queue_depths(self.client, self.queues)
        except redis.RedisError as err:
            log.warning("metrics: Redis unreachable: %s", err)
            up = GaugeMetricFamily("vmvault_redis_up", "1 when Redis answered the scrape")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("vmvault_redis_up", "1 when Redis answered the scrape")
        up.add_metric([], 1)
        yield up
        total = CounterMetricFamily(
            "vmvault_jobs", "Finished jobs by type and outcome", labels=["type", "outcome"]
        )
        for field, count in sorted(jobs.items()):
            job_type, _, outcome = field.partition("|")
            total.add_metric([job_type, outcome], float(count))
        yield total
        duration = SummaryMetricFamily(
            "vmvault_job_duration_seconds", "Job run time by type", labels=["type"]
        )
        for job_type in sorted(dcount):
            duration.add_metric(
                [job_type], count_value=int(dcount[job_type]), sum_value=float(dsum[job_type])
            )
        yield duration
        bytes_total = CounterMetricFamily(
            "vmvault_bytes", "Bytes moved by jobs", labels=["direction"]
        )
        for direction, count in sorted(nbytes.items()):
            bytes_total.add_metric([direction], float(count))
        yield bytes_total
        last_success = GaugeMetricFamily(
            "vmvault_last_success_timestamp_seconds",
            "Unix time of the last successful backup per domain",
            labels=["domain"],
        )
        for domain, stamp in sorted(last.items()):
            last_success.add_metric([domain], float(stamp))
        yield last_success
        yield from _verification_gauges(verified)
        depth = GaugeMetricFamily(
            "vmvault_queue_depth", "Jobs waiting in each queue", labels=["queue"]
        )
        for queue, waiting in sorted(depths.items()):
            depth.add_metric([queue], waiting)
        yield depth


def _verification_gauges(counts: Mapping[str, str]) -> Iterator[GaugeMetricFamily]:
    gauges = {
        "unverified": GaugeMetricFamily(
            "vmvault_backups_unverified",
            "Backups without a readable verification record, per domain (last verify job)",
            labels=["domain"],
        ),
        "failed": GaugeMetricFamily(
            "vmvault_backups_verification_failed",
            "Backups whose latest verification FAILED, per domain (last verify job)",
            labels=["domain"],
        ),
    }
    for field, count in sorted(counts.items()):
        domain, _, what = field.rpartition("|")
        if what in gauges:
            gauges[what].add_metric([domain], float(count))
    yield from gauges.values()


def serve(client: redis.Redis, queues: Iterable[str], port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` from a daemon thread (fleet counters + queue depths)."""
    registry = CollectorRegistry()
    registry.register(FleetCollector(client, queues))
    start_http_server(port, addr=addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", addr, port)


__all__ = [
    "FleetCollector",
    "byte_counts",
    "queue_depths",
    "record_job",
    "record_verification_counts",
    "serve",
]
