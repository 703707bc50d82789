"""Sending jobs: register them in the job registry, then publish them to their Celery queue.

The scheduler and the CLI only *send* (``send_task`` by name), so they never import the
worker's QEMU/NBD code. Registration comes first: a worker that picks the message up at
once always finds its record.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from vmvault.worker.jobs import JobRecord, JobStore
from vmvault.worker.routing import PRIORITY, queue_for

TASK_NAMES = {
    "backup": "vmvault.backup",
    "restore": "vmvault.restore",
    "verify": "vmvault.verify",
    "copy": "vmvault.copy",
    "restore-test": "vmvault.restore_test",
    "prune": "vmvault.prune",
    "gc": "vmvault.gc",
    "ping": "vmvault.ping",
}


@dataclass
class JobRequest:
    """One job to send: type, target and the task's keyword arguments."""

    type: str
    kwargs: dict[str, Any]
    domain: str | None = None
    host: str | None = None
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    schedule: str = ""
    slot: str = ""
    queue: str | None = None

    def record(self) -> JobRecord:
        return JobRecord(
            id=self.job_id,
            type=self.type,
            queue=self.target_queue,
            domain=self.domain or "",
            host=self.host or "",
            schedule=self.schedule,
            slot=self.slot,
            enqueued=time.time(),
        )

    @property
    def target_queue(self) -> str:
        return self.queue or queue_for(self.type, self.host)


def enqueue(
    app: Celery, store: JobStore, requests: Sequence[JobRequest], threads: int = 4
) -> list[str]:
    """Register and publish ``requests``; returns the job ids.

    Large batches (a slot of a big fleet) are published from a few threads, each over its
    own pooled broker connection: a publish is one Redis round trip, and while one thread
    waits for Redis another builds its next message.
    """
    if not requests:
        return []
    store.create(req.record() for req in requests)
    batches = [requests[i::threads] for i in range(threads)] if len(requests) > 200 else [requests]
    if len(batches) == 1:
        _publish(app, batches[0])
    else:
        with ThreadPoolExecutor(len(batches), thread_name_prefix="enqueue") as pool:
            for future in [pool.submit(_publish, app, batch) for batch in batches]:
                future.result()
    return [req.job_id for req in requests]


def _publish(app: Celery, requests: Sequence[JobRequest]) -> None:
    with app.producer_or_acquire() as producer:
        for req in requests:
            app.send_task(
                TASK_NAMES[req.type],
                kwargs=req.kwargs,
                task_id=req.job_id,
                queue=req.target_queue,
                routing_key=req.target_queue,
                priority=PRIORITY.get(req.type, PRIORITY["backup"]),
                producer=producer,
                # Outcomes are followed through the job registry, not AsyncResult: this
                # saves a SUBSCRIBE/UNSUBSCRIBE pair per job on the result backend (half
                # of a publish's cost). The worker still stores progress and the final
                # state in the result backend (worker.tasks).
                ignore_result=True,
            )
