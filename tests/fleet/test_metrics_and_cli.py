"""Metrics from Redis counters and live queues; ``vmvault jobs/status/scheduler`` output."""

from __future__ import annotations

import json
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.common import VENV_BIN, free_port
from tests.fleet.conftest import Fleet
from vmvault.scheduler.enqueue import JobRequest, enqueue
from vmvault.storage.repository import init_repository
from vmvault.worker.jobs import JobStore
from vmvault.worker.metrics import byte_counts, queue_depths, record_job, serve


def _vmvault(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "vmvault"), *args, "--config", str(fleet.config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_byte_counts_from_backup_and_restore_results() -> None:
    backup = {"disks": [{"bytes_read": 10, "bytes_uploaded": 4}, {"bytes_read": 5}]}
    assert byte_counts(backup) == {"read": 15, "uploaded": 4}
    restore = {"bytes_written": 7, "disks": [{"bytes_written": 7}]}
    assert byte_counts(restore) == {"restored": 7}
    assert byte_counts({"ok": True}) == {}


def test_metrics_endpoint_serves_fleet_counters_and_queue_depth(fleet: Fleet) -> None:
    client = fleet.redis.client()
    result = {"disks": [{"bytes_read": 3 * 2**20, "bytes_uploaded": 2**20}]}
    record_job(client, "backup", "succeeded", 2.5, "web1", 1_700_000_000.0, result)
    record_job(client, "backup", "failed", 0.5, "db1", 1_700_000_100.0)
    record_job(client, "restore", "succeeded", 4.0, "web1", 1_700_000_200.0)
    # Two backups and a restore waiting on hv1 (different priority lists), one gc on storage.
    store = JobStore(client)
    enqueue(
        fleet.app(),
        store,
        [
            JobRequest(type="backup", kwargs={"domain": "web1"}, domain="web1", host="hv1"),
            JobRequest(type="backup", kwargs={"domain": "web2"}, domain="web2", host="hv1"),
            JobRequest(type="restore", kwargs={"domain": "web1"}, domain="web1", host="hv1"),
            JobRequest(type="gc", kwargs={}),
        ],
    )
    assert queue_depths(client, ["host.hv1", "host.hv2", "storage"]) == {
        "host.hv1": 3,
        "host.hv2": 0,
        "storage": 1,
    }
    port = free_port()
    serve(client, ["host.hv1", "host.hv2", "storage"], port, addr="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("vmvault_jobs_total", (("outcome", "succeeded"), ("type", "backup")))] == 1
    assert samples[("vmvault_jobs_total", (("outcome", "failed"), ("type", "backup")))] == 1
    assert samples[("vmvault_job_duration_seconds_sum", (("type", "backup"),))] == 3.0
    assert samples[("vmvault_job_duration_seconds_count", (("type", "backup"),))] == 2
    assert samples[("vmvault_bytes_total", (("direction", "read"),))] == 3 * 2**20
    assert samples[("vmvault_last_success_timestamp_seconds", (("domain", "web1"),))] == (
        1_700_000_000.0
    )
    # A failed backup is not a success: db1 has no last-success sample.
    assert ("vmvault_last_success_timestamp_seconds", (("domain", "db1"),)) not in samples
    assert samples[("vmvault_queue_depth", (("queue", "host.hv1"),))] == 3
    assert samples[("vmvault_redis_up", ())] == 1


def test_scheduler_once_jobs_and_status_commands(fleet: Fleet) -> None:
    repo_url = f"file://{fleet.tmp / 'repo'}"
    init_repository(repo_url).close()
    fleet.write(
        repository={"url": repo_url},
        schedules={"nightly": {"cron": "0 2 * * *", "domains": ["web*"]}},
        hosts={"hv1": {"max_concurrent": 2}},
    )
    tick = _vmvault(fleet, "scheduler", "--once", "--json")
    assert tick.returncode == 0, tick.stderr
    doc = json.loads(tick.stdout)
    assert doc["leader"] is True
    # Web backups of today's (or, before 02:00, yesterday's) slot, plus the periodic GC.
    backups = sorted(j for j in doc["enqueued"] if j.startswith("backup-"))
    assert [j.rsplit("-", 1)[1] for j in backups] == ["web1", "web2"]
    assert any(j.startswith("gc-") for j in doc["enqueued"])
    jobs = _vmvault(fleet, "jobs", "--json")
    assert jobs.returncode == 0, jobs.stderr
    listed = {j["id"]: j for j in json.loads(jobs.stdout)["jobs"]}
    assert set(doc["enqueued"]) == set(listed)
    web1 = listed[backups[0]]
    assert (web1["state"], web1["host"], web1["domain"], web1["queue"]) == (
        "queued",
        "hv1",
        "web1",
        "host.hv1",
    )
    human = _vmvault(fleet, "jobs")
    assert human.returncode == 0 and "web1" in human.stdout and "queued" in human.stdout
    status = _vmvault(fleet, "status", "--json")
    assert status.returncode == 0, status.stderr
    rows = {r["domain"]: r for r in json.loads(status.stdout)["domains"]}
    # No backup yet: scheduled domains are overdue, unscheduled db1 is not.
    assert rows["web1"]["overdue"] is True and rows["web1"]["last_success"] is None
    assert rows["db1"]["overdue"] is False and rows["db1"]["schedules"] == []
    # --once gives the lease back when it is done.
    assert json.loads(status.stdout)["leader"] is None


def test_fleet_commands_need_a_broker(fleet: Fleet) -> None:
    data = dict(fleet.data)
    data.pop("broker")
    fleet.data = data
    fleet.write()
    out = _vmvault(fleet, "jobs")
    assert out.returncode == 2
    assert "broker: required for 'vmvault jobs'" in out.stderr
    out = _vmvault(fleet, "worker", "--host", "hv9")
    assert out.returncode == 2


def test_worker_rejects_unknown_host(fleet: Fleet) -> None:
    out = _vmvault(fleet, "worker", "--host", "hv9")
    assert out.returncode == 2
    assert "--host hv9: no domain runs on this host (hosts in the config: hv1, hv2)" in out.stderr
