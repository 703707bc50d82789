"""The job registry in Redis: what was enqueued, where it runs, its progress and its outcome.

Celery's result backend only knows task ids; operators ask "what ran on hv1 last night,
how far is the restore of web1". One Redis hash per job answers that, written by the
enqueuer (queued) and the worker (running, progress, final state); a sorted set orders jobs
by enqueue time for ``vmvault jobs``. Records expire after ``RECORD_TTL``.

Keys::

    vmvault:job:<id>          hash  type domain host queue state phase done total error ...
    vmvault:jobs              zset  id -> enqueued (unix time)
    vmvault:inflight:<host>   zset  backup job id -> expiry (unix time); a worker that dies
                                    never removes its entry, the expiry does
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from redis.typing import EncodableT, FieldT

from vmvault.worker.redact import redact
from vmvault.worker.redis_keys import INFLIGHT_PREFIX, JOB_PREFIX, JOBS_INDEX

RECORD_TTL = 14 * 86400
MAX_JOBS_LISTED = 100_000


FINAL_STATES = frozenset({"succeeded", "failed"})


@dataclass
class JobRecord:
    """One job as the registry stores it (all fields strings/ints for a Redis hash)."""

    id: str
    type: str
    queue: str
    domain: str = ""
    host: str = ""
    state: str = "queued"
    phase: str = ""
    done: int = 0
    total: int = 0
    error: str = ""
    result: str = ""
    worker: str = ""
    schedule: str = ""
    slot: str = ""
    enqueued: float = field(default_factory=time.time)
    started: float = 0.0
    finished: float = 0.0
    heartbeat: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON view for ``vmvault jobs --json``: result decoded, empty fields dropped."""
        out: dict[str, Any] = {k: v for k, v in asdict(self).items() if v not in ("", 0, 0.0)}
        out["state"] = self.state
        if self.result:
            out["result"] = json.loads(self.result)
        return out

    @classmethod
    def from_hash(cls, raw: Mapping[bytes, bytes], job_id: str) -> JobRecord:
        """Decode a Redis hash; unknown fields are ignored (newer writers), missing ones
        (a record a worker wrote for a job nobody registered) get defaults."""
        values = {k.decode(): v.decode() for k, v in raw.items()}
        kwargs: dict[str, Any] = {"id": job_id, "type": "", "queue": ""}
        for name, default in cls.__dataclass_fields__.items():
            if name not in values:
                continue
            if default.type in ("int",):
                kwargs[name] = int(float(values[name]))
            elif default.type in ("float",):
                kwargs[name] = float(values[name])
            else:
                kwargs[name] = values[name]
        return cls(**kwargs)


class JobStore:
    """Read/write job records; every call is one Redis round trip (pipelined where many)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def create(self, records: Iterable[JobRecord]) -> None:
        """Register queued jobs (one pipeline for all of them)."""
        pipe = self.client.pipeline(transaction=False)
        for rec in records:
            key = JOB_PREFIX + rec.id
            # Empty fields are not stored (half the bytes for a queued job): absent = default.
            fields: dict[FieldT, EncodableT] = {
                k: _enc(v) for k, v in asdict(rec).items() if v not in ("", 0, 0.0)
            }
            fields["state"] = rec.state
            pipe.hset(key, mapping=fields)
            pipe.expire(key, RECORD_TTL)
            pipe.zadd(JOBS_INDEX, {rec.id: rec.enqueued})
        pipe.zremrangebyrank(JOBS_INDEX, 0, -MAX_JOBS_LISTED - 1)
        pipe.execute()

    def update(self, job_id: str, **fields: Any) -> None:
        """Set some fields of a job (state, progress, ...)."""
        key = JOB_PREFIX + job_id
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping={k: _enc(v) for k, v in fields.items()})
        pipe.expire(key, RECORD_TTL)
        pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        """The record of ``job_id``, or None if unknown/expired."""
        raw = self.client.hgetall(JOB_PREFIX + job_id)
        return JobRecord.from_hash(raw, job_id) if raw else None  # type: ignore[arg-type]

    def recent(self, limit: int = 50) -> list[JobRecord]:
        """The newest ``limit`` jobs, newest first."""
        ids: list[bytes] = self.client.zrevrange(JOBS_INDEX, 0, limit - 1)  # type: ignore[assignment]
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(JOB_PREFIX + job_id.decode())
        return [
            JobRecord.from_hash(raw, job_id.decode())
            for job_id, raw in zip(ids, pipe.execute(), strict=True)
            if raw
        ]

    def states(self, job_ids: Iterable[str]) -> dict[str, str]:
        """State of each job id ('' when the record is gone)."""
        ids = list(job_ids)
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(JOB_PREFIX + job_id, "state")
        return {
            job_id: (raw.decode() if raw else "")
            for job_id, raw in zip(ids, pipe.execute(), strict=True)
        }

    # -- per-host in-flight backups (for max_concurrent) -------------------------------

    def add_in_flight(self, host: str, job_ids: Iterable[str], expires: float) -> None:
        """Count these backups against ``host`` until they end or ``expires`` passes."""
        mapping = dict.fromkeys(job_ids, expires)
        if mapping:
            self.client.zadd(INFLIGHT_PREFIX + host, mapping)

    def remove_in_flight(self, host: str, job_id: str) -> None:
        """A backup ended (either way): it no longer counts against its host."""
        self.client.zrem(INFLIGHT_PREFIX + host, job_id)

    def in_flight(self, hosts: Iterable[str], now: float | None = None) -> dict[str, int]:
        """Backups queued or running per host; entries past their expiry are dropped first."""
        now = time.time() if now is None else now
        host_list = list(hosts)
        pipe = self.client.pipeline(transaction=False)
        for host in host_list:
            pipe.zremrangebyscore(INFLIGHT_PREFIX + host, "-inf", now)
            pipe.zcard(INFLIGHT_PREFIX + host)
        replies = pipe.execute()
        return {host: int(replies[2 * i + 1]) for i, host in enumerate(host_list)}


def _enc(value: Any) -> str | int | float:
    if isinstance(value, (int, float)):
        return value
    # Errors may quote the broker URL (redis-py, kombu): records keep no password.
    return redact(value if isinstance(value, str) else json.dumps(value, default=str))
