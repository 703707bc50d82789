"""A gc that finds the repository locked is retried: its record says waiting, not failed.

``vmvault gc`` with a broker follows the job until the registry shows a final state, so a
"failed" written before the retry would end the CLI with exit 1 (and count a failed job)
while the worker runs the GC again 30 s later.
"""

from __future__ import annotations

import time

from tests.fleet.conftest import Fleet
from vmvault.scheduler.enqueue import JobRequest, enqueue
from vmvault.storage.locks import Lease
from vmvault.storage.repository import init_repository
from vmvault.worker.jobs import JobStore


def test_gc_on_a_locked_repository_waits(fleet: Fleet) -> None:
    repo = init_repository(fleet.data["repository"]["url"])
    backup_lock = Lease(repo.backend, "shared", "backup web1/test", 60).acquire()
    try:
        fleet.start_worker("hv1", "--storage")
        store = JobStore(fleet.redis.client())
        [job_id] = enqueue(fleet.app(), store, [JobRequest(type="gc", kwargs={})])
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            record = store.get(job_id)
            state = record.state if record else ""
            if not seen or seen[-1] != state:
                seen.append(state)
            if state == "waiting":
                break
            time.sleep(0.05)
        assert seen[-1] == "waiting", seen
        assert "failed" not in seen, seen
        record = store.get(job_id)
        assert record is not None and "locked" in record.error
    finally:
        backup_lock.release()
