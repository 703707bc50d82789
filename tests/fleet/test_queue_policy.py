"""A worker refuses queued jobs outside its policy: recorded as failed, nothing touched.

Whoever can write to Redis can put any message on a queue, so these tests send jobs the
way an intruder would (``send_task`` with hand-made arguments, registered or not) to real
Celery workers, and check the job registry, the file system and the repository after. The
in-process CLI (no broker) keeps the operator's full powers.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.common import VENV_BIN
from tests.fleet.conftest import Fleet
from tests.storage.helpers import image, write_full
from vmvault.scheduler.enqueue import TASK_NAMES, JobRequest, enqueue
from vmvault.storage.repository import Repository, init_repository, open_repository
from vmvault.worker.jobs import JobRecord, JobStore

SIZE = 256 * 1024


@pytest.fixture
def repo(fleet: Fleet) -> Repository:
    """The fleet's file:// repository with three backups of web1 and of db1."""
    repository = init_repository(fleet.data["repository"]["url"], chunk_size=64 * 1024)
    for seed in range(3):
        write_full(repository, "web1", {"vda": image(SIZE, seed)})
        write_full(repository, "db1", {"vda": image(SIZE, 10 + seed)})
    fleet.write(
        schedules={
            "nightly": {"cron": "0 2 * * *", "domains": ["web*"], "retention": {"keep_last": 2}}
        }
    )
    return repository


def _send(fleet: Fleet, job_type: str, kwargs: dict[str, Any], register: bool = True) -> str:
    """Put a job on its queue as anyone with broker access could (registered or not)."""
    domain = kwargs.get("domain") if job_type == "restore" else None
    host = "hv1" if domain else None
    request = JobRequest(type=job_type, kwargs=kwargs, domain=domain, host=host)
    if register:
        return enqueue(fleet.app(), JobStore(fleet.redis.client()), [request])[0]
    queue = request.target_queue
    fleet.app().send_task(
        TASK_NAMES[job_type],
        kwargs=kwargs,
        task_id=request.job_id,
        queue=queue,
        routing_key=queue,
        ignore_result=True,
    )
    return request.job_id


def _refused(record: JobRecord, rule: str) -> None:
    assert record.state == "failed", record
    assert record.error.startswith("JobRefusedError: "), record.error
    assert rule in record.error, record.error
    assert "\n" not in record.error
    # Refused before it started: never marked running, never took the domain lease.
    assert not record.started


def _images(fleet: Fleet) -> Path:
    return Path(fleet.data["state_dir"]) / "images"


def test_queued_restores_outside_policy_are_refused_and_touch_nothing(
    fleet: Fleet, repo: Repository
) -> None:
    outside = fleet.tmp / "outside"
    precious = _images(fleet) / "web1" / "vda.qcow2"
    precious.parent.mkdir(parents=True)
    precious.write_bytes(b"the domain's own disk")
    fleet.start_worker("hv1")
    jobs = {
        "outside": _send(fleet, "restore", {"domain": "web1", "to_dir": str(outside)}),
        "dotdot": _send(
            fleet, "restore", {"domain": "web1", "to_dir": f"{_images(fleet)}/../escape"}
        ),
        "force": _send(
            fleet, "restore", {"domain": "web1", "to_dir": str(precious.parent), "force": True}
        ),
        "disks": _send(
            fleet,
            "restore",
            {"domain": "web1", "to_dir": str(_images(fleet) / "r"), "disks": ["../../vda"]},
        ),
        "unregistered": _send(
            fleet, "restore", {"domain": "web1", "to_dir": str(outside), "force": True}, False
        ),
        # Within policy: proves the worker is alive and the policy admits a normal restore.
        "ok": _send(fleet, "restore", {"domain": "web1", "to_dir": str(_images(fleet) / "ok")}),
    }
    records = fleet.wait_jobs(list(jobs.values()), timeout=120)
    got = {name: records[job_id] for name, job_id in jobs.items()}
    _refused(got["outside"], "restore refused by worker.restore_roots: ")
    _refused(got["dotdot"], "restore refused by worker.restore_roots: ")
    _refused(got["force"], "restore refused by worker.allow_force_from_queue: ")
    _refused(got["disks"], "restore refused (job arguments): bad disks")
    _refused(got["unregistered"], "restore refused by worker.")
    assert got["ok"].state == "succeeded", got["ok"]
    assert (_images(fleet) / "ok" / "vda.qcow2").is_file()
    # Nothing touched: no target directory made, the existing image unchanged.
    assert not outside.exists()
    assert not (_images(fleet).parent / "escape").exists()
    assert not (_images(fleet) / "r").exists()
    assert precious.read_bytes() == b"the domain's own disk"
    # A job nobody registered still shows in `vmvault jobs`, with what it was.
    listed = {r.id: r for r in JobStore(fleet.redis.client()).recent(50)}
    intruder = listed[jobs["unregistered"]]
    assert (intruder.type, intruder.domain, intruder.state) == ("restore", "web1", "failed")
    assert "refused" in fleet.log("worker-hv1.log")


def test_queued_force_restore_is_admitted_when_the_worker_allows_it(
    fleet: Fleet, repo: Repository
) -> None:
    target = _images(fleet) / "web1"
    target.mkdir(parents=True)
    (target / "vda.qcow2").write_bytes(b"old")
    fleet.write(worker={"allow_force_from_queue": True})
    fleet.start_worker("hv1")
    job = _send(fleet, "restore", {"domain": "web1", "to_dir": str(target), "force": True})
    record = fleet.wait_jobs([job], timeout=120)[job]
    assert record.state == "succeeded", record
    assert (target / "vda.qcow2").read_bytes()[:4] == b"QFI\xfb"


def test_queued_prune_gc_verify_outside_policy_are_refused(fleet: Fleet, repo: Repository) -> None:
    fleet.start_worker("hv1", "--storage")
    jobs = {
        "invented": _send(fleet, "prune", {"policy": {"keep_last": 1}, "domains": ["web1"]}),
        "all": _send(fleet, "prune", {"policy": {"keep_last": 2}, "domains": None}),
        "other-domain": _send(fleet, "prune", {"policy": {"keep_last": 2}, "domains": ["db1"]}),
        "gc-grace": _send(fleet, "gc", {"grace": 0}),
        "verify-id": _send(fleet, "verify", {"backup_id": "../../config"}),
    }
    records = fleet.wait_jobs(list(jobs.values()), timeout=120)
    got = {name: records[job_id] for name, job_id in jobs.items()}
    _refused(got["invented"], "prune refused by worker.prune_policies: keep_last: 1 for web1")
    _refused(got["all"], "prune refused by worker.prune_policies: ")
    _refused(got["other-domain"], "prune refused by worker.prune_policies: ")
    _refused(got["gc-grace"], "gc refused by worker.gc_grace_seconds: ")
    _refused(got["verify-id"], "verify refused (job arguments): bad backup_id")
    with open_repository(fleet.data["repository"]["url"]) as check:
        assert len(check.list_manifests("web1")) == 3
        assert len(check.list_manifests("db1")) == 3
    # The schedule's own retention, and a gc with the default grace, still run (one after
    # the other: together, the gc would wait 30 s for the prune's repository lock).
    for job_type, kwargs in (
        ("prune", {"policy": {"keep_last": 2}, "domains": ["web1"]}),
        ("gc", {}),
    ):
        job_id = _send(fleet, job_type, kwargs)
        record = fleet.wait_jobs([job_id], timeout=120)[job_id]
        assert record.state == "succeeded", record
    with open_repository(fleet.data["repository"]["url"]) as check:
        assert len(check.list_manifests("web1")) == 2
        assert len(check.list_manifests("db1")) == 3


def _cli(fleet: Fleet, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "vmvault"), *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, VMVAULT_CONFIG=str(config)),
    )


def test_cli_through_the_broker_gets_the_refusal_as_one_line(
    fleet: Fleet, repo: Repository
) -> None:
    fleet.start_worker("hv1", "--storage")
    outside = fleet.tmp / f"outside-{uuid.uuid4().hex[:6]}"
    out = _cli(fleet, fleet.config_file, "restore", "web1", "--to", str(outside))
    assert out.returncode == 1, out
    assert "worker.restore_roots" in out.stderr and "Traceback" not in out.stderr
    assert not outside.exists()
    out = _cli(fleet, fleet.config_file, "prune", "web1", "--keep-last", "1")
    assert out.returncode == 1, out
    assert "worker.prune_policies" in out.stderr and "Traceback" not in out.stderr
    out = _cli(fleet, fleet.config_file, "gc", "--grace", "0")
    assert out.returncode == 1, out
    assert "worker.gc_grace_seconds" in out.stderr
    with open_repository(fleet.data["repository"]["url"]) as check:
        assert len(check.list_manifests("web1")) == 3


def test_local_cli_without_broker_keeps_its_powers(fleet: Fleet, repo: Repository) -> None:
    data = {k: v for k, v in fleet.data.items() if k != "broker"}
    local = fleet.tmp / "local.yaml"
    local.write_text(__import__("yaml").safe_dump(data))
    outside = fleet.tmp / "outside"
    outside.mkdir()
    (outside / "vda.qcow2").write_bytes(b"old")
    out = _cli(fleet, local, "restore", "web1", "--to", str(outside), "--force")
    assert out.returncode == 0, out.stderr
    assert (outside / "vda.qcow2").read_bytes()[:4] == b"QFI\xfb"
    out = _cli(fleet, local, "prune", "web1", "--keep-last", "1")
    assert out.returncode == 0, out.stderr
    out = _cli(fleet, local, "gc", "--grace", "0")
    assert out.returncode == 0, out.stderr
    with open_repository(fleet.data["repository"]["url"]) as check:
        assert len(check.list_manifests("web1")) == 1
