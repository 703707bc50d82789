"""With a broker configured, the on-demand CLI commands run through the queue.

Each command is the real ``vmvault`` process; the work happens in a real Celery worker for
hv1 (which also serves the storage queue); output and exit codes are those of the
in-process commands.
"""

from __future__ import annotations

import json
import subprocess

from tests.fixtures.common import VENV_BIN
from tests.fixtures.qemu import MiB, VmFactory
from tests.fleet.conftest import Fleet
from vmvault.storage.repository import init_repository, open_repository


def _run(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "vmvault"), *args, "--config", str(fleet.config_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_commands_enqueue_and_follow(fleet: Fleet, qemu_vm_factory: VmFactory) -> None:
    vm = qemu_vm_factory(disk_sizes=[4 * MiB], name="web1")
    vm.write("vda", 1 * MiB, 256 * 1024, pattern=0x42)
    repo_url = f"file://{fleet.tmp / 'repo'}"
    init_repository(repo_url, chunk_size=1 * MiB).close()
    fleet.write(
        repository={"url": repo_url},
        domains={
            "web1": {"host": "hv1", "qmp": str(vm.qmp_path)},
            "ghost": {"host": "hv1", "qmp": str(fleet.tmp / "no-such.sock")},
        },
        # What the queued jobs below need from the worker's queue policy (worker.job_policy).
        worker={
            "restore_roots": [str(fleet.tmp)],
            "prune_policies": [{"keep_last": 1}],
            "gc_grace_seconds": 0,
        },
    )
    fleet.start_worker("hv1", "--storage")

    first = _run(fleet, "backup", "web1", "--json")
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)  # exactly one JSON document, the BackupResult
    assert (doc["domain"], doc["kind"]) == ("web1", "full")
    assert sum(d["bytes_read"] for d in doc["disks"]) >= 256 * 1024

    queued = _run(fleet, "backup", "web1", "--no-wait")
    assert queued.returncode == 0, queued.stderr
    job_id = queued.stdout.strip()
    second = fleet.wait_jobs([job_id])[job_id]
    assert second.state == "succeeded" and second.worker.startswith("hv1@")
    assert json.loads(second.result)["kind"] == "incremental"

    human = _run(fleet, "backup", "web1")
    assert human.returncode == 0, human.stderr
    assert "queued on host.hv1" in human.stderr
    assert "of web1: incremental" in human.stdout

    restored = _run(fleet, "restore", "web1", "--to", str(fleet.tmp / "r"), "--json")
    assert restored.returncode == 0, restored.stderr
    rdoc = json.loads(restored.stdout)
    assert rdoc["domain"] == "web1" and rdoc["disks"][0]["verified"] is True
    reference = vm.capture("vda", fleet.tmp / "ref.raw").read_bytes()
    out = subprocess.run(
        ["qemu-img", "convert", "-O", "raw", rdoc["disks"][0]["path"], str(fleet.tmp / "r.raw")],
        check=True,
    )
    assert out.returncode == 0
    assert (fleet.tmp / "r.raw").read_bytes() == reference

    verify = _run(fleet, "verify", "--read-data")
    assert verify.returncode == 0, verify.stderr
    assert "verify: 3 backups" in verify.stdout and ": OK" in verify.stdout

    pruned = _run(fleet, "prune", "web1", "--keep-last", "1", "--json")
    assert pruned.returncode == 0, pruned.stderr
    pdoc = json.loads(pruned.stdout)
    assert (pdoc["keep"], pdoc["remove"], len(pdoc["removed"])) == (1, 2, 2)
    with open_repository(repo_url) as repo:
        assert len(repo.list_manifests("web1")) == 1

    gc = _run(fleet, "gc", "--grace", "0", "--json")
    assert gc.returncode == 0, gc.stderr
    assert json.loads(gc.stdout)["backups"] == 1

    # A job that fails on the worker: same exit code (1) and the worker's message.
    ghost = _run(fleet, "backup", "ghost")
    assert ghost.returncode == 1
    assert "vmvault: error: backup job" in ghost.stderr and "failed on hv1@" in ghost.stderr
    assert "no-such.sock" in ghost.stderr

    jobs = json.loads(_run(fleet, "jobs", "--json").stdout)["jobs"]
    by_type = {(j["type"], j["state"]) for j in jobs}
    expected = {(t, "succeeded") for t in ("backup", "restore", "verify", "prune", "gc")}
    assert expected | {("backup", "failed")} <= by_type
