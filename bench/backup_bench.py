"""Backup benchmark: full and incremental pull backups of a 2 GiB mixed qcow2 behind real QEMU.

Prints, in one run:
- full backup throughput into ``file://`` and its ratio to ``nbdcopy`` of the same
  fleeced export to ``null:`` (target ≥ 0.5×);
- an incremental after 1% scattered 64 KiB writes: duration as a share of the full's
  (target ≤ 5%), bytes read and uploaded vs dirty bytes;
- peak RSS of the backup process (target ≤ 300 MiB), for 2 GiB and 8 GiB virtual size;
- the same full backup into a SeaweedFS ``s3://`` repository.

Run from the repository root: ``.venv/bin/python bench/backup_bench.py [--size-gib 2]``.
Each backup runs in a child process so its peak RSS is its own (``wait4`` rusage).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.common import free_port  # noqa: E402
from tests.fixtures.qemu import QemuVm  # noqa: E402
from tests.fixtures.s3 import SeaweedS3  # noqa: E402
from vmvault.storage.repository import init_repository  # noqa: E402
from vmvault.worker.backup import run_backup  # noqa: E402
from vmvault.worker.cleanup import nbd_socket_path  # noqa: E402
from vmvault.worker.config import FleetConfig, parse_config  # noqa: E402

KiB, MiB, GiB = 1024, 1024**2, 1024**3
STRIPE = 64 * MiB
_LETTERS = bytes(range(256)).translate(bytes(b"abcdefghijklmnop"[i % 16] for i in range(256)))


def make_image(raw: Path, qcow2: Path, size: int) -> None:
    """⅓ random, ⅓ compressible (16-letter alphabet, zstd ~2×), ⅓ zero, in 64 MiB stripes."""
    with raw.open("wb") as f:
        f.truncate(size)
        for index, offset in enumerate(range(0, size, STRIPE)):
            length = min(STRIPE, size - offset)
            kind = index % 3
            if kind == 2:
                continue  # zero stripe: a hole
            f.seek(offset)
            for pos in range(0, length, 4 * MiB):
                block = os.urandom(min(4 * MiB, length - pos))
                f.write(block if kind == 0 else block.translate(_LETTERS))
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    raw.unlink()


def config_for(vm: QemuVm, url: str, state_dir: Path, endpoint: str | None = None) -> FleetConfig:
    repo: dict[str, Any] = {"url": url}
    if endpoint:
        repo["endpoint_url"] = endpoint
    return parse_config(
        {
            "repository": repo,
            "state_dir": str(state_dir),
            "domains": {"vm": {"host": "bench", "qmp": str(vm.qmp_path)}},
        },
        "bench",
    )


_CHILD = """
import json, sys
from vmvault.worker.config import parse_config
from vmvault.worker.backup import run_backup
config = parse_config(json.loads(sys.argv[1]), "bench")
print(json.dumps(run_backup(config, "vm", sys.argv[2]).to_json()))
"""


def backup_child(
    config: FleetConfig, mode: str, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], float, int]:
    """Run one backup in a child process: (result, CPU seconds, peak RSS bytes)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(config.model_dump(mode="json")), mode],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"backup child failed (status {status}) after {time.monotonic() - start}s")
    return json.loads(out), usage.ru_utime + usage.ru_stime, usage.ru_maxrss * KiB


def nbdcopy_baseline(config: FleetConfig, disk: str) -> float:
    """Seconds for ``nbdcopy`` of the fleeced export to ``null:``, measured inside a backup.

    The first progress report of a backup comes when the export is live and nothing has
    been read: nbdcopy reads the very same fleeced export then.
    """
    seconds: list[float] = []

    def measure(phase: str, done: int, total: int) -> None:
        if seconds:
            return
        sock = nbd_socket_path(config.state_dir, "vm")
        start = time.monotonic()
        subprocess.run(["nbdcopy", f"nbd+unix:///{disk}?socket={sock}", "null:"], check=True)
        seconds.append(time.monotonic() - start)

    run_backup(config, "vm", "full", progress=measure)
    return seconds[0]


def scattered_writes(vm: QemuVm, size: int, share: float, seed: int = 42) -> int:
    """Write ``share`` of the disk as distinct random 64 KiB blocks; returns bytes written."""
    blocks = int(size * share) // (64 * KiB)
    rng = random.Random(seed)
    for block in rng.sample(range(size // (64 * KiB)), blocks):
        vm.write("vda", block * 64 * KiB, 64 * KiB, pattern=rng.randrange(1, 256))
    return blocks * 64 * KiB


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=int, default=2)
    parser.add_argument("--big-gib", type=int, default=8, help="virtual size of the RSS check")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument(
        "--small-chunk-kib", type=int, default=256, help="also measure with this chunk size"
    )
    args = parser.parse_args()
    size = args.size_gib * GiB
    work = Path(tempfile.mkdtemp(prefix="vmvbench-", dir="/var/tmp"))
    vms: list[QemuVm] = []
    weed: SeaweedS3 | None = None
    state = Path(tempfile.mkdtemp(prefix="vmvbs"))  # short: the NBD socket lives under it
    try:
        print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        t0 = time.monotonic()
        image = work / "disk.qcow2"
        make_image(work / "disk.raw", image, size)
        os.sync()
        print(f"image: {args.size_gib} GiB qcow2, ⅓ random ⅓ compressible ⅓ zero "
              f"({time.monotonic() - t0:.0f}s to build)")  # fmt: skip

        def start_vm(name: str, source: Path, virtual: int) -> QemuVm:
            sockdir = Path(tempfile.mkdtemp(prefix="vmvb"))
            vmdir = work / name
            vmdir.mkdir()
            vm = QemuVm(name, vmdir, sockdir, [GiB])
            shutil.copyfile(source, vm.disks["vda"].path)
            os.sync()  # no writeback of the copy during the measurements
            if virtual != size:
                subprocess.run(["qemu-img", "resize", "-q", str(vm.disks["vda"].path),
                                str(virtual)], check=True)  # fmt: skip
            vm.disks["vda"].size = virtual
            vms.append(vm)
            vm.start()
            return vm

        vm = start_vm("vm", image, size)
        url = f"file://{work / 'repo'}"
        init_repository(url).close()
        config = config_for(vm, url, state)

        full, full_cpu, full_rss = backup_child(config, "full")
        data = full["disks"][0]["bytes_read"]
        print(f"full → file://: {full['duration_s']:.2f}s ({full_cpu:.2f} CPU-s in the backup "
              f"process, {full_cpu / (data / GiB):.2f} CPU-s per GiB of data), "
              f"read {mib(data)} of {mib(size)}, uploaded {mib(full['disks'][0]['bytes_uploaded'])}"
              f", {data / full['duration_s'] / MiB:.0f} MiB/s of data, "
              f"{size / full['duration_s'] / MiB:.0f} MiB/s of virtual disk")  # fmt: skip
        copy_s = nbdcopy_baseline(config, "vda")
        print(f"nbdcopy fleeced export → null: {copy_s:.2f}s ({data / copy_s / MiB:.0f} MiB/s); "
              f"ratio backup/nbdcopy throughput = {copy_s / full['duration_s']:.2f}× "
              "(target ≥ 0.5×)")  # fmt: skip

        written = scattered_writes(vm, size, 0.01)
        inc, _, inc_rss = backup_child(config, "incremental")
        disk = inc["disks"][0]
        print(f"incremental after {mib(written)} of 64 KiB writes: {inc['duration_s']:.2f}s = "
              f"{100 * inc['duration_s'] / full['duration_s']:.1f}% of the full (target ≤ 5%); "
              f"dirty {mib(disk['dirty_bytes'])}, read {mib(disk['bytes_read'])}, "
              f"uploaded {mib(disk['bytes_uploaded'])}")  # fmt: skip
        print(f"peak RSS: full {mib(full_rss)}, incremental {mib(inc_rss)} (target ≤ 300 MiB)")

        if args.small_chunk_kib:
            # The same incremental with smaller repository chunks: less re-read per 64 KiB write.
            small_url = f"file://{work / 'repo-small'}"
            init_repository(small_url, chunk_size=args.small_chunk_kib * KiB).close()
            small_cfg = config_for(vm, small_url, state)
            small_full, _, _ = backup_child(small_cfg, "full")
            scattered_writes(vm, size, 0.01, seed=7)
            small_inc, _, _ = backup_child(small_cfg, "incremental")
            d = small_inc["disks"][0]
            print(f"with {args.small_chunk_kib} KiB chunks: full {small_full['duration_s']:.2f}s, "
                  f"incremental {small_inc['duration_s']:.2f}s = "
                  f"{100 * small_inc['duration_s'] / small_full['duration_s']:.1f}% of it; "
                  f"dirty {mib(d['dirty_bytes'])}, read {mib(d['bytes_read'])}, "
                  f"uploaded {mib(d['bytes_uploaded'])}")  # fmt: skip

        if args.big_gib:
            big = start_vm("big", image, args.big_gib * GiB)
            big_url = f"file://{work / 'repo-big'}"
            init_repository(big_url).close()
            big_full, _, big_rss = backup_child(config_for(big, big_url, state), "full")
            print(f"peak RSS at {args.big_gib} GiB virtual (same data): {mib(big_rss)} "
                  f"(full {big_full['duration_s']:.2f}s)")  # fmt: skip
            big.stop()

        if not args.no_s3:
            weed_bin = shutil.which("weed") or str(ROOT / ".venv" / "bin" / "weed")
            names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                     "s3_grpc")  # fmt: skip
            key = "VMVBENCH" + secrets.token_hex(4).upper()
            ports = {n: free_port() for n in names}
            weed = SeaweedS3(weed_bin, work, free_port(), ports, key, secrets.token_hex(20))
            weed.start()
            bucket = weed.new_bucket()
            env = {"AWS_ACCESS_KEY_ID": weed.access_key, "AWS_SECRET_ACCESS_KEY": weed.secret_key,
                   "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
            os.environ.update(env)
            s3_url = f"s3://{bucket}/repo"
            init_repository(s3_url, endpoint_url=weed.endpoint_url).close()
            s3_cfg = config_for(vm, s3_url, state, weed.endpoint_url)
            s3_full, _, s3_rss = backup_child(s3_cfg, "full", env)
            d = s3_full["disks"][0]
            print(f"full → s3:// (SeaweedFS): {s3_full['duration_s']:.2f}s, "
                  f"{d['bytes_read'] / s3_full['duration_s'] / MiB:.0f} MiB/s of data, "
                  f"uploaded {mib(d['bytes_uploaded'])}, peak RSS {mib(s3_rss)}")  # fmt: skip
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        for vm in vms:
            vm.stop()
            shutil.rmtree(vm.sockdir, ignore_errors=True)
        if weed is not None:
            weed.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
