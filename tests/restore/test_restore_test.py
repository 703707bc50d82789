"""Restore tests (worker/restore_test.py) with a real QEMU (TCG, no guest OS): the latest
backup restored into a scratch directory, started isolated and paused, thrown away; a
killed test's QEMU and files are removed by ``clean_restore_tests``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.common import wait_until
from tests.restore.conftest import MiB, make_image, short_tmp, write_backup
from vmvault.scheduler import blank_vm
from vmvault.storage.repository import init_repository
from vmvault.storage.verification import failed_checks, new_check, read_record, record_check
from vmvault.worker.config import parse_config
from vmvault.worker.locks import DomainBusyError, domain_lock
from vmvault.worker.reaper import reap_host
from vmvault.worker.restore_test import clean_restore_tests, run_restore_test, scratch_root

NET = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]


def _setup(tmp_path: Path) -> tuple[dict[str, object], Path, str]:
    state = short_tmp()
    url = f"file://{tmp_path}/repo"
    with init_repository(url, chunk_size=256 * 1024) as repo:
        m = write_backup(repo, "web1", {"vda": make_image(tmp_path / "vda", 2 * MiB, 1, [])})
    data: dict[str, object] = {
        "repository": {"url": url},
        "state_dir": str(state),
        "domains": {
            "web1": {
                "host": "hv1",
                "qmp": str(state / "web1.qmp"),
                "launch": {"argv": [*blank_vm.launch_argv(["vda"]), *NET]},
            }
        },
    }
    return data, state, m.backup_id


def _qemus_under(path: Path) -> list[int]:
    """Pids of processes whose command line names ``path`` (the test QEMUs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(path).encode() in cmdline and b"qemu-system" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_restore_test_passes_and_leaves_nothing(tmp_path: Path) -> None:
    data, state, backup_id = _setup(tmp_path)
    # The live domain's serial log: a clone writing the same path would truncate it.
    live_log = tmp_path / "web1.console"
    live_log.write_text("the live domain's console\n")
    serial = ["-chardev", f"file,id=con,path={live_log}", "-serial", "chardev:con"]
    data["domains"]["web1"]["launch"]["argv"] += serial  # type: ignore[index]
    try:
        config = parse_config(data, "test")
        out = run_restore_test(config, "web1", timeout=30)
        assert out["ok"] is True, out
        assert out["status"] == "prelaunch"  # -S: the restored guest never ran
        assert out["backup_id"] == backup_id
        assert list(scratch_root(state).iterdir()) == []
        assert _qemus_under(state) == []
        with config.repository.open() as repo:
            record = read_record(repo, "web1", backup_id)
        assert record is not None and record.latest.ok and record.latest.kind == "restore-test"
        assert live_log.read_text() == "the live domain's console\n"
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_a_broken_launch_is_recorded_as_failed(tmp_path: Path) -> None:
    data, state, backup_id = _setup(tmp_path)
    try:
        data["domains"]["web1"]["launch"]["argv"].append("-no-such-option")  # type: ignore[index]
        config = parse_config(data, "test")
        out = run_restore_test(config, "web1", timeout=30)
        assert out["ok"] is False and "no-such-option" in out["problems"][0]
        assert list(scratch_root(state).iterdir()) == [] and _qemus_under(state) == []
        with config.repository.open() as repo:
            record = read_record(repo, "web1", backup_id)
        assert record is not None and not record.latest.ok
        assert record.summary().startswith("FAILED") and "(restore-test)" in record.summary()
    finally:
        shutil.rmtree(state, ignore_errors=True)


CHILD = """
import sys, time
import vmvault.worker.restore_test as rt
from vmvault.worker.config import load_config
rt.connect_qmp = lambda process: time.sleep(3600)  # hold the test while QEMU runs
rt.run_restore_test(load_config(sys.argv[1]), "web1", timeout=30)
"""


def test_killed_restore_test_is_cleaned_up(tmp_path: Path) -> None:
    data, state, _ = _setup(tmp_path)
    cfg = tmp_path / "vmvault.yaml"
    cfg.write_text(yaml.safe_dump(data))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(cfg)])
    try:
        root = scratch_root(state)
        wait_until(lambda: any(root.glob("*/qmp")), 60, "the test QEMU's QMP socket")
        (scratch,) = list(root.iterdir())
        qemu = int((scratch / "pid").read_text())
        assert _qemus_under(state) == [qemu]
        # While the test runs, its directory is not touched.
        assert clean_restore_tests(state) == 0 and scratch.is_dir()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert _qemus_under(state) == [qemu]  # its own session: it outlived the test
        # The worker's reaper finds it (worker/reaper.py).
        assert reap_host(parse_config(data, "test"), "hv1") == 1
        assert not scratch.exists()
        wait_until(lambda: not _qemus_under(state), 10, "the test QEMU gone")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        for pid in _qemus_under(state):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(state, ignore_errors=True)


def test_a_busy_domain_gives_no_verdict(tmp_path: Path) -> None:
    data, state, backup_id = _setup(tmp_path)
    try:
        config = parse_config(data, "test")
        with domain_lock(state, "web1", job="backup"), pytest.raises(DomainBusyError):
            run_restore_test(config, "web1", timeout=30)
        assert list(scratch_root(state).iterdir()) == []
        with config.repository.open() as repo:
            assert read_record(repo, "web1", backup_id) is None  # nothing recorded
            # A failed restore test is reported, but does not force the next backup full.
            record_check(repo, "web1", backup_id, new_check("restore-test", ["port in use"]))
            assert failed_checks(repo, "web1") == {}
            record_check(repo, "web1", backup_id, new_check("data", ["chunk x is missing"]))
            assert set(failed_checks(repo, "web1")) == {backup_id}
    finally:
        shutil.rmtree(state, ignore_errors=True)
