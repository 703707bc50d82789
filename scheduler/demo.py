"""``vmvault demo``: a QEMU VM with two disks, a full and an incremental backup, bit-exact check.

Everything lives in one temporary directory (``/tmp/vmvault-demo-*``): disks, QMP socket,
``file://`` repository and state dir. No Redis, no S3. Each step is a small function in
:data:`STEPS`; the last one (scheduler/restore_demo.py) restores the newest backup.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmvault.scheduler import blank_vm
from vmvault.scheduler.restore_demo import restore_newest_step
from vmvault.storage.repository import init_repository, open_repository
from vmvault.worker import qemu_img
from vmvault.worker.backup import BackupResult, run_backup
from vmvault.worker.config import FleetConfig, parse_config
from vmvault.worker.errors import WorkerError
from vmvault.worker.qmp import QmpSession, socket_is_listening

MiB = 1024 * 1024
DOMAIN = "demo"
DISKS = {"vda": 64 * MiB, "vdb": 32 * MiB}

Say = Callable[[str], None]


class DemoError(WorkerError):
    """The demo could not run (QEMU or qemu-img missing, VM failed to start). Not retryable."""


@dataclass
class DemoVm:
    """The blank VM (scheduler/blank_vm.py, the test fixture's too) in a throwaway directory."""

    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    ctl: QmpSession | None = None
    disks: dict[str, Path] = field(default_factory=dict)

    @property
    def qmp_path(self) -> Path:
        return self.workdir / "qmp.sock"

    def start(self) -> None:
        if shutil.which(blank_vm.QEMU_SYSTEM) is None or shutil.which(qemu_img.QEMU_IMG) is None:
            raise DemoError("qemu-system-x86_64 and qemu-img are needed: run 'make setup'")
        for name, size in DISKS.items():
            path = self.workdir / f"{name}.qcow2"
            qemu_img.create(path, size)
            self.disks[name] = path
        args = blank_vm.argv(
            {name: str(path) for name, path in self.disks.items()},
            [str(self.qmp_path), str(self.workdir / "ctl.sock")],
        )
        log = (self.workdir / "qemu.log").open("wb")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 20
        while not (
            socket_is_listening(self.qmp_path) and socket_is_listening(self.workdir / "ctl.sock")
        ):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"QEMU did not start: see {self.workdir / 'qemu.log'}")
            time.sleep(0.05)
        self.ctl = QmpSession("demo", self.workdir / "ctl.sock")
        self.ctl.connect()

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        assert self.ctl is not None
        self.ctl.hmp(f'qemu-io -d {blank_vm.qdev(disk)} "write -P {pattern:#x} {offset} {length}"')

    def capture(self, disk: str) -> bytes:
        assert self.ctl is not None
        self.ctl.hmp(f'qemu-io -d {blank_vm.qdev(disk)} "flush"')
        out = self.workdir / f"{disk}.ref"
        qemu_img.to_raw(self.disks[disk], out)
        data = out.read_bytes()
        out.unlink()
        return data

    def stop(self) -> None:
        if self.ctl is not None:
            with contextlib.suppress(WorkerError):
                self.ctl.execute("quit")
            self.ctl.close()
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Demo:
    """State shared by the demo steps."""

    vm: DemoVm
    config: FleetConfig
    say: Say
    backups: list[BackupResult] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def _write_data(demo: Demo) -> None:
    demo.vm.write("vda", 0, 16 * MiB, 0x5A)
    demo.vm.write("vda", 40 * MiB, 8 * MiB, 0x17)
    demo.vm.write("vdb", 4 * MiB, 4 * MiB, 0xC3)
    demo.say("wrote 28 MiB of data through the guest block path (vda, vdb)")


def _backup(mode: str) -> Callable[[Demo], None]:
    def step(demo: Demo) -> None:
        result = run_backup(demo.config, DOMAIN, "auto")
        demo.backups.append(result)
        read = sum(d.bytes_read for d in result.disks) / MiB
        demo.say(
            f"{result.kind} backup {result.backup_id}: read {read:.1f} MiB in "
            f"{result.duration_s:.2f}s — {result.reason}"
        )
        if result.kind != mode:
            raise DemoError(f"expected a {mode} backup, got {result.kind}: {result.reason}")

    return step


def _write_more(demo: Demo) -> None:
    for i in range(8):
        demo.vm.write("vda", i * 7 * MiB + 64 * 1024, 64 * 1024, 0x40 + i)
    demo.vm.write("vdb", 20 * MiB, 1 * MiB, 0x99)
    demo.say("wrote 8 scattered 64 KiB blocks on vda and 1 MiB on vdb")


def _verify(demo: Demo) -> None:
    with open_repository(demo.config.repository.url) as repo:
        manifest = repo.latest_manifest(DOMAIN)
        assert manifest is not None
        for disk, size in DISKS.items():
            got = bytearray(size)
            for offset, data in repo.read_disk(manifest, disk):
                if data is not None:
                    got[offset : offset + len(data)] = data
            if bytes(got) != demo.vm.capture(disk):
                raise DemoError(f"disk {disk}: backup {manifest.backup_id} differs from the VM")
    demo.say(f"verified: backup {manifest.backup_id} equals the VM's disks bit for bit")


def _list(demo: Demo) -> None:
    with open_repository(demo.config.repository.url) as repo:
        manifests = repo.list_manifests(DOMAIN)
    demo.say("backups in the repository:")
    for m in manifests:
        demo.say(
            f"  {m.backup_id}  {m.kind:<11} parent={m.parent or '-'}  checkpoint={m.checkpoint}"
        )
    demo.report["backups"] = [
        {"backup_id": m.backup_id, "kind": m.kind, "parent": m.parent, "reason": m.reason}
        for m in manifests
    ]


STEPS: list[Callable[[Demo], None]] = [
    _write_data, _backup("full"), _write_more, _backup("incremental"), _verify, _list,
    restore_newest_step,
]  # fmt: skip


def run_demo(keep: bool = False, say: Say | None = None) -> dict[str, Any]:
    """Run :data:`STEPS` in a fresh temporary directory; returns a JSON-able report."""
    workdir = Path(tempfile.mkdtemp(prefix="vmvault-demo-"))
    vm = DemoVm(workdir)
    out = say or (lambda _msg: None)
    try:
        out(f"demo directory {workdir}")
        vm.start()
        repo_url = f"file://{workdir / 'repo'}"
        init_repository(repo_url).close()
        config = parse_config(
            {
                "repository": {"url": repo_url},
                "state_dir": str(workdir / "state"),
                "domains": {DOMAIN: {"host": "local", "qmp": str(vm.qmp_path)}},
            },
            "demo",
        )
        out(f"started QEMU with disks vda (64 MiB) and vdb (32 MiB); repository {repo_url}")
        demo = Demo(vm, config, out)
        for step in STEPS:
            step(demo)
        demo.report["workdir"] = str(workdir) if keep else None
        demo.report["results"] = [b.to_json() for b in demo.backups]
        return demo.report
    finally:
        vm.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
