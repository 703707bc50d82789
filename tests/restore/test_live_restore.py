"""Live restore with real parts: a backup of a running QEMU, the domain started on overlays
backed by nbdkit's export of it, guest I/O during the rate-limited copy (``blockdev-mirror``).

The guest has no OS: its I/O is ``qemu-io`` on the virtio device's block backend (HMP),
which dirty bitmaps see as they see a guest's. What is checked: the guest runs before the
copy ends; its reads during the copy return the backup's bytes; its writes land and
survive; afterwards the image has no backing and holds backup + guest writes; the next
backup is incremental (only the guest's write) and restores bit-exact; a server killed
mid-copy fails reads of uncopied blocks (never other bytes), pauses the guest
(``io-error``) and the copy, and both run again once the live restore has restarted it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.qemu import MiB, QemuVm, VmFactory
from tests.restore.conftest import CHUNK, short_tmp
from vmvault.scheduler import blank_vm
from vmvault.scheduler.cli import main
from vmvault.storage.locks import list_locks
from vmvault.storage.repository import init_repository, open_repository
from vmvault.worker import qemu_img
from vmvault.worker.backup import run_backup
from vmvault.worker.config import FleetConfig, load_config
from vmvault.worker.launch import LaunchError
from vmvault.worker.live_restore import LiveRestoreResult, run_live_restore, stop_on_error
from vmvault.worker.qmp import QmpSession
from vmvault.worker.restore import RestoreTargetExistsError, run_restore

KiB = 1024
SIZE = 8 * MiB
SPEED = 1 * MiB  # bytes/s: the copy of 8 MiB lasts seconds, long enough to act during it


@dataclass
class Live:
    config: FleetConfig
    config_file: Path
    ctl: Path
    state: Path
    reference: bytes  # the backup's content of vda
    backup_id: str


@pytest.fixture
def live(tmp_path: Path, qemu_vm_factory: VmFactory) -> Iterator[Live]:
    """A full backup of a VM with data at both ends of vda; the VM is then gone."""
    vm: QemuVm = qemu_vm_factory(disk_sizes=[SIZE], name="web1")
    state = short_tmp()
    ctl = state / "ctl.sock"
    url = f"file://{tmp_path}/repo"
    init_repository(url, chunk_size=CHUNK).close()
    config_file = tmp_path / "vmvault.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "repository": {"url": url},
                "state_dir": str(state),
                "domains": {
                    "web1": {
                        "host": "hv1",
                        "qmp": str(vm.qmp_path),
                        "launch": {
                            "argv": blank_vm.launch_argv(["vda"], str(ctl), name="web1"),
                            "image_dir": str(tmp_path / "images"),
                        },
                    }
                },
            }
        )
    )
    config = load_config(config_file)
    try:
        vm.write("vda", 0, 2 * MiB, 0x11)
        vm.write("vda", 6 * MiB, 1 * MiB, 0x12)
        backup = run_backup(config, "web1")
        assert backup.kind == "full"
        reference = vm.capture("vda", tmp_path / "ref.raw").read_bytes()
        vm.stop()
        yield Live(config, config_file, ctl, state, reference, backup.backup_id)
    finally:
        shutil.rmtree(state, ignore_errors=True)


class Runner:
    """``run_live_restore`` in a thread; the test acts while it streams."""

    def __init__(self, live: Live, **kwargs: Any) -> None:
        self.running = threading.Event()
        self.result: LiveRestoreResult | None = None
        self.error: BaseException | None = None
        self.progress: list[tuple[str, int, int]] = []
        self._started: LiveRestoreResult | None = None

        def on_running(result: LiveRestoreResult) -> None:
            self._started = result
            self.running.set()

        def target() -> None:
            try:
                self.result = run_live_restore(
                    live.config,
                    live.config_file,
                    "web1",
                    progress=lambda *p: self.progress.append(p),
                    on_running=on_running,
                    **kwargs,
                )
            except BaseException as err:
                self.error = err
                self.running.set()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def wait_running(self) -> LiveRestoreResult:
        assert self.running.wait(60), "the guest did not start"
        assert self.error is None, self.error
        assert self._started is not None
        return self._started

    def join(self, timeout: float = 120) -> LiveRestoreResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the live restore did not end"
        assert self.error is None, self.error
        assert self.result is not None
        return self.result

    def kill_qemu(self) -> None:
        started = self.result or self._started
        if started is not None:
            with _suppress():
                os.kill(started.qemu_pid, signal.SIGKILL)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return isinstance(exc[1], ProcessLookupError)


def guest_io(session: QmpSession, log: Path, command: str) -> str:
    """``qemu-io`` on vda's backend; its report (QEMU prints it to its log)."""
    before = log.stat().st_size
    out = session.hmp(f'qemu-io -d {blank_vm.qdev("vda")} "{command}"')
    with log.open("rb") as f:
        f.seek(before)
        out += f.read().decode(errors="replace")
    return out


def ok(out: str) -> None:
    assert "error" not in out.lower() and "fail" not in out.lower(), out


def copy_jobs(session: QmpSession) -> list[dict[str, Any]]:
    return [j for j in session.block_jobs() if j["type"] == "mirror"]


def sized_copy_jobs(session: QmpSession) -> list[dict[str, Any]]:
    """The copy jobs once QEMU has sized them: a mirror reports ``len`` 0 until its first pass."""
    deadline = time.monotonic() + 10
    while True:
        jobs = copy_jobs(session)
        if all(j["len"] > 0 for j in jobs):
            return jobs
        assert time.monotonic() < deadline, jobs
        time.sleep(0.05)


def test_stop_on_error_adds_to_disk_devices_only() -> None:
    argv = ["qemu", "-device", "virtio-blk-pci,drive=fmt-vda,id=vda", "-device", "virtio-rng",
            "-drive", "file=a.qcow2,if=virtio",
            "-device", "scsi-hd,drive=d2,rerror=report"]  # fmt: skip
    assert stop_on_error(argv) == [
        "qemu", "-device", "virtio-blk-pci,drive=fmt-vda,id=vda,werror=stop,rerror=stop",
        "-device", "virtio-rng", "-drive", "file=a.qcow2,if=virtio,werror=stop,rerror=stop",
        "-device", "scsi-hd,drive=d2,rerror=report",
    ]  # fmt: skip


def test_live_restore_guest_runs_during_copy_then_incremental(live: Live, tmp_path: Path) -> None:
    runner = Runner(live, speed=SPEED)
    try:
        started = runner.wait_running()
        image = started.disks[0].path
        assert not image.exists()  # the guest runs on vda.qcow2.live until the copy is done
        session = QmpSession("web1", live.ctl)
        session.connect()
        try:
            # The guest runs and the copy is far from done.
            assert session.query_status() == "running"
            jobs = sized_copy_jobs(session)
            assert len(jobs) == 1 and jobs[0]["offset"] < jobs[0]["len"] // 2, jobs
            assert session.execute("qom-get", {"path": "/machine/peripheral/vda",
                                               "property": "rerror"}) == "stop"  # fmt: skip
            # Reads of blocks not copied yet come from the backup.
            ok(guest_io(session, started.qemu_log, f"read -P 0x12 {6 * MiB} {1 * MiB}"))
            ok(guest_io(session, started.qemu_log, f"read -P 0x11 {1 * MiB} {1 * MiB}"))
            # A guest write during the copy: the copy must not overwrite it.
            ok(guest_io(session, started.qemu_log, f"write -P 0x77 {6 * MiB + 64 * KiB} 65536"))
            ok(guest_io(session, started.qemu_log, "flush"))
            assert copy_jobs(session), "the copy ended before the guest's I/O"
        finally:
            session.close()
        result = runner.join()
        assert result.backup_id == live.backup_id
        assert result.disks[0].streamed == SIZE
        assert runner.progress[-1] == ("copy vda", SIZE, SIZE)
        # Rate-limited: the 3 MiB of data (holes are not copied) at 1 MiB/s take > 2 s.
        assert result.duration_s - result.guest_started_s > 2, result
        info = json.loads(qemu_img.run(["info", "-U", "--backing-chain", "--output=json",
                                        str(image)], "info"))  # fmt: skip
        assert len(info) == 1 and "backing-filename" not in info[0], info
        assert not result.socket.exists()  # server stopped
        assert sorted(p.name for p in image.parent.iterdir()) == ["vda.qcow2"]
        expected = bytearray(live.reference)
        expected[6 * MiB + 64 * KiB : 6 * MiB + 128 * KiB] = b"\x77" * (64 * KiB)
        qemu_img.to_raw(image, tmp_path / "now.raw", "qcow2")
        assert (tmp_path / "now.raw").read_bytes() == bytes(expected)

        after = run_backup(live.config, "web1")
        assert after.kind == "incremental" and after.parent == live.backup_id, after.reason
        # Only the guest's write was read: the copy did not dirty the checkpoint bitmap.
        assert [d.bytes_read for d in after.disks] == [64 * KiB]
        restored = run_restore(live.config, "web1", backup_id=after.backup_id,
                               to_dir=tmp_path / "r")  # fmt: skip
        qemu_img.to_raw(restored.disks[0].path, tmp_path / "r.raw", "qcow2")
        assert (tmp_path / "r.raw").read_bytes() == bytes(expected)
    finally:
        runner.kill_qemu()


def test_live_restore_server_killed_mid_copy_fails_reads_then_resumes(
    live: Live, tmp_path: Path
) -> None:
    runner = Runner(live, speed=SPEED, restart_delay=3.0)
    try:
        started = runner.wait_running()
        session = QmpSession("web1", live.ctl)
        session.connect()
        try:
            ok(guest_io(session, started.qemu_log, f"write -P 0x66 {3 * MiB} 4096"))
            nbdkit = _nbdkit_pid(started.socket)
            os.kill(nbdkit, signal.SIGKILL)
            time.sleep(0.2)
            # A read of a block not copied yet fails (on a guest device, rerror=stop turns
            # that into a pause); it never returns other bytes.
            out = guest_io(session, started.qemu_log, f"read -P 0x12 {7 * MiB - 64 * KiB} 65536")
            assert "read failed: Input/output error" in out, out
            # The copy pauses on the error (on-source-error: stop) instead of failing.
            deadline = time.monotonic() + 10
            while not any(j["io-status"] == "failed" for j in copy_jobs(session)):
                assert time.monotonic() < deadline, copy_jobs(session)
                time.sleep(0.1)
            # The guest is paused on the I/O error (rerror=stop), not shown it.
            assert session.query_status() == "io-error"
            # The live restore restarts the server; QEMU reconnects, reads work again.
            deadline = time.monotonic() + 20
            while _nbdkit_pid(started.socket) in (0, nbdkit):
                assert time.monotonic() < deadline, "nbdkit was not restarted"
                time.sleep(0.1)
            deadline = time.monotonic() + 40
            while "fail" in (
                out := guest_io(
                    session, started.qemu_log, f"read -P 0x12 {7 * MiB - 64 * KiB} 65536"
                )
            ):
                assert time.monotonic() < deadline, out
                time.sleep(0.5)
            deadline = time.monotonic() + 10
            while session.query_status() != "running":
                assert time.monotonic() < deadline, session.query_status()
                time.sleep(0.1)
        finally:
            session.close()
        result = runner.join()
        assert result.server_restarts == 1
        info = json.loads(qemu_img.run(["info", "-U", "--backing-chain", "--output=json",
                                        str(result.disks[0].path)], "info"))  # fmt: skip
        assert len(info) == 1 and "backing-filename" not in info[0], info
        # Nothing is missing where the copy was interrupted.
        expected = bytearray(live.reference)
        expected[3 * MiB : 3 * MiB + 4096] = b"\x66" * 4096
        qemu_img.to_raw(result.disks[0].path, tmp_path / "now.raw", "qcow2")
        assert _differences((tmp_path / "now.raw").read_bytes(), bytes(expected)) == []
    finally:
        runner.kill_qemu()


def _differences(a: bytes, b: bytes, block: int = 64 * KiB) -> list[tuple[int, bytes, bytes]]:
    """The 64 KiB blocks where ``a`` and ``b`` differ: offset and their first bytes."""
    return [(o, a[o : o + 4], b[o : o + 4]) for o in range(0, len(b), block)
            if a[o : o + block] != b[o : o + block]]  # fmt: skip


def _nbdkit_pid(socket: Path) -> int:
    """The pid of the nbdkit listening on ``socket`` (0 when none)."""
    out = subprocess.run(["pgrep", "-f", f"nbdkit.*--unix {socket}"], capture_output=True,
                         text=True).stdout.split()  # fmt: skip
    return int(out[0]) if out else 0


def test_cli_restore_live_json_and_usage_errors(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--config", str(live.config_file)]
    # Usage problems exit 2 before anything runs.
    assert main(["restore", "web1", "--live", "--incoming", *base]) == 2
    assert "--live and --incoming do not go together" in capsys.readouterr().err
    assert main(["restore", "web1", "--to", str(tmp_path / "x"), "--speed", "4M", *base]) == 2
    assert "--speed applies to --live restores only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["restore", "web1", "--live", "--speed", "fast", *base])
    assert "'fast' is not a rate" in capsys.readouterr().err
    doc: dict[str, Any] = {}
    try:
        assert main(["restore", "web1", "--live", "--speed", "4M", "--json", *base]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["mode"] == "live" and doc["backup_id"] == live.backup_id
        assert doc["speed"] == 4 * MiB and doc["state"] == "running"
        assert doc["bytes_streamed"] == SIZE and doc["server_restarts"] == 0
        [disk] = doc["disks"]
        qemu_img.to_raw(Path(disk["path"]), tmp_path / "cli.raw", "qcow2")
        assert (tmp_path / "cli.raw").read_bytes() == live.reference
        # The domain runs: a second live restore is refused, nothing touched.
        assert main(["restore", "web1", "--live", "--force", *base]) == 1
        assert "already listens on its QMP socket" in capsys.readouterr().err
    finally:
        if doc:
            with _suppress():
                os.kill(doc["qemu_pid"], signal.SIGKILL)


def test_live_restore_abandoned_guest_runs_on_and_resumes_with_serve(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    """Interrupted mid-copy: the guest keeps running on its overlay (guest writes kept);
    ``vmvault serve`` on the socket in the overlay's header brings the backup back."""
    started: list[LiveRestoreResult] = []
    calls = 0

    def interrupt(phase: str, done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_live_restore(
            live.config, live.config_file, "web1", speed=SPEED, progress=interrupt,
            on_running=started.append,
        )  # fmt: skip
    [result] = started
    overlay = result.disks[0].path.with_name("vda.qcow2.live")
    serve: subprocess.Popen[bytes] | None = None
    try:
        assert "abandoned" in caplog.text and str(overlay) in caplog.text
        assert str(result.socket) in caplog.text and live.backup_id in caplog.text
        os.kill(result.qemu_pid, 0)  # still running
        assert not result.socket.exists() and overlay.exists()
        info = json.loads(qemu_img.run(["info", "-U", "--output=json", str(overlay)], "info"))
        assert str(result.socket) in info["backing-filename"]
        session = QmpSession("web1", live.ctl)
        session.connect()
        try:
            # A write of part of a cluster not copied yet needs the rest of it from the
            # backup (copy-on-write): with no server it fails too (a guest would pause).
            out = guest_io(session, result.qemu_log, f"write -P 0x55 {5 * MiB} 4096")
            assert "write failed: Input/output error" in out, out
            serve = subprocess.Popen(
                [sys.executable, "-m", "vmvault", "serve", "web1", "--backup", live.backup_id,
                 "--socket", str(result.socket), "--config", str(live.config_file)],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + 40
            while "fail" in (
                out := guest_io(session, result.qemu_log, f"read -P 0x12 {7 * MiB - 4096} 4096")
            ):
                assert time.monotonic() < deadline, out
                time.sleep(0.5)
            ok(guest_io(session, result.qemu_log, f"write -P 0x55 {5 * MiB} 4096"))
            ok(guest_io(session, result.qemu_log, f"read -P 0x55 {5 * MiB} 4096"))
            ok(guest_io(session, result.qemu_log, f"read -P 0 {5 * MiB + 4096} 4096"))
        finally:
            session.close()
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(10)
        with _suppress():
            os.kill(result.qemu_pid, signal.SIGKILL)


def test_live_restore_refusals_and_a_failing_qemu_leave_nothing(live: Live) -> None:
    doc = yaml.safe_load(live.config_file.read_text())
    images = Path(doc["domains"]["web1"]["launch"]["image_dir"])
    # QEMU refuses the argv: overlays, targets, journal, socket and lease all go.
    doc["domains"]["web1"]["launch"]["argv"].extend(["-device", "no-such-device"])
    bad_file = live.config_file.with_name("bad.yaml")
    bad_file.write_text(yaml.safe_dump(doc))
    with pytest.raises(LaunchError, match="no-such-device"):
        run_live_restore(load_config(bad_file), bad_file, "web1")
    assert not images.exists() or list(images.iterdir()) == []
    run = live.state / "run"
    assert not list(run.glob("restore-*.json"))
    assert not any(run.glob("vmvl-web1/*"))
    with open_repository(live.config.repository.url) as repo:
        assert list_locks(repo.backend) == []
    # An overlay left by an abandoned live restore is never replaced, not even by --force.
    images.mkdir(exist_ok=True)
    (images / "vda.qcow2.live").write_bytes(b"guest writes")
    with pytest.raises(RestoreTargetExistsError, match=r"vda\.qcow2\.live exists"):
        run_live_restore(live.config, live.config_file, "web1", force=True)
    assert (images / "vda.qcow2.live").read_bytes() == b"guest writes"
    assert sorted(p.name for p in images.iterdir()) == ["vda.qcow2.live"]
