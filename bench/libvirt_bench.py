"""libvirt benchmark: vmvault next to virtnbdbackup on the same image, in the same run.

Both back up through libvirt's pull-mode backup API (checkpoint + NBD export); one run,
on a private libvirtd (as tests/fixtures/libvirt.py starts it) with TCG domains:

1. A qcow2 of ``--size`` (512 MiB; 128 MiB with ``--quick``), two thirds data in 4 MiB
   stripes (random, compressible text, zeros), copied into two domains: one for vmvault,
   one for virtnbdbackup, so neither tool's checkpoints meet the other's.
2. Full backup: ``run_backup`` (file:// repository) vs ``virtnbdbackup -l full``.
3. The same ``--writes`` (200) random 64 KiB guest writes of fresh random bytes on both
   domains (HMP ``qemu-io write -s FILE`` through libvirt's monitor passthrough).
4. Incremental: ``run_backup`` vs ``virtnbdbackup -l inc``.
5. Restore of the newest backup to image files: ``run_restore --to`` vs
   ``virtnbdrestore -i -o``; each result compared with its domain's disk
   (``qemu-img compare``).

Per step: wall time and the bytes the backup directory grew by (``du -sb``). Figures are
printed, never asserted. Without virtnbdbackup the comparison column is skipped with a
message. Run from the repository root: ``.venv/bin/python bench/libvirt_bench.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.libvirt import Libvirtd, LibvirtVm  # noqa: E402
from vmvault.storage.repository import init_repository  # noqa: E402
from vmvault.worker import qemu_img  # noqa: E402
from vmvault.worker.backup import run_backup  # noqa: E402
from vmvault.worker.config import FleetConfig, parse_config  # noqa: E402
from vmvault.worker.restore import run_restore  # noqa: E402

MiB = 1024 * 1024
STRIPE = 4 * MiB
WRITE = 64 * 1024


def _make_image(path: Path, size: int) -> None:
    """Two thirds data (random, then compressible text), one third zeros, in stripes."""
    raw = path.with_suffix(".raw")
    rng = random.Random(1)
    with raw.open("wb") as out:
        for index in range(size // STRIPE):
            kind = index % 3
            if kind == 0:
                out.write(rng.randbytes(STRIPE))
            elif kind == 1:
                out.write(bytes(rng.choice(b"abcdefghijklmnop") for _ in range(4096)) * 1024)
            else:
                out.write(bytes(STRIPE))
    qemu_img.run(["convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], "converting")
    raw.unlink()


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _timed(action: object) -> float:
    started = time.monotonic()
    action()  # type: ignore[operator]
    return time.monotonic() - started


def _vm(daemon: Libvirtd, name: str, workdir: Path, image: Path) -> LibvirtVm:
    workdir.mkdir()
    shutil.copyfile(image, workdir / "vda.qcow2")
    vm = LibvirtVm(daemon, name, workdir, [], {"vda": workdir / "vda.qcow2"})
    vm.start()
    return vm


def _writes(vms: list[LibvirtVm], count: int, size: int, tmp: Path) -> None:
    rng = random.Random(2)
    for index in range(count):
        src = tmp / f"w{index}.bin"
        src.write_bytes(os.urandom(WRITE))
        offset = rng.randrange(size // WRITE) * WRITE
        for vm in vms:
            vm.qemu_io("vda", f"write -s {src} {offset} {WRITE}")
        src.unlink()


def _vnb(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {proc.stderr.strip()[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB disk, 50 writes")
    parser.add_argument("--size", type=int, default=512, help="disk size in MiB")
    parser.add_argument("--writes", type=int, default=200, help="random 64 KiB guest writes")
    args = parser.parse_args()
    size = (128 if args.quick else args.size) * MiB
    writes = 50 if args.quick else args.writes
    have_vnb = shutil.which("virtnbdbackup") is not None and shutil.which("virtnbdrestore")
    if not have_vnb:
        print("virtnbdbackup not found (apt-get install virtnbdbackup): vmvault figures only")
    if os.geteuid() != 0:
        print("libvirt bench: needs root (private libvirtd in a mount namespace)")
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="vmvlb"))
    daemon = Libvirtd(tmp / "libvirtd")
    (tmp / "libvirtd").mkdir()
    try:
        daemon.start()
        image = tmp / "base.qcow2"
        _make_image(image, size)
        ours = _vm(daemon, "vmv", tmp / "vmv", image)
        theirs = _vm(daemon, "vnb", tmp / "vnb", image) if have_vnb else None
        repo_dir = tmp / "repo"
        init_repository(f"file://{repo_dir}").close()
        config: FleetConfig = parse_config(
            {
                "repository": {"url": f"file://{repo_dir}"},
                "state_dir": str(tmp / "st"),
                "domains": {"vmv": {"host": "h", "libvirt": {"uri": daemon.uri}}},
            },
            "bench",
        )
        vnb_dir = tmp / "vnb-backup"
        vnb_common = ["-U", daemon.uri, "-d", "vnb", "-o", str(vnb_dir), "-n",
                      "-S", str(tmp), "-f", str(tmp / "vnb.sock")]  # fmt: skip
        rows: list[tuple[str, float, int, float | None, int | None]] = []

        def step(name: str, mine: object, vnb_level: str | None) -> None:
            before = _du(repo_dir)
            seconds = _timed(mine)
            grown = _du(repo_dir) - before
            their_s: float | None = None
            their_b: int | None = None
            if theirs is not None and vnb_level is not None:
                vnb_before = _du(vnb_dir)
                their_s = _timed(lambda: _vnb(["virtnbdbackup", "-l", vnb_level, *vnb_common]))
                their_b = _du(vnb_dir) - vnb_before
            rows.append((name, seconds, grown, their_s, their_b))

        step("full backup", lambda: run_backup(config, "vmv", "full"), "full")
        _writes([ours] + ([theirs] if theirs else []), writes, size, tmp)
        newest: list[str] = []
        step(
            "incremental backup",
            lambda: newest.append(run_backup(config, "vmv", "incremental").backup_id),
            "inc",
        )
        out_ours, out_theirs = tmp / "restore-vmv", tmp / "restore-vnb"
        restore_s = _timed(lambda: run_restore(config, "vmv", backup_id=newest[0], to_dir=out_ours))
        restore_theirs: float | None = None
        if theirs is not None:
            vnb_restore = ["virtnbdrestore", "-U", daemon.uri, "-i", str(vnb_dir),
                           "-o", str(out_theirs), "-n", "-f", str(tmp / "vnbr.sock")]  # fmt: skip
            restore_theirs = _timed(lambda: _vnb(vnb_restore))
        ours.qemu_io("vda", "flush")
        same_ours = qemu_img.identical(out_ours / "vda.qcow2", ours.disks["vda"])
        print(f"\nlibvirt bench: {size // MiB} MiB disk, {writes} random 64 KiB writes")
        print(f"{'step':<22}{'vmvault s':>11}{'bytes':>14}{'virtnbdbackup s':>17}{'bytes':>14}")
        for name, secs, grown, their_s, their_b in rows:
            theirs_cols = (
                f"{their_s:>17.2f}{their_b:>14}" if their_s is not None else f"{'-':>17}{'-':>14}"
            )
            print(f"{name:<22}{secs:>11.2f}{grown:>14}{theirs_cols}")
        theirs_restore = f"{restore_theirs:>17.2f}" if restore_theirs is not None else f"{'-':>17}"
        print(f"{'restore newest':<22}{restore_s:>11.2f}{'':>14}{theirs_restore}")
        print(f"vmvault restore equals the domain's disk: {same_ours}")
        if theirs is not None:
            theirs.qemu_io("vda", "flush")
            restored = next(iter(sorted(out_theirs.glob("vda*"))), None)
            same = restored is not None and qemu_img.identical(
                restored, theirs.disks["vda"], "qcow2", "qcow2"
            )
            print(f"virtnbdrestore equals the domain's disk: {same} ({restored})")
        for vm in (ours, theirs):
            if vm is not None:
                vm.remove()
    finally:
        daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
