"""A restore whose worker died is marked failed on redelivery, never run a second time.

Redis redelivers an unacked message (``acks_late``) after the visibility timeout whatever
``reject_on_worker_lost`` says, so the task itself must notice that a worker already
started the job: the registry then says ``running`` (or already ended) for its id.
"""

from __future__ import annotations

import time
import uuid

from tests.fleet.conftest import Fleet
from vmvault.worker.jobs import JobRecord, JobStore


def test_redelivered_restore_is_failed_not_replayed(fleet: Fleet) -> None:
    # Within the queue policy (worker.restore_roots): only the replay check refuses it.
    fleet.write(worker={"restore_roots": [str(fleet.tmp)]})
    fleet.start_worker("hv1")
    store = JobStore(fleet.redis.client())
    job_id = f"restore-{uuid.uuid4().hex}"
    # What a worker killed mid-restore leaves: the record says it was running.
    store.create(
        [
            JobRecord(
                id=job_id,
                type="restore",
                queue="host.hv1",
                domain="web1",
                host="hv1",
                state="running",
            )
        ]
    )
    store.update(job_id, started=time.time() - 3600, worker="dead-worker")
    fleet.app().send_task(
        "vmvault.restore",
        kwargs={"domain": "web1", "to_dir": str(fleet.tmp / "restored")},
        task_id=job_id,
        queue="host.hv1",
        routing_key="host.hv1",
        ignore_result=True,
    )
    record = fleet.wait_jobs([job_id], timeout=60)[job_id]
    assert record.state == "failed"
    assert "not replayed" in record.error, record.error
    assert not (fleet.tmp / "restored").exists()
