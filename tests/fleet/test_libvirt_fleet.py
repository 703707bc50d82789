"""A libvirt domain in the fleet: its backup job goes to its host's worker, like any other."""

from __future__ import annotations

import json

from tests.fixtures.libvirt import KiB, LibvirtVmFactory, MiB
from tests.fleet.conftest import Fleet
from vmvault.scheduler.enqueue import JobRequest, enqueue
from vmvault.storage.repository import init_repository, open_repository
from vmvault.worker.jobs import JobStore


def test_a_libvirt_domain_is_backed_up_by_its_hosts_worker(
    fleet: Fleet, libvirt_vm_factory: LibvirtVmFactory
) -> None:
    vm = libvirt_vm_factory(disk_sizes=[16 * MiB], name="flv")
    vm.write("vda", 0, 256 * KiB, 0x41)
    repo_url = f"file://{fleet.tmp / 'repo'}"
    init_repository(repo_url, chunk_size=1 * MiB).close()
    fleet.write(
        repository={"url": repo_url},
        domains={
            "web1": {"host": "hv1", "qmp": "/run/vmv/web1.qmp"},
            "lv": {"host": "hv2", "libvirt": {"uri": vm.daemon.uri, "name": vm.name}},
        },
        scheduler={"gc_interval_seconds": None},
    )
    store = JobStore(fleet.redis.client())
    fleet.start_worker("hv2")  # only the libvirt domain's host has a worker
    requests = [
        JobRequest(type="backup", kwargs={"domain": "lv"}, domain="lv", host="hv2"),
        JobRequest(type="backup", kwargs={"domain": "lv"}, domain="lv", host="hv2"),
    ]
    ids = enqueue(fleet.app(), store, requests[:1])
    first = fleet.wait_jobs(ids)[ids[0]]
    assert first.state == "succeeded", fleet.log("worker-hv2.log")
    vm.write("vda", 8 * MiB, 64 * KiB, 0x42)
    ids = enqueue(fleet.app(), store, requests[1:])
    second = fleet.wait_jobs(ids)[ids[0]]
    assert second.state == "succeeded", fleet.log("worker-hv2.log")
    result = json.loads(second.result)
    assert result["kind"] == "incremental"
    assert [d["dirty_bytes"] for d in result["disks"]] == [64 * KiB]
    with open_repository(repo_url) as repo:
        assert [m.backup_id for m in repo.list_manifests("lv")][-1] == result["backup_id"]
