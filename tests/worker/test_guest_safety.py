"""A backup never costs the guest a write, and no job state outlives its process.

Real QEMU, real tmpfs mounts for a small or full ``state_dir``, real signals sent to a
real ``vmvault backup`` process stopped at each step of its job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.common import wait_until
from tests.fixtures.qemu import MiB, QemuVm, VmFactory
from vmvault.storage.repository import init_repository, open_repository
from vmvault.worker.backup import BackupError, FleeceBrokenError, StateDirError, run_backup
from vmvault.worker.checkpoints import PREFIX
from vmvault.worker.cleanup import job_marker, paused_marker
from vmvault.worker.config import FleetConfig, parse_config
from vmvault.worker.qmp import QmpConnectError
from vmvault.worker.reaper import reap_host

ROOT = Path(__file__).parents[2]

SmallFs = Callable[[int], Path]


@pytest.fixture
def small_fs() -> Iterator[SmallFs]:
    """``make(mib)``: a fresh tmpfs of that size (a full or small state_dir)."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("these tests mount tmpfs file systems: run them as root")
        pytest.skip("needs root (tmpfs mounts)")
    mounts: list[Path] = []

    def make(mib: int) -> Path:
        path = Path(tempfile.mkdtemp(prefix="vmvt"))
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs", str(path)],
            check=True,
        )
        mounts.append(path)
        return path

    try:
        yield make
    finally:
        for path in mounts:
            subprocess.run(["umount", "-l", str(path)], check=False)
            shutil.rmtree(path, ignore_errors=True)


def _config(vm: QemuVm, repo_url: str, state_dir: Path, **backup: Any) -> FleetConfig:
    return parse_config(
        {
            "repository": {"url": repo_url},
            "state_dir": str(state_dir),
            "domains": {"vm": {"host": "hv1", "qmp": str(vm.qmp_path)}},
            "backup": backup,
        },
        "test",
    )


def _repo(tmp_path: Path) -> str:
    url = f"file://{tmp_path / 'repo'}"
    init_repository(url, chunk_size=1 * MiB).close()
    return url


def _roots(vm: QemuVm) -> dict[str, str]:
    """Guest device → the node it reads and writes through."""
    return {
        str(dev["qdev"]).split("/")[3]: str(dev["inserted"]["node-name"])
        for dev in vm.ctl.query_block()
        if dev.get("inserted")
    }


def _assert_untouched(vm: QemuVm, state_dir: Path) -> None:
    """The guest runs on its own disks and nothing of a backup is left in QEMU."""
    ctl = vm.ctl
    assert ctl.query_status() == "running"
    assert _roots(vm) == {name: disk.node for name, disk in vm.disks.items()}
    assert ctl.block_exports() == [] and ctl.block_jobs() == []
    assert not [n.node_name for n in ctl.named_block_nodes() if n.node_name.startswith("vmv-")]
    for node in ctl.named_block_nodes():
        assert not [b.name for b in node.bitmaps if b.name.startswith("vmvault.tmp-")]
    assert not paused_marker(state_dir, "vm").exists()
    assert not job_marker(state_dir, "vm").exists()
    assert not list((state_dir / "scratch").glob("*/*"))


def _checkpoints(vm: QemuVm, disk: str) -> list[str]:
    node = next(n for n in vm.ctl.named_block_nodes() if n.node_name == vm.disks[disk].node)
    return [b.name for b in node.bitmaps if b.name.startswith(PREFIX)]


def _manifests(repo_url: str) -> list[str]:
    with open_repository(repo_url) as repo:
        return [m.backup_id for m in repo.list_manifests("vm")]


# -- a full or failing scratch breaks the backup, not the guest -----------------------------


def test_full_scratch_breaks_the_backup_and_every_guest_write_lands(
    qemu_vm_factory: VmFactory, tmp_path: Path, small_fs: SmallFs
) -> None:
    vm = qemu_vm_factory(disk_sizes=[256 * MiB], name="vm")
    vm.write("vda", 0, 64 * MiB, pattern=0x11)
    state_dir = small_fs(24)
    repo_url = _repo(tmp_path)
    config = _config(vm, repo_url, state_dir, min_free_mib=1)
    wrote: list[int] = []

    def guest_writes(phase: str, done: int, total: int) -> None:
        # The export is live and nothing of the data is read yet: 40 MiB of overwrites
        # need 40 MiB of old data in a scratch that can hold 24.
        while len(wrote) < 40:
            vm.write("vda", len(wrote) * MiB, 1 * MiB, pattern=0x22)  # raises if it failed
            wrote.append(1)

    with pytest.raises(FleeceBrokenError, match="guest was not affected") as info:
        run_backup(config, "vm", progress=guest_writes)
    assert str(state_dir) in str(info.value)
    assert len(wrote) == 40
    image = vm.capture("vda", tmp_path / "vda.raw").read_bytes()
    assert image[: 40 * MiB] == b"\x22" * (40 * MiB)
    assert image[40 * MiB : 64 * MiB] == b"\x11" * (24 * MiB)
    assert _manifests(repo_url) == []
    _assert_untouched(vm, state_dir)


def test_full_state_dir_refuses_before_touching_the_domain(
    qemu_vm_factory: VmFactory, tmp_path: Path, small_fs: SmallFs
) -> None:
    vm = qemu_vm_factory(disk_sizes=[16 * MiB], name="vm")
    state_dir = small_fs(4)
    filler = state_dir / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
    repo_url = _repo(tmp_path)
    config = _config(vm, repo_url, state_dir)
    with pytest.raises(StateDirError, match=r"has 0 MiB free, less than backup.min_free_mib"):
        run_backup(config, "vm")
    assert _checkpoints(vm, "vda") == []

    cfg = tmp_path / "vmvault.yaml"
    cfg.write_text(json.dumps(config.model_dump(mode="json")))
    proc = subprocess.run(
        [sys.executable, "-m", "vmvault", "backup", "vm", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vmvault: error: state_dir {state_dir}")
    _assert_untouched(vm, state_dir)


def test_fleece_space_is_checked_before_the_backup(
    qemu_vm_factory: VmFactory,
    tmp_path: Path,
    small_fs: SmallFs,
    caplog: pytest.LogCaptureFixture,
) -> None:
    vm = qemu_vm_factory(disk_sizes=[64 * MiB], name="vm")
    vm.write("vda", 0, 24 * MiB, pattern=0x33)
    state_dir = small_fs(8)
    repo_url = _repo(tmp_path)
    strict = _config(vm, repo_url, state_dir, min_free_mib=1, require_fleece_space=True)
    with pytest.raises(StateDirError, match="require_fleece_space"):
        run_backup(strict, "vm")
    assert _checkpoints(vm, "vda") == [] and _manifests(repo_url) == []

    relaxed = _config(vm, repo_url, state_dir, min_free_mib=1)
    result = run_backup(relaxed, "vm")
    assert result.kind == "full"
    assert "fleecing scratch files can grow to" in caplog.text
    assert result.fleece_bytes == 0  # nothing was overwritten during this backup
    _assert_untouched(vm, state_dir)


# -- SIGTERM tears down; after SIGKILL the reaper does -------------------------------------

# Where the job is stopped: before the QMP command with this name is sent (its first one),
# or at the first progress report of the pull. "transaction" and "qom-set" come while
# the guest is paused.
STEPS = ("blockdev-add", "transaction", "qom-set", "block-export-add", "pull")

_STOPPED_BACKUP = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from vmvault.worker.qmp import QmpSession
    from vmvault.scheduler.cli import main

    step, ready = sys.argv[1], Path(sys.argv[2])

    def hold():
        ready.write_text("stopped")
        time.sleep(5)  # the test's signal arrives in here

    real = QmpSession.execute
    def execute(self, command, arguments=None, timeout=None):
        if command == step and not ready.exists():
            hold()
        return real(self, command, arguments, timeout)
    QmpSession.execute = execute

    import vmvault.worker.backup
    real_pull = vmvault.worker.backup._pull_disk
    def pull(job, *args):
        if step == "pull" and not ready.exists():
            hold()
        return real_pull(job, *args)
    vmvault.worker.backup._pull_disk = pull
    sys.exit(main(["backup", "vm", "--config", sys.argv[3]]))
    """
)


def _stopped_backup(config: FleetConfig, step: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    """A ``vmvault backup`` process held at ``step``; returns once it is there."""
    cfg = tmp_path / "vmvault.yaml"
    cfg.write_text(json.dumps(config.model_dump(mode="json")))
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_BACKUP, step, str(ready), str(cfg)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_until(ready.exists, 30, f"backup held at {step}", proc)
    return proc


@pytest.mark.parametrize("step", STEPS)
def test_sigterm_at_any_step_tears_down_at_once(
    qemu_vm_factory: VmFactory, tmp_path: Path, state_dir: Path, step: str
) -> None:
    vm = qemu_vm_factory(disk_sizes=[16 * MiB, 8 * MiB], name="vm")
    vm.write("vda", 0, 4 * MiB, pattern=0x44)
    repo_url = _repo(tmp_path)
    config = _config(vm, repo_url, state_dir)
    proc = _stopped_backup(config, step, tmp_path)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr
    # No reaper ran: the process itself removed all it had set up.
    _assert_untouched(vm, state_dir)
    assert _manifests(repo_url) == []
    # The next backup is complete and right.
    reference = vm.capture("vda", tmp_path / "ref.raw").read_bytes()
    result = run_backup(config, "vm")
    assert not result.leftovers_removed
    with open_repository(repo_url) as repo:
        manifest = repo.load_manifest("vm", result.backup_id)
        restored = bytearray(16 * MiB)
        for offset, data in repo.read_disk(manifest, "vda"):
            if data is not None:
                restored[offset : offset + len(data)] = data
    assert bytes(restored) == reference


@pytest.mark.parametrize("step", STEPS)
def test_after_sigkill_at_any_step_the_reaper_restores_the_guest(
    qemu_vm_factory: VmFactory, tmp_path: Path, state_dir: Path, step: str
) -> None:
    vm = qemu_vm_factory(disk_sizes=[16 * MiB, 8 * MiB], name="vm")
    repo_url = _repo(tmp_path)
    config = _config(vm, repo_url, state_dir)
    vm.write("vdb", 0, 1 * MiB, pattern=0x54)
    full = run_backup(config, "vm")
    proc = _stopped_backup(config, step, tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    if step in ("transaction", "qom-set"):
        assert vm.ctl.query_status() == "paused"  # killed inside the pause
        assert paused_marker(state_dir, "vm").exists()
    reap_host(config, "hv1")
    _assert_untouched(vm, state_dir)
    # The guest's writes go straight to its disks again, and they land.
    vm.write("vda", 1 * MiB, 1 * MiB, pattern=0x55)
    reference = vm.capture("vda", tmp_path / "after.raw").read_bytes()
    assert reference[MiB : 2 * MiB] == b"\x55" * MiB
    # The chain survived (a checkpoint cut in half is sealed by the reaper): the next
    # backup is incremental from the last committed one, and right.
    result = run_backup(config, "vm")
    assert result.kind == "incremental" and result.parent == full.backup_id, result.reason
    with open_repository(repo_url) as repo:
        manifest = repo.load_manifest("vm", result.backup_id)
        restored = bytearray(16 * MiB)
        for offset, data in repo.read_disk(manifest, "vda"):
            if data is not None:
                restored[offset : offset + len(data)] = data
    assert bytes(restored) == reference


# -- a frozen QEMU ends the job instead of stalling it -------------------------------------


def test_frozen_qemu_mid_pull_fails_within_the_timeout(
    qemu_vm_factory: VmFactory, tmp_path: Path, state_dir: Path
) -> None:
    vm = qemu_vm_factory(disk_sizes=[16 * MiB], name="vm")
    vm.write("vda", 0, 16 * MiB, pattern=0x66)
    repo_url = _repo(tmp_path)
    config = _config(vm, repo_url, state_dir, io_timeout_seconds=3)
    assert vm.proc is not None
    pid = vm.proc.pid

    def freeze(phase: str, done: int, total: int) -> None:
        os.kill(pid, signal.SIGSTOP)

    started = time.monotonic()
    try:
        with pytest.raises(BackupError, match=r"domain 'vm'.*within 3s.*frozen"):
            run_backup(config, "vm", progress=freeze)
        elapsed = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    # Bounded: the read's timeout plus one QMP timeout in the teardown, with slack for
    # a loaded machine. (Without the bound the job would wait for ever.)
    assert elapsed < 60
    assert _manifests(repo_url) == []
    reap_host(config, "hv1")
    _assert_untouched(vm, state_dir)


def test_frozen_qemu_before_the_backup_is_named(
    qemu_vm_factory: VmFactory, tmp_path: Path, state_dir: Path
) -> None:
    vm = qemu_vm_factory(disk_sizes=[16 * MiB], name="vm")
    config = _config(vm, _repo(tmp_path), state_dir, io_timeout_seconds=2)
    assert vm.proc is not None
    os.kill(vm.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(QmpConnectError, match=r"domain 'vm'.*within 2s.*frozen"):
            run_backup(config, "vm")
    finally:
        os.kill(vm.proc.pid, signal.SIGCONT)


def test_reaper_passes_leave_quiet_domains_alone(
    qemu_vm_factory: VmFactory, tmp_path: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A periodic pass takes a domain's lock only when a marker says a job died: a job
    starting at that moment must not find its domain busy for nothing."""
    vm = qemu_vm_factory(disk_sizes=[16 * MiB], name="vm")
    config = _config(vm, _repo(tmp_path), state_dir)
    run_backup(config, "vm")
    import vmvault.worker.reaper

    def no_lock(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reaper took the domain lock of a quiet domain")

    monkeypatch.setattr(vmvault.worker.reaper, "domain_lock", no_lock)
    assert reap_host(config, "hv1") == 0
