"""A live restore through the fleet: a restore job on the domain's host with a real worker.

``vmvault restore web1 --live --no-wait`` enqueues it on ``host.hv1``; the worker starts
the domain's QEMU (it outlives the job) and copies the backup in; the job's progress is
the copy's, the guest runs while the job does, and the job's result is the live
restore's document. Queue policy: live goes with neither incoming nor disks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.fixtures.qemu import MiB, VmFactory
from tests.fleet.conftest import Fleet
from vmvault.scheduler import blank_vm
from vmvault.scheduler.cli import main
from vmvault.storage.repository import init_repository
from vmvault.worker import qemu_img
from vmvault.worker.backup import run_backup
from vmvault.worker.jobs import JobStore
from vmvault.worker.qmp import QmpSession, open_session, socket_is_listening

SIZE = 8 * MiB


def test_queued_live_restore_runs_on_the_domains_host(
    fleet: Fleet,
    qemu_vm_factory: VmFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    vm = qemu_vm_factory(disk_sizes=[SIZE], name="web1")
    ctl = Path(fleet.data["state_dir"]) / "ctl.sock"
    fleet.data["domains"]["web1"] = {
        "host": "hv1",
        "qmp": str(vm.qmp_path),
        "launch": {"argv": blank_vm.launch_argv(["vda"], str(ctl), name="web1")},
    }
    config = fleet.write()
    init_repository(config.repository.url).close()
    vm.write("vda", 0, 3 * MiB, 0x21)
    backup = run_backup(config, "web1")
    reference = vm.capture("vda", tmp_path / "ref.raw").read_bytes()
    vm.stop()
    fleet.start_worker("hv1")
    base = ["--config", str(fleet.config_file)]
    # A usage error is caught before anything is sent.
    assert main(["restore", "web1", "--live", "--disk", "vda", *base]) == 2
    capsys.readouterr()

    with pytest.raises(SystemExit) as exited:
        main(["restore", "web1", "--live", "--speed", "1M", "--no-wait", "--json", *base])
    assert exited.value.code == 0
    job_id = json.loads(capsys.readouterr().out)["job_id"]
    store = JobStore(fleet.redis.client())
    qemu_pid = 0
    try:
        # While the job runs, the guest runs and the job shows the copy's progress.
        deadline = time.monotonic() + 60
        while True:
            record = store.get(job_id)
            assert record is not None
            assert record.state not in ("failed", "succeeded"), record
            if record.state == "running" and record.phase == "copy vda" and ctl.exists():
                break
            assert time.monotonic() < deadline, record
            time.sleep(0.05)
        session = QmpSession("web1", ctl)
        session.connect()
        try:
            assert session.query_status() == "running"
            assert record.done < record.total == SIZE
        finally:
            session.close()
        [done] = fleet.wait_jobs([job_id]).values()
        assert done.state == "succeeded", done.error
        result = json.loads(done.result)
        qemu_pid = result["qemu_pid"]
        assert result["mode"] == "live" and result["backup_id"] == backup.backup_id
        assert result["bytes_streamed"] == SIZE
        [disk] = result["disks"]
        assert disk["path"] == str(config.incoming_image_dir("web1") / "vda.qcow2")
        qemu_img.to_raw(Path(disk["path"]), tmp_path / "now.raw", "qcow2")
        assert (tmp_path / "now.raw").read_bytes() == reference
        after = run_backup(config, "web1")
        assert after.kind == "incremental" and after.parent == backup.backup_id, after.reason
    finally:
        if qemu_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu_pid, signal.SIGKILL)
        elif socket_is_listening(ctl):
            # The job failed after starting the QEMU: it outlives the job, stop it here.
            with contextlib.suppress(Exception), open_session("web1", ctl) as session:
                session.execute("quit")
