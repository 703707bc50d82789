"""A worker SIGKILLed in the middle of a backup: nothing corrupt, lock freed, job redelivered.

QEMU is frozen (SIGSTOP) as soon as the job reports its first pull progress, so the kill
lands while the fleecing export and NBD reads are in flight, every run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fixtures.common import wait_until
from tests.fixtures.qemu import MiB, QemuVm, VmFactory
from tests.fleet.conftest import Fleet
from vmvault.scheduler.enqueue import JobRequest, enqueue
from vmvault.storage.repository import init_repository, open_repository
from vmvault.storage.verify import verify
from vmvault.worker.jobs import JobStore
from vmvault.worker.redis_keys import DOMAIN_LOCK_PREFIX


def _restored(repo_url: str, domain: str, disk: str) -> bytes:
    with open_repository(repo_url) as repo:
        manifest = repo.latest_manifest(domain)
        assert manifest is not None
        out = bytearray(manifest.disk(disk).virtual_size)
        for offset, data in repo.read_disk(manifest, disk):
            if data is not None:
                out[offset : offset + len(data)] = data
    return bytes(out)


@dataclass
class _PullingBackup:
    """A backup job of ``web1`` caught in its pull phase on a fresh hv1 worker."""

    vm: QemuVm
    repo_url: str
    store: JobStore
    worker: subprocess.Popen[bytes]
    job_id: str


PULLED = 256 * MiB


def _backup_caught_pulling(
    fleet: Fleet, qemu_vm_factory: VmFactory, pattern: int, scheduler: dict[str, Any]
) -> _PullingBackup:
    """Start a worker and a backup of a VM; return once the job reports pulling.

    The disk is large enough (``PULLED`` of data) that an idle machine's pull still lasts
    long past the poll that catches it: a 32 MiB pull ended before the first poll.
    """
    vm = qemu_vm_factory(disk_sizes=[PULLED], name="web1")
    for off in range(0, PULLED, 16 * MiB):
        vm.write("vda", off, 16 * MiB, pattern=(pattern + off // MiB) % 256)
    repo_url = f"file://{fleet.tmp / 'repo'}"
    init_repository(repo_url, chunk_size=1 * MiB).close()
    fleet.write(
        repository={"url": repo_url},
        domains={"web1": {"host": "hv1", "qmp": str(vm.qmp_path)}},
        scheduler={"gc_interval_seconds": None, **scheduler},
    )
    store = JobStore(fleet.redis.client())
    worker = fleet.start_worker("hv1")
    request = JobRequest(type="backup", kwargs={"domain": "web1"}, domain="web1", host="hv1")
    job_id = enqueue(fleet.app(), store, [request])[0]

    def pulling() -> bool:
        rec = store.get(job_id)
        assert rec is not None and rec.state != "succeeded", "backup ended too early"
        return rec.phase.startswith("pull")

    wait_until(pulling, 30, "backup pulling")
    assert vm.proc is not None
    return _PullingBackup(vm, repo_url, store, worker, job_id)


def test_worker_killed_mid_backup(fleet: Fleet, qemu_vm_factory: VmFactory) -> None:
    scheduler = {
        "lock_ttl_seconds": 2,
        "job_time_limit_seconds": 8,
        "visibility_timeout_seconds": 10,
    }
    job = _backup_caught_pulling(fleet, qemu_vm_factory, 0x20, scheduler)
    vm, repo_url, store, worker, job_id = job.vm, job.repo_url, job.store, job.worker, job.job_id
    assert vm.proc is not None
    client = fleet.redis.client()
    request = JobRequest(type="backup", kwargs={"domain": "web1"}, domain="web1", host="hv1")
    os.kill(vm.proc.pid, signal.SIGSTOP)  # reads stall: the job is surely mid-pull
    # Progress is in Celery's task state too (update_state), for any Celery client.
    state = fleet.app().AsyncResult(job_id)
    assert state.state == "PROGRESS"
    assert state.info["phase"] == "pull vda" and state.info["total"] == PULLED
    try:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
    finally:
        os.kill(vm.proc.pid, signal.SIGCONT)
    killed_at = time.monotonic()
    rec = store.get(job_id)
    assert rec is not None and rec.state == "running"
    # The dead job wrote no manifest: its backup does not exist.
    with open_repository(repo_url) as repo:
        assert repo.list_manifests("web1") == []
    # Nobody renews the domain lease any more: it frees after its TTL.
    assert client.exists(DOMAIN_LOCK_PREFIX + "web1")
    wait_until(lambda: not client.exists(DOMAIN_LOCK_PREFIX + "web1"), 5, "lease expiry")
    assert time.monotonic() - killed_at < 4

    # A new worker cleans the host's leftovers, then Redis redelivers the unacked job.
    fleet.start_worker("hv1")
    done = fleet.wait_jobs([job_id], timeout=60)[job_id]
    assert done.state == "succeeded", done
    # The whole log: Celery's banner (one line per task) follows the reaper's line, so a
    # tail of it may not reach back that far.
    log = (fleet.tmp / "worker-hv1.log").read_text(errors="replace")
    assert "cleaned leftovers" in log or '"leftovers_removed": true' in done.result
    # The next backup is correct, byte for byte.
    vm.write("vda", 5 * MiB, 64 * 1024, pattern=0x77)
    nxt = enqueue(fleet.app(), store, [JobRequest(**{**request.__dict__, "job_id": "next"})])
    assert fleet.wait_jobs(nxt)["next"].state == "succeeded"
    reference = vm.capture("vda", fleet.tmp / "vda.raw").read_bytes()
    assert _restored(repo_url, "web1", "vda") == reference
    with open_repository(repo_url) as repo:
        assert len(repo.list_manifests("web1")) == 2
        assert verify(repo, read_data=True).ok


def test_job_that_loses_its_lock_stops_without_committing(
    fleet: Fleet, qemu_vm_factory: VmFactory
) -> None:
    job = _backup_caught_pulling(fleet, qemu_vm_factory, 0x30, {"lock_ttl_seconds": 1.5})
    vm, repo_url, job_id = job.vm, job.repo_url, job.job_id
    assert vm.proc is not None
    client = fleet.redis.client()
    os.kill(vm.proc.pid, signal.SIGSTOP)
    try:
        # Another owner takes the domain (e.g. an operator, or a failover lost the key).
        client.set(DOMAIN_LOCK_PREFIX + "web1", "someone-else")
        time.sleep(1.0)  # > ttl/3: the renewal has noticed
    finally:
        os.kill(vm.proc.pid, signal.SIGCONT)
    done = fleet.wait_jobs([job_id], timeout=30)[job_id]
    assert done.state == "failed"
    assert "lease lost" in done.error
    # Celery's own result backend agrees with the registry.
    assert fleet.app().AsyncResult(job_id).state == "FAILURE"
    # The job stopped before its commit and left the other owner's key alone.
    with open_repository(repo_url) as repo:
        assert repo.list_manifests("web1") == []
    assert client.get(DOMAIN_LOCK_PREFIX + "web1") == b"someone-else"


def test_warm_shutdown_finishes_the_running_backup(
    fleet: Fleet, qemu_vm_factory: VmFactory
) -> None:
    job = _backup_caught_pulling(fleet, qemu_vm_factory, 0x40, {})
    vm, repo_url, store, worker, job_id = job.vm, job.repo_url, job.store, job.worker, job.job_id
    assert vm.proc is not None
    os.kill(vm.proc.pid, signal.SIGSTOP)
    try:
        # `docker stop` (and systemd with KillMode=mixed) signal the main process only.
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert worker.poll() is None  # still finishing the job
    finally:
        os.kill(vm.proc.pid, signal.SIGCONT)
    assert worker.wait(30) == 0
    done = store.get(job_id)
    assert done is not None and done.state == "succeeded", done
    result = fleet.app().AsyncResult(job_id)
    assert result.state == "SUCCESS"
    assert result.result["backup_id"] == json.loads(done.result)["backup_id"]
    with open_repository(repo_url) as repo:
        assert [m.backup_id for m in repo.list_manifests("web1")] == [
            json.loads(done.result)["backup_id"]
        ]


def _pool_processes(worker: subprocess.Popen[bytes]) -> list[int]:
    """Pids of the worker's Celery pool processes (its children)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == worker.pid:
            children.append(int(stat.parent.name))
    return children


def _fleecing_left(vm: QemuVm) -> bool:
    """True while a vmvault filter sits in front of the guest's disk."""
    return any(
        str(dev.get("inserted", {}).get("node-name", "")).startswith("vmv-")
        for dev in vm.ctl.query_block()
    )


def test_reaper_removes_a_killed_jobs_fleecing_without_a_new_job(
    fleet: Fleet, qemu_vm_factory: VmFactory
) -> None:
    # The dead job's Redis lease (60 s TTL) keeps its redelivered message waiting: only
    # the reaper can be what cleans up within the test's bound.
    job = _backup_caught_pulling(fleet, qemu_vm_factory, 0x50, {"reaper_interval_seconds": 1})
    vm = job.vm
    assert vm.proc is not None
    os.kill(vm.proc.pid, signal.SIGSTOP)  # reads stall: the job is surely mid-pull
    try:
        (pool,) = _pool_processes(job.worker)
        os.kill(pool, signal.SIGKILL)
    finally:
        os.kill(vm.proc.pid, signal.SIGCONT)
    assert _fleecing_left(vm)
    wait_until(lambda: not _fleecing_left(vm), 20, "the reaper to remove the fleecing")
    assert vm.ctl.block_exports() == []
    assert not [n.node_name for n in vm.ctl.named_block_nodes() if n.node_name.startswith("vmv-")]
    # The pass logs once it has finished every step, a moment after the filter is gone.
    reported = "reaper: removed leftovers"
    wait_until(lambda: reported in fleet.log("worker-hv1.log"), 20, "the reaper's report")
    assert job.worker.poll() is None  # the worker itself lives on


def test_sigterm_to_the_pool_process_tears_the_job_down(
    fleet: Fleet, qemu_vm_factory: VmFactory
) -> None:
    # systemd's default KillMode=control-group signals every process of the worker.
    job = _backup_caught_pulling(fleet, qemu_vm_factory, 0x60, {"reaper_interval_seconds": 3600})
    vm = job.vm
    assert vm.proc is not None
    os.kill(vm.proc.pid, signal.SIGSTOP)
    try:
        (pool,) = _pool_processes(job.worker)
        os.kill(pool, signal.SIGTERM)
        time.sleep(0.5)
    finally:
        os.kill(vm.proc.pid, signal.SIGCONT)
    done = fleet.wait_jobs([job.job_id], timeout=60)[job.job_id]
    assert done.state == "failed" and "SIGTERM" in done.error, done
    # The job removed what it had set up itself (the reaper waits an hour here).
    assert not _fleecing_left(vm)
    assert vm.ctl.block_exports() == [] and vm.ctl.query_status() == "running"
    with open_repository(job.repo_url) as repo:
        assert repo.list_manifests("web1") == []
