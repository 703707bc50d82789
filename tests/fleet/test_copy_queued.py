"""A queued copy through a real Celery worker on the storage queue, and the worker's
refusal of a repository its config does not name."""

from __future__ import annotations

import json
import os
import subprocess

from tests.fixtures.common import VENV_BIN
from tests.fleet.conftest import Fleet
from tests.storage.helpers import read_back, write_full
from vmvault.scheduler.enqueue import JobRequest, enqueue
from vmvault.storage.repository import init_repository, open_repository
from vmvault.worker.jobs import JobStore

CHUNK = 64 * 1024


def _run(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "vmvault"), *args, "--config", str(fleet.config_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_queued_copy_runs_on_the_storage_queue(fleet: Fleet) -> None:
    primary = f"file://{fleet.tmp / 'repo'}"
    offsite = f"file://{fleet.tmp / 'offsite'}"
    init_repository(primary, chunk_size=CHUNK).close()
    init_repository(offsite, chunk_size=CHUNK).close()
    data = {d: os.urandom(2 * CHUNK) for d in ("web1", "db1")}
    with open_repository(primary) as repo:
        for domain, disk in data.items():
            write_full(repo, domain, {"vda": disk})
    fleet.write(repositories={"offsite": {"url": offsite, "retention": {"keep_last": 1}}})
    fleet.start_worker("hv1", "--storage")

    done = _run(fleet, "copy", "--to", "offsite", "web1", "--json")
    assert done.returncode == 0, done.stderr
    jobs = json.loads(_run(fleet, "jobs", "--json").stdout)["jobs"]
    (job,) = [j for j in jobs if j["type"] == "copy"]
    assert job["state"] == "succeeded" and job["queue"] == "storage"
    assert job["worker"].startswith("hv1@")
    doc = json.loads(done.stdout)
    assert doc["mode"] == "raw" and len(doc["copied"]) == 1 and doc["objects_copied"] == 4
    with open_repository(offsite) as dst:
        (m,) = dst.list_manifests()
        assert m.domain == "web1" and read_back(dst, m, "vda") == data["web1"]

    listed = _run(fleet, "list", "--repository", "offsite", "--json")
    assert [b["domain"] for b in json.loads(listed.stdout)] == ["web1"]
    verified = _run(fleet, "verify", "--repository", "offsite", "--read-data", "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["backups"] == 1

    # A job naming a repository this worker's config lacks is refused, not run elsewhere.
    store = JobStore(fleet.redis.client())
    (job_id,) = enqueue(
        fleet.app(), store, [JobRequest("gc", {"dry_run": True, "repository": "elsewhere"})]
    )
    record = fleet.wait_jobs([job_id])[job_id]
    assert record.state == "failed" and "repository 'elsewhere' is not in" in record.error
