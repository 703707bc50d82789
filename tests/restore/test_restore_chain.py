"""The whole story with real parts: a backup chain of a running QEMU, every backup restored.

full + 3 incrementals with overwrites, discards and zeroed ranges between them; each
backup restored to files and compared (``qemu-img compare``) with the reference captured
right after it was taken; the newest restored into a paused incoming-mode QEMU, then
booted; the next backup of the restored domain is incremental, holds only the writes
made after the restore, and restores bit-exact itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.qemu import MiB, QemuVm, VmFactory
from tests.fixtures.s3 import S3Bucket
from tests.restore.conftest import CHUNK, images_equal, short_tmp
from vmvault.scheduler import blank_vm
from vmvault.storage.repository import init_repository
from vmvault.worker.backup import run_backup
from vmvault.worker.config import FleetConfig, parse_config
from vmvault.worker.launch import LaunchError
from vmvault.worker.qmp import QmpSession, open_session
from vmvault.worker.restore import RestoreTargetExistsError, run_restore

KiB = 1024


def launch_argv(ctl: Path, name: str = "web1") -> list[str]:
    """A launch description like the fixture's VM, plus a control QMP socket for the test."""
    return blank_vm.launch_argv(["vda", "vdb"], str(ctl), name=name)


def make_config(repo_url: str, state: Path, vm: QemuVm, ctl: Path, **repo: Any) -> FleetConfig:
    return parse_config(
        {
            "repository": {"url": repo_url, **repo},
            "state_dir": str(state),
            "domains": {
                "web1": {
                    "host": "hv1",
                    "qmp": str(vm.qmp_path),
                    "launch": {"argv": launch_argv(ctl)},
                }
            },
        },
        "test.yaml",
    )


def guest_io(session: QmpSession, disk: str, command: str) -> None:
    out = session.hmp(f'qemu-io -d /machine/peripheral/{disk}/virtio-backend "{command}"')
    assert "error" not in out.lower() and "failed" not in out.lower(), out


@pytest.mark.parametrize("scheme", ["file", "s3"])
def test_chain_restore_incoming_and_incremental_after(
    tmp_path: Path, qemu_vm_factory: VmFactory, request: pytest.FixtureRequest, scheme: str
) -> None:
    vm = qemu_vm_factory(disk_sizes=[16 * MiB, 8 * MiB], name="web1")
    state = short_tmp()
    ctl = state / "ctl.sock"
    try:
        url, endpoint = f"file://{tmp_path}/repo", None
        if scheme == "s3":
            bucket: S3Bucket = request.getfixturevalue("s3_server")
            url, endpoint = bucket.repo_url(), bucket.endpoint_url
        init_repository(url, endpoint_url=endpoint, chunk_size=CHUNK).close()
        extra = {"endpoint_url": endpoint} if endpoint else {}
        config = make_config(url, state, vm, ctl, **extra)
        refs: dict[str, dict[str, Path]] = {}
        kinds: list[str] = []

        def backup_and_capture() -> str:
            result = run_backup(config, "web1")
            kinds.append(result.kind)
            refs[result.backup_id] = {
                d: vm.capture(d, tmp_path / f"{result.backup_id}-{d}.raw") for d in vm.disks
            }
            return result.backup_id

        # full: data on both disks
        vm.write("vda", 0, 3 * MiB, 0x11)
        vm.write("vda", 9 * MiB, 1 * MiB + 4 * KiB, 0x12)
        vm.write("vdb", 1 * MiB, 2 * MiB, 0x13)
        backup_and_capture()
        # incremental 1: overwrites inside and across chunks, new data at the end
        vm.write("vda", 1 * MiB + 512, 64 * KiB, 0x21)
        vm.write("vda", 15 * MiB, 1 * MiB, 0x22)
        vm.write("vdb", 2 * MiB, 8 * KiB, 0x23)
        backup_and_capture()
        # incremental 2: a discard and a zeroed range, one overwrite
        vm.discard("vda", 0, 1 * MiB)
        vm.zero("vdb", 1 * MiB, 1 * MiB)
        vm.write("vda", 9 * MiB + 100 * KiB, 4 * KiB, 0x31)
        backup_and_capture()
        # incremental 3: partial-chunk zeroing, discard of the new tail, more data
        vm.zero("vda", 2 * MiB + 64 * KiB, 128 * KiB)
        vm.discard("vda", 15 * MiB, 1 * MiB)
        vm.write("vdb", 7 * MiB, 1 * MiB, 0x41)
        newest = backup_and_capture()
        assert kinds == ["full", "incremental", "incremental", "incremental"]

        # Every backup restores bit-exact to files.
        for backup_id, ref in refs.items():
            result = run_restore(config, "web1", backup_id=backup_id, to_dir=tmp_path / backup_id)
            assert {d.name for d in result.disks} == {"vda", "vdb"}
            for disk in result.disks:
                assert disk.verified
                assert images_equal(ref[disk.name], disk.path), (backup_id, disk.name)

        # Into the domain: its QEMU is gone (as after a host loss); restore paused.
        vm.stop()
        images = tmp_path / "images"
        result = run_restore(config, "web1", incoming=True, to_dir=images)
        assert result.backup_id == newest and result.qemu is not None
        try:
            assert result.qmp == vm.qmp_path
            with open_session("web1", vm.qmp_path) as session:
                assert session.query_status() == "inmigrate"
                assert session.block_exports() == []
                nodes = {n.node_name: n for n in session.named_block_nodes()}
                for dev in ("vda", "vdb"):
                    names = [b.name for b in nodes[f"fmt-{dev}"].bitmaps]
                    assert names == [result.checkpoint]
            for dev in ("vda", "vdb"):
                assert images_equal(refs[newest][dev], images / f"{dev}.qcow2")
        finally:
            result.qemu.kill()

        # A QEMU holding the domain's socket blocks a second restore into it.
        again = run_restore(config, "web1", incoming=True, to_dir=images, force=True, boot=True)
        assert again.qemu is not None and again.booted
        try:
            with pytest.raises(LaunchError, match="already listens on its QMP socket"):
                run_restore(config, "web1", incoming=True, to_dir=tmp_path / "x")
            # Nor does --force replace the disks of the running VM.
            with pytest.raises(RestoreTargetExistsError, match=r"vda\.qcow2 is in use"):
                run_restore(config, "web1", to_dir=images, force=True)
            ctl_session = QmpSession("web1", ctl)
            ctl_session.connect()
            try:
                assert ctl_session.query_status() == "running"
                guest_io(ctl_session, "vda", f"write -P 0x77 {5 * MiB} {64 * KiB}")
                guest_io(ctl_session, "vdb", f"write -P 0x78 {3 * MiB} {4 * KiB}")
                guest_io(ctl_session, "vda", "flush")
                guest_io(ctl_session, "vdb", "flush")
            finally:
                ctl_session.close()
            after = run_backup(config, "web1")
            assert after.kind == "incremental" and after.parent == newest, after.reason
            # Only the 64 KiB sub-blocks the guest wrote after the restore were read.
            dirty = {d.name: d.bytes_read for d in after.disks}
            assert dirty == {"vda": 64 * KiB, "vdb": 64 * KiB}, dirty
            # The restored domain's disks now (guest writes flushed) are the next reference.
            for dev in ("vda", "vdb"):
                shutil.copy(images / f"{dev}.qcow2", tmp_path / f"after-{dev}.qcow2")
        finally:
            again.qemu.kill()
        restored = run_restore(config, "web1", backup_id=after.backup_id, to_dir=tmp_path / "r2")
        for disk in restored.disks:
            assert images_equal(tmp_path / f"after-{disk.name}.qcow2", disk.path, "qcow2")
            prior = refs[newest][disk.name]
            # ...and it differs from the restored backup exactly by the post-restore write.
            assert not images_equal(prior, disk.path)
    finally:
        shutil.rmtree(state, ignore_errors=True)
