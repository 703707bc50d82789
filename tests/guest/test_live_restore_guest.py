"""Live restore of a real Linux guest: it boots from the backup while the copy runs, and a
killed server pauses it (``io-error``) instead of feeding it errors or garbage.

The guest's files, their digests taken before the backup, are read in the guest during
the copy and after a server kill (page cache dropped, so the reads reach the disk); the
guest writes a file during the copy; at the end the image has no backing, the guest's
files are intact, and the next backup is incremental.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from tests.guest.conftest import GuestEnv
from vmvault.worker import qemu_img
from vmvault.worker.backup import run_backup
from vmvault.worker.config import load_config
from vmvault.worker.live_restore import LiveRestoreResult, run_live_restore

MiB = 1024 * 1024
SPEED = 1 * MiB


def _nbdkit_pid(socket: Path) -> int:
    out = subprocess.run(
        ["pgrep", "-f", f"nbdkit.*--unix {socket}"], capture_output=True, text=True
    ).stdout.split()
    return int(out[0]) if out else 0


def test_live_restore_boots_the_guest_during_the_copy_and_pauses_it_on_a_dead_server(
    guest_env: GuestEnv,
) -> None:
    env, guest = guest_env, guest_env.guest
    guest.shell("dd if=/dev/urandom of=/mnt/data/big bs=1M count=24 2>/dev/null; sync")
    big = guest.shell("sha256sum /mnt/data/big").split()[0]
    config_file = env.tmp / "vmvault.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "repository": {"url": env.repo_url},
                "state_dir": str(env.state_dir),
                "domains": {
                    "vm": {
                        "host": "hv1",
                        "qmp": str(guest.qmp_path),
                        "guest_agent": str(guest.qga_path),
                        "launch": guest.launch(),
                    }
                },
            }
        )
    )
    config = load_config(config_file)
    full = run_backup(config, "vm")
    guest.poweroff()
    guest.guest_log.unlink()

    running = threading.Event()
    outcome: dict[str, Any] = {}
    progress: list[tuple[str, int, int]] = []

    def on_running(result: LiveRestoreResult) -> None:
        outcome["started"] = result
        running.set()

    def restore() -> None:
        try:
            outcome["result"] = run_live_restore(
                config, config_file, "vm", force=True, speed=SPEED,
                progress=lambda *p: progress.append(p),
                on_running=on_running,
                restart_delay=4.0,
            )  # fmt: skip
        except BaseException as err:
            outcome["error"] = err
        running.set()

    thread = threading.Thread(target=restore, daemon=True)
    thread.start()
    try:
        assert running.wait(60) and "error" not in outcome, outcome
        started: LiveRestoreResult = outcome["started"]
        guest.wait_ready()  # booted from the overlay, its disk mounted
        assert thread.is_alive() and progress[-1][1] < progress[-1][2] // 2, progress[-1:]
        assert guest.shell("sha256sum /mnt/data/big").split()[0] == big
        guest.shell("echo live > /mnt/data/live-file; sync")

        statuses: set[str] = set()
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                statuses.add(guest.ctl.query_status())
                time.sleep(0.05)

        os.kill(_nbdkit_pid(started.socket), signal.SIGKILL)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            # Reads reach the disk: blocks not copied yet pause the guest until the server
            # is back; then they return the backup's bytes.
            out = guest.shell(
                "echo 3 > /proc/sys/vm/drop_caches; sha256sum /mnt/data/big", timeout=180
            )
        finally:
            stop.set()
            watcher.join(5)
        assert out.split()[0] == big
        assert "io-error" in statuses, statuses

        thread.join(300)
        assert not thread.is_alive() and "error" not in outcome, outcome
        result: LiveRestoreResult = outcome["result"]
        assert result.server_restarts == 1
        image = result.disks[0].path
        info = json.loads(qemu_img.run(["info", "-U", "--backing-chain", "--output=json",
                                        str(image)], "info"))  # fmt: skip
        assert len(info) == 1 and "backing-filename" not in info[0], info
        guest.shell("echo 3 > /proc/sys/vm/drop_caches")
        assert guest.shell("sha256sum /mnt/data/big").split()[0] == big
        assert guest.shell("cat /mnt/data/live-file").strip() == "live"
        after = run_backup(config, "vm")
        assert after.kind == "incremental" and after.parent == full.backup_id, after.reason
    finally:
        started_result = outcome.get("result") or outcome.get("started")
        if started_result is not None and started_result.qemu_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(started_result.qemu_pid, signal.SIGKILL)
        thread.join(30)
