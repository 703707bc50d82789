"""A queued copy through a real Celery worker on the storage queue, and the worker's
refusal of a repository its config does not name."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

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


def test_scheduled_copy_job_runs_once_per_slot_and_applies_its_retention(fleet: Fleet) -> None:
    from datetime import UTC, datetime

    from vmvault.scheduler.scheduler_loop import Scheduler

    primary = f"file://{fleet.tmp / 'repo'}"
    offsite = f"file://{fleet.tmp / 'offsite'}"
    init_repository(primary, chunk_size=CHUNK).close()
    init_repository(offsite, chunk_size=CHUNK, passphrase=b"other key", scrypt_n=2**12).close()
    (fleet.tmp / "offsite.pass").write_bytes(b"other key\n")
    disks = [os.urandom(2 * CHUNK) for _ in range(3)]
    with open_repository(primary) as repo:
        made = [write_full(repo, "web1", {"vda": d}) for d in disks]
        write_full(repo, "db1", {"vda": os.urandom(CHUNK)})
    config = fleet.write(
        repositories={
            "offsite": {"url": offsite, "passphrase_file": str(fleet.tmp / "offsite.pass")}
        },
        copy_jobs={
            "nightly": {
                "cron": "0 3 * * *",
                "domains": ["web*"],
                "to": "offsite",
                "retention": {"keep_last": 2},
            }
        },
        scheduler={"gc_interval_seconds": None},
    )
    fleet.start_worker("hv1", "--storage")
    now = datetime(2026, 12, 3, 3, 0, 30, tzinfo=UTC)
    first = Scheduler(config, fleet.redis.client(), fleet.app(), name="s1")
    second = Scheduler(config, fleet.redis.client(), fleet.app(), name="s2")
    sent = first.tick(now).enqueued + first.tick(now).enqueued + second.tick(now).enqueued
    assert len(sent) == 1  # one copy per slot, whoever ticks
    record = fleet.wait_jobs(sent)[sent[0]]
    assert record.state == "succeeded", record.error
    doc = json.loads(record.result)
    assert doc["mode"] == "rebuild" and len(doc["copied"]) == 3
    assert doc["pruned"] == [made[0].backup_id]
    with open_repository(offsite, passphrase=b"other key") as dst:
        kept = dst.list_manifests()
        assert [m.backup_id for m in kept] == [m.backup_id for m in made[1:]]  # no db1
        for m, data in zip(kept, disks[1:], strict=True):
            assert read_back(dst, m, "vda") == data


def test_queue_policy_checks_copy_and_repository_arguments(tmp_path: Path) -> None:
    import pytest

    from tests.fleet.conftest import make_config
    from vmvault.worker.job_policy import (
        JobRefusedError,
        check_copy,
        check_copy_job,
        check_prune,
        check_repository,
    )

    config = make_config(
        tmp_path,
        repositories={"offsite": {"url": f"file://{tmp_path}/off", "retention": {"keep_last": 3}}},
        copy_jobs={"n": {"cron": "0 3 * * *", "domains": ["web*"], "to": "offsite"}},
    )
    assert check_repository(config, "gc", None) is None
    assert check_repository(config, "gc", "offsite") == "offsite"
    for bad in ("elsewhere", ["offsite"], {"a": 1}, 7, "x" * 10_000):
        with pytest.raises(JobRefusedError, match="repositories"):
            check_repository(config, "gc", bad)
    args = check_copy(config, "offsite", None, ["web1"], None)
    assert (args.to, args.source, args.domains) == ("offsite", None, ["web1"])
    with pytest.raises(JobRefusedError, match="needs a target"):
        check_copy(config, None, None, None, None)
    with pytest.raises(JobRefusedError, match="both"):
        check_copy(config, "offsite", "offsite", None, None)
    with pytest.raises(JobRefusedError, match="backup_id"):
        check_copy(config, "offsite", None, None, "../../etc")
    with pytest.raises(JobRefusedError):
        check_copy(config, "offsite", None, [{"nested": ["deep"]}], None)
    job = check_copy_job(config, "n")
    assert (job.to, job.domains) == ("offsite", ["web1", "web2"])
    with pytest.raises(JobRefusedError, match="copy_jobs"):
        check_copy_job(config, "other")
    # The repository's own retention admits a queued prune of it, not of the primary.
    assert check_prune(config, {"keep_last": 3}, ["web1"], False, "offsite") == {"last": 3}
    with pytest.raises(JobRefusedError):
        check_prune(config, {"keep_last": 3}, ["web1"], False, None)
