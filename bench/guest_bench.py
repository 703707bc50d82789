"""Real-guest figures: boot time under TCG, the frozen window of application-consistent
backups, and what a shut-off backup costs next to an online one.

What is measured, in one run on this machine (the test guest of tests/fixtures/guest.py:
Debian's kernel, busybox + qemu-ga initramfs, one 64 MiB ext4 disk):

1. Boot: QEMU start to the guest's "ready" (disk mounted, qemu-ga started), ``--boots``
   times.
2. Frozen window: ``--backups`` incremental backups with the guest agent while the guest
   writes and fsyncs files; ``frozen_ms`` (freeze command to the thaw's answer) median and
   max, against the reference: a bare ``guest-fsfreeze-freeze`` + ``-thaw`` round trip
   through the same client, measured in between.
3. Shut-off: incremental backups of the powered-off domain (qemu-storage-daemon started
   and stopped each time) against incremental backups of the running, idle domain; and
   the daemon's start + stop alone.

Run: .venv/bin/python bench/guest_bench.py [--boots 3] [--backups 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.guest import LinuxGuest
from tests.fixtures.guest_image import guest_image
from tests.fixtures.qemu import MiB
from vmvault.storage.repository import init_repository
from vmvault.worker.backup import run_backup
from vmvault.worker.config import FleetConfig, parse_config
from vmvault.worker.guest_agent import GuestAgent
from vmvault.worker.offline import image_paths, storage_daemon


def _config(guest: LinuxGuest, repo_url: str, state_dir: Path, agent: bool) -> FleetConfig:
    dom: dict[str, object] = {"host": "hv1", "qmp": str(guest.qmp_path), "launch": guest.launch()}
    if agent:
        dom["guest_agent"] = str(guest.qga_path)
    return parse_config(
        {"repository": {"url": repo_url}, "state_dir": str(state_dir), "domains": {"vm": dom}},
        "bench",
    )


def _ms(values: list[float]) -> str:
    return f"median {statistics.median(values):.0f} ms, max {max(values):.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--backups", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    started = time.monotonic()
    image = guest_image()
    print(f"boot files (kernel {image.kernel_version}): {time.monotonic() - started:.1f} s "
          "(build, or digest check when cached)")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="vmvb"))
    (tmp / "work").mkdir()
    (tmp / "s").mkdir()
    guest = LinuxGuest("vm", tmp / "work", tmp / "s", image, 64 * MiB)
    try:
        boots = []
        for _ in range(args.boots):
            guest.start()
            boots.append(guest.boot_seconds)
            guest.poweroff()
        print(f"boot under TCG to 'ready' ({args.boots}x): median {statistics.median(boots):.1f} s,"
              f" min {min(boots):.1f} s, max {max(boots):.1f} s")  # fmt: skip

        repo_url = f"file://{tmp / 'repo'}"
        init_repository(repo_url, chunk_size=1 * MiB).close()
        state = tmp / "st"
        with_agent = _config(guest, repo_url, state, agent=True)
        without = _config(guest, repo_url, state, agent=False)
        guest.start()
        run_backup(without, "vm")  # the full one
        guest.start_writer("w", pause=0.02)
        guest.wait_fsynced(3)
        frozen, paused, bare = [], [], []
        for _ in range(args.backups):
            result = run_backup(with_agent, "vm")
            assert result.consistency == "application" and result.frozen_ms is not None
            frozen.append(result.frozen_ms)
            paused.append(result.paused_ms)
            with GuestAgent("vm", guest.qga_path) as agent:
                agent.ping()
                t0 = time.monotonic()
                agent.fsfreeze_freeze()
                agent.fsfreeze_thaw()
                bare.append((time.monotonic() - t0) * 1000)
        guest.stop_writer("w")
        print(f"frozen window, {args.backups} backups while the guest writes: {_ms(frozen)} "
              f"(of which guest paused: {_ms(paused)})")  # fmt: skip
        print(f"reference, bare freeze + thaw round trip: {_ms(bare)}; ratio of medians "
              f"{statistics.median(frozen) / statistics.median(bare):.2f}x")  # fmt: skip

        online = []
        for _ in range(args.rounds):
            guest.shell("dd if=/dev/urandom of=/mnt/data/chg bs=64k count=16 2>/dev/null; sync")
            t0 = time.monotonic()
            run_backup(without, "vm")
            online.append((time.monotonic() - t0) * 1000)
        guest.poweroff()
        offline, daemon = [], []
        images = image_paths(without.domains["vm"], None)
        for _ in range(args.rounds):
            t0 = time.monotonic()
            result = run_backup(without, "vm")
            offline.append((time.monotonic() - t0) * 1000)
            assert result.state == "shut-off" and result.kind == "incremental"
            t0 = time.monotonic()
            with storage_daemon("vm", images, state, 30):
                pass
            daemon.append((time.monotonic() - t0) * 1000)
        print(f"incremental backup, running idle domain ({args.rounds}x): {_ms(online)}")
        print(f"incremental backup, shut-off domain ({args.rounds}x): {_ms(offline)}; "
              f"qemu-storage-daemon start + stop alone: {_ms(daemon)}")  # fmt: skip
    finally:
        guest.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
