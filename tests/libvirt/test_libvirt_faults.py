"""A libvirt backup killed mid-pull, and a domain busy with a job someone else runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fixtures.libvirt import KiB, MiB
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.test_libvirt_backup import restore_raw
from vmvault.worker.backup import DomainStateError, run_backup
from vmvault.worker.libvirt_backup import checkpoint_name
from vmvault.worker.libvirt_domain import LibvirtDisk, open_domain
from vmvault.worker.locks import DomainBusyError
from vmvault.worker.reaper import reap_host


def _run_killed(env: LibvirtEnv) -> None:
    """A backup in another process that SIGKILLs itself at its first progress report
    (the pull has begun: libvirt's backup job runs, its scratch files exist)."""
    cfg = env.tmp / "vmvault.yaml"
    cfg.write_text(json.dumps(env.config.model_dump(mode="json")))
    script = textwrap.dedent(
        f"""
        import os, signal
        from vmvault.worker.config import load_config
        from vmvault.worker.backup import run_backup
        def die(phase, done, total):
            os.kill(os.getpid(), signal.SIGKILL)
        run_backup(load_config({str(cfg)!r}), "lv", progress=die)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_backup_then_the_next_backup_is_correct_and_leaves_no_job(
    libvirt_env: LibvirtEnv,
) -> None:
    env, vm = libvirt_env, libvirt_env.vm
    vm.write("vda", 0, 2 * MiB, 0x81)
    full = run_backup(env.config, "lv")
    vm.write("vda", 4 * MiB, 64 * KiB, 0x82)
    _run_killed(env)
    # The dead job's libvirt backup job and scratch files are still there.
    assert vm.job_type() != 0
    assert list((env.config.state_dir / "scratch").glob("*/*"))

    vm.write("vdb", 1 * MiB, 64 * KiB, 0x83)
    result = run_backup(env.config, "lv")
    assert result.leftovers_removed
    # Diffed from the last committed backup: both writes since it are in.
    assert result.kind == "incremental" and result.parent == full.backup_id
    assert {d.name: d.dirty_bytes for d in result.disks} == {"vda": 64 * KiB, "vdb": 64 * KiB}
    assert restore_raw(env, result.backup_id) == env.capture()
    assert vm.job_type() == 0
    assert not list((env.config.state_dir / "scratch").glob("*/*"))
    assert vm.checkpoints() == [checkpoint_name(result.checkpoint)]


def test_the_reaper_ends_the_job_a_killed_backup_left(libvirt_env: LibvirtEnv) -> None:
    env, vm = libvirt_env, libvirt_env.vm
    vm.write("vda", 0, 1 * MiB, 0x91)
    _run_killed(env)
    assert vm.job_type() != 0
    assert reap_host(env.config, "hv1") == 1
    assert vm.job_type() == 0
    assert not list((env.config.state_dir / "scratch").glob("*/*"))
    assert reap_host(env.config, "hv1") == 0  # nothing left: no marker, nothing looked at
    result = run_backup(env.config, "lv")
    assert not result.leftovers_removed and result.kind == "full"


def test_a_job_libvirt_runs_for_someone_else_refuses_the_backup(
    libvirt_env: LibvirtEnv,
) -> None:
    env, vm = libvirt_env, libvirt_env.vm
    assert env.config.domain("lv").libvirt is not None
    sock = env.tmp / "other.sock"
    with open_domain("lv", vm.daemon.uri, vm.name) as lv:
        disk = LibvirtDisk("vda", vm.disks["vda"], "qcow2")
        lv.begin_backup([disk], sock, {"vda": env.tmp / "other.qcow2"}, None, "someone-else")
        try:
            with pytest.raises(DomainStateError, match="running backup job"):
                run_backup(env.config, "lv")
            assert vm.job_type() != 0  # their job is left alone
        finally:
            lv.abort_job()
    run_backup(env.config, "lv")  # and once it ended, the backup runs


def test_a_second_backup_of_the_same_domain_is_refused_while_one_runs(
    libvirt_env: LibvirtEnv,
) -> None:
    env, vm = libvirt_env, libvirt_env.vm
    vm.write("vda", 0, 1 * MiB, 0x51)
    refused: list[Exception] = []

    def second(phase: str, done: int, total: int) -> None:
        if not refused:
            with pytest.raises(DomainBusyError, match="domain 'lv' is busy") as info:
                run_backup(env.config, "lv")
            refused.append(info.value)

    first = run_backup(env.config, "lv", progress=second)
    assert refused
    assert restore_raw(env, first.backup_id) == env.capture()
    assert vm.job_type() == 0 and vm.checkpoints() == [checkpoint_name(first.checkpoint)]
