"""Incremental benchmark: what an incremental backup costs next to what the guest changed.

Measures whatever repository format the checkout's ``vmvault init`` makes, and prints it.
One run, on a real QEMU (TCG, no guest OS, the blank VM of scheduler/blank_vm.py):

1. A qcow2 of ``--size`` (1 GiB; 256 MiB with ``--quick``) holding two thirds data, in 4 MiB
   stripes: random, compressible (16-letter alphabet), zero, repeating. ``vmvault init``,
   then a full ``vmvault backup``.
2. Workloads, each followed by ``vmvault backup --mode incremental``:
   A. 300 random 4 KiB writes at random offsets of the disk;
   B. 1 % of the data bytes rewritten as random 4 KiB writes inside the data stripes;
   C. 10 % likewise;
   D. one 64 MiB sequential write.
   Guest writes go through the device's block backend (HMP ``qemu-io``), with fresh random
   bytes each (``write -s FILE``), so nothing dedups or compresses that a guest's would not.
   Per backup: dirty / read / uploaded bytes (``backup --json``), repository growth and
   objects added (a listing of the whole repository before and after: on s3:// the objects
   added are the PUTs that stay, manifest and index included; file:// also gets ``du -sb``),
   the backup's own duration and the CLI process's wall time, both as a share of the full's.
3. ``--rounds`` (30; 5 with ``--quick``) rounds of workload A + incremental: growth/dirty.
4. ``vmvault restore --to DIR`` of the newest backup and of the first full: wall time; the
   newest restore is compared with the VM's disk (``qemu-img compare``).
5. Bytes fetched from the repository to read the newest backup and the first full, through
   the Python API (``Repository.read_disk``) with the backend wrapped in a counter of what
   ``get`` and ``get_range`` return, per data byte read.

Targets are printed as PASS/MISS lines, never asserted. ``--s3`` runs everything against a
private SeaweedFS (as tests/fixtures/s3.py starts it) instead of file://. Run from the
repository root: ``.venv/bin/python bench/incremental_bench.py [--quick] [--s3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.common import free_port  # noqa: E402
from tests.fixtures.qemu import QemuVm  # noqa: E402
from tests.fixtures.s3 import SeaweedS3  # noqa: E402
from vmvault.storage.backends.base import Backend  # noqa: E402
from vmvault.storage.errors import StorageError  # noqa: E402
from vmvault.storage.format import Manifest  # noqa: E402
from vmvault.storage.repository import Repository, open_repository  # noqa: E402

KiB, MiB, GiB = 1024, 1024**2, 1024**3
STRIPE = 4 * MiB
BLOCK = 4 * KiB
DOMAIN = "vm"
DISK = "vda"
_LETTERS = bytes(range(256)).translate(bytes(b"abcdefghijklmnop"[i % 16] for i in range(256)))

# Targets from the format 2 issue: printed next to the figures, not asserted.
READ_PER_DIRTY = 1.5
GROWTH_PER_DIRTY = 1.5
INCREMENTAL_SHARE = 0.15
FETCH_PER_DATA = 1.3


# --------------------------------------------------------------------------- the image


def make_image(raw: Path, qcow2: Path, size: int) -> list[int]:
    """Write the mixed image; returns the offsets of its data (non-zero) stripes."""
    data_stripes: list[int] = []
    with raw.open("wb") as f:
        f.truncate(size)
        for index, offset in enumerate(range(0, size, STRIPE)):
            kind = index % 3
            if kind == 2:
                continue  # zero stripe: a hole
            block = os.urandom(STRIPE)
            f.seek(offset)
            f.write(block if kind == 0 else block.translate(_LETTERS))
            data_stripes.append(offset)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    raw.unlink()
    return data_stripes


# --------------------------------------------------------------------------- measuring


class CountingBackend:
    """A backend proxy that counts the bytes (and calls) ``get`` and ``get_range`` return."""

    def __init__(self, inner: Backend) -> None:
        self._inner = inner
        self.url = inner.url
        self.bytes = 0
        self.calls = 0
        self._lock = threading.Lock()  # read_disk fetches from a thread pool

    def _count(self, data: bytes) -> bytes:
        with self._lock:
            self.bytes += len(data)
            self.calls += 1
        return data

    def get(self, key: str, max_size: int | None = None) -> bytes:
        return self._count(self._inner.get(key, max_size))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._count(self._inner.get_range(key, offset, length))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class Snapshot:
    """The repository as listed: bytes and object count, per top-level prefix too."""

    total: int
    count: int
    by_prefix: Counter[str] = field(default_factory=Counter)
    du: int | None = None


@dataclass
class Step:
    """One backup and what it cost."""

    label: str
    written: int
    result: dict[str, Any]
    wall_s: float
    before: Snapshot
    after: Snapshot
    puts: int = 0  # the manifest's own count of objects written (version 2 stats), else 0

    @property
    def disk(self) -> dict[str, Any]:
        disk: dict[str, Any] = self.result["disks"][0]
        return disk

    @property
    def growth(self) -> int:
        return self.after.total - self.before.total

    @property
    def objects(self) -> int:
        return self.after.count - self.before.count

    @property
    def new_by_prefix(self) -> str:
        delta = self.after.by_prefix - self.before.by_prefix
        listed = " ".join(f"{k}+{v}" for k, v in sorted(delta.items()))
        return f"{listed} (manifest: {self.puts} put)" if self.puts else listed


class Bench:
    """The VM, the repository and the ``vmvault`` CLI pointed at both."""

    def __init__(self, work: Path, vm: QemuVm, url: str, endpoint: str | None, env: dict[str, str]):
        self.work = work
        self.vm = vm
        self.url = url
        self.endpoint = endpoint
        self.env = {**os.environ, **env}
        self.rng = random.Random(20261203)
        self.state = Path(tempfile.mkdtemp(prefix="vmvis"))  # short: NBD socket lives under it
        self.config = work / "vmvault.json"
        repo: dict[str, Any] = {"url": url}
        if endpoint:
            repo["endpoint_url"] = endpoint
        self.config.write_text(
            json.dumps(
                {
                    "repository": repo,
                    "state_dir": str(self.state),
                    "domains": {DOMAIN: {"host": "bench", "qmp": str(vm.qmp_path)}},
                }
            )
        )
        self.pattern = work / "pattern.bin"
        self.written = 0

    def cli(self, *args: str) -> tuple[dict[str, Any], float]:
        """Run ``vmvault --json ARGS``: its JSON document and the process's wall time."""
        argv = [sys.executable, "-m", "vmvault", "--config", str(self.config), "--json", *args]
        start = time.monotonic()
        proc = subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True)
        wall = time.monotonic() - start
        if proc.returncode != 0:
            raise SystemExit(f"vmvault {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc, wall

    def open(self) -> Repository:
        return open_repository(self.url, endpoint_url=self.endpoint)

    def snapshot(self) -> Snapshot:
        with self.open() as repo:
            objects = list(repo.backend.list(""))
        snap = Snapshot(sum(o.size for o in objects), len(objects))
        snap.by_prefix.update(o.key.split("/", 1)[0] for o in objects)
        if self.url.startswith("file://"):
            du = subprocess.run(
                ["du", "-sb", self.url.removeprefix("file://")],
                capture_output=True,
                text=True,
                check=True,
            )
            snap.du = int(du.stdout.split()[0])
        return snap

    def backup(self, label: str, mode: str) -> Step:
        before = self.snapshot()
        result, wall = self.cli("backup", DOMAIN, "--mode", mode)
        if result["kind"] != mode:
            raise SystemExit(f"{label}: asked for {mode}, vmvault took a {result['kind']} backup")
        with self.open() as repo:
            try:
                manifest = repo.load_manifest(DOMAIN, result["backup_id"])
            except StorageError as err:
                # Measuring on would only measure fulls: say what broke instead.
                raise SystemExit(
                    f"{label}: vmvault committed backup {result['backup_id']} but cannot read "
                    f"its manifest back: {err}"
                ) from None
        puts = sum(d.stats.objects_put for d in manifest.disks) if manifest.version >= 2 else 0
        step = Step(label, self.written, result, wall, before, self.snapshot(), puts)
        self.written = 0
        return step

    # -- guest writes -------------------------------------------------------------------------

    def write(self, offset: int, length: int) -> None:
        """One guest write of fresh random bytes (qemu-io reads them from a file)."""
        self.pattern.write_bytes(os.urandom(length))
        self.vm.qemu_io(DISK, f"write -q -s {self.pattern} {offset} {length}")
        self.written += length

    def scattered(self, blocks: list[int]) -> None:
        for block in blocks:
            self.write(block * BLOCK, BLOCK)

    def random_blocks(self, count: int, size: int) -> list[int]:
        """``count`` distinct 4 KiB blocks anywhere on the disk."""
        return self.rng.sample(range(size // BLOCK), count)

    def data_blocks(self, count: int, stripes: list[int]) -> list[int]:
        """``count`` distinct 4 KiB blocks inside the data stripes."""
        per = STRIPE // BLOCK
        picks = self.rng.sample(range(len(stripes) * per), count)
        return [stripes[p // per] // BLOCK + p % per for p in picks]

    # -- reading back -------------------------------------------------------------------------

    def restore(self, backup_id: str, out: Path) -> tuple[float, dict[str, Any]]:
        doc, wall = self.cli("restore", DOMAIN, "--backup", backup_id, "--to", str(out))
        if not all(d["verified"] for d in doc["disks"]):
            raise SystemExit(f"restore of {backup_id} reported an unverified disk")
        return wall, doc

    def fetched(self, backup_id: str) -> tuple[int, int, int, float]:
        """Read one backup's disk through the API: (bytes fetched, GETs, data bytes, s)."""
        with self.open() as repo:
            counter = CountingBackend(repo.backend)
            manifest: Manifest = repo.load_manifest(DOMAIN, backup_id)
            # The disk's data as the spec counts it: its non-zero 64 KiB sub-blocks.
            data = sum(r.data_bytes() for r in repo.disk_reader(manifest, DISK).index.regions)
            # Format 2 pieces are read through repo.regions, which holds the backend too.
            repo.backend = repo.regions.backend = counter
            start = time.monotonic()
            try:
                for _, _chunk in repo.read_disk(manifest, DISK):
                    pass
            finally:
                # So that closing the repository closes the real backend.
                repo.backend = repo.regions.backend = counter._inner
            elapsed = time.monotonic() - start
        return counter.bytes, counter.calls, data, elapsed


# --------------------------------------------------------------------------- printing


def mib(n: float) -> str:
    return f"{n / MiB:.2f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def print_table(steps: list[Step], full: Step, file_repo: bool) -> None:
    head = (
        f"{'backup':<12}{'written':>9}{'dirty':>9}{'read':>9}{'upload':>9}{'growth':>9}"
        + (f"{'du Δ':>9}" if file_repo else "")
        + f"{'objects':>8}{'rd/dty':>7}{'gr/dty':>7}{'time s':>8}{'/full':>7}{'wall s':>8}"
        f"{'/full':>7}  new objects by prefix"
    )
    print(head)
    print("(sizes in MiB; time = the backup's duration_s, wall = the CLI process)")
    for s in steps:
        d = s.disk
        du = f"{mib((s.after.du or 0) - (s.before.du or 0)):>9}" if file_repo else ""
        print(
            f"{s.label:<12}{mib(s.written):>9}{mib(d['dirty_bytes']):>9}{mib(d['bytes_read']):>9}"
            f"{mib(d['bytes_uploaded']):>9}{mib(s.growth):>9}{du}{s.objects:>8}"
            f"{ratio(d['bytes_read'], d['dirty_bytes']):>7.2f}"
            f"{ratio(s.growth, d['dirty_bytes']):>7.2f}"
            f"{s.result['duration_s']:>8.2f}"
            f"{s.result['duration_s'] / full.result['duration_s']:>7.3f}"
            f"{s.wall_s:>8.2f}{s.wall_s / full.wall_s:>7.3f}  {s.new_by_prefix}"
        )


def targets(steps: list[Step], full: Step) -> None:
    for s in steps:
        if s is full:
            continue
        d = s.disk
        read = ratio(d["bytes_read"], d["dirty_bytes"])
        grow = ratio(s.growth, d["dirty_bytes"])
        print(
            f"{verdict(read <= READ_PER_DIRTY)} {s.label}: read {read:.2f}× dirty "
            f"(target ≤ {READ_PER_DIRTY}×)"
        )
        print(
            f"{verdict(grow <= GROWTH_PER_DIRTY)} {s.label}: growth {grow:.2f}× dirty "
            f"(target ≤ {GROWTH_PER_DIRTY}×)"
        )
        if s.label.startswith("A"):
            share = s.result["duration_s"] / full.result["duration_s"]
            wall = s.wall_s / full.wall_s
            print(
                f"{verdict(share <= INCREMENTAL_SHARE)} {s.label}: incremental "
                f"{100 * share:.1f}% of the full's duration_s (target ≤ "
                f"{100 * INCREMENTAL_SHARE:.0f}%); CLI wall {100 * wall:.1f}% of the full's "
                f"({s.wall_s:.2f}s vs {full.wall_s:.2f}s)"
            )


# --------------------------------------------------------------------------- main


def start_seaweed(work: Path) -> tuple[SeaweedS3, str, str, dict[str, str]]:
    binary = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
    ports = {n: free_port() for n in names}
    (work / "s3").mkdir()
    weed = SeaweedS3(
        binary,
        work / "s3",
        free_port(),
        ports,
        "VMVBENCH" + secrets.token_hex(4).upper(),
        secrets.token_hex(20),
    )
    weed.start()
    bucket = weed.new_bucket()
    env = {
        "AWS_ACCESS_KEY_ID": weed.access_key,
        "AWS_SECRET_ACCESS_KEY": weed.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)  # the in-process reads (listings, read_disk) need them too
    return weed, f"s3://{bucket}/repo", weed.endpoint_url, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB disk, 5 rounds (smoke run)")
    parser.add_argument("--s3", action="store_true", help="a SeaweedFS s3:// repository")
    parser.add_argument("--rounds", type=int, help="rounds of 300 writes (default 30; quick 5)")
    args = parser.parse_args()
    size = 256 * MiB if args.quick else GiB
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 30)

    work = Path(tempfile.mkdtemp(prefix="vmvincbench-", dir="/var/tmp"))
    sockdir = Path(tempfile.mkdtemp(prefix="vmvi"))
    vm: QemuVm | None = None
    weed: SeaweedS3 | None = None
    bench: Bench | None = None
    try:
        print(
            f"load average at start: {'{:.2f} {:.2f} {:.2f}'.format(*os.getloadavg())} "
            f"on {os.cpu_count()} cores"
        )
        t0 = time.monotonic()
        image = work / "image.qcow2"
        stripes = make_image(work / "image.raw", image, size)
        data_bytes = len(stripes) * STRIPE
        (work / "vm").mkdir()
        vm = QemuVm("vm", work / "vm", sockdir, [size])
        shutil.copyfile(image, vm.disks[DISK].path)
        image.unlink()
        os.sync()  # no writeback of the copy during the measurements
        vm.start()
        print(
            f"disk: {size // MiB} MiB qcow2, {data_bytes / MiB:.0f} MiB data in 4 MiB stripes "
            f"(random, compressible, zero, ...) ({time.monotonic() - t0:.0f}s to build)"
        )

        if args.s3:
            weed, url, endpoint, env = start_seaweed(work)
        else:
            url, endpoint, env = f"file://{work / 'repo'}", None, {}
        bench = Bench(work, vm, url, endpoint, env)
        init, _ = bench.cli("init")
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        print(f"code measured: {ROOT} ({f'commit {head}' if head else 'not a git checkout'})")
        print(
            f"repository: {url}, chunk size {init['chunk_size'] // KiB} KiB, "
            f"config version {init['version']}"
        )

        full = bench.backup("full", "full")
        steps = [full]

        bench.scattered(bench.random_blocks(300, size))
        steps.append(bench.backup("A 300×4K", "incremental"))
        count = int(data_bytes * 0.01) // BLOCK
        bench.scattered(bench.data_blocks(count, stripes))
        steps.append(bench.backup("B 1% data", "incremental"))
        count = int(data_bytes * 0.10) // BLOCK
        bench.scattered(bench.data_blocks(count, stripes))
        steps.append(bench.backup("C 10% data", "incremental"))
        bench.write(bench.rng.randrange((size - 64 * MiB) // BLOCK + 1) * BLOCK, 64 * MiB)
        steps.append(bench.backup("D 64M seq", "incremental"))

        round_steps: list[Step] = []
        for number in range(1, rounds + 1):
            bench.scattered(bench.random_blocks(300, size))
            step = bench.backup(f"round {number}", "incremental")
            round_steps.append(step)
            print(
                f"round {number:>2}: dirty {mib(step.disk['dirty_bytes'])} MiB, growth "
                f"{mib(step.growth)} MiB ({ratio(step.growth, step.disk['dirty_bytes']):.2f}×)"
                f", {step.objects} objects, {step.result['duration_s']:.2f}s"
            )

        with bench.open() as repo:
            manifests = repo.list_manifests(DOMAIN)
            config_version = repo.config.version
        newest = manifests[-1]
        first = full.result["backup_id"]
        print()
        print(
            f"format measured: config version {config_version}, manifest versions "
            f"{sorted({m.version for m in manifests})}, {len(manifests)} backups"
        )
        print_table(steps, full, not args.s3)
        if round_steps:
            ratios = [ratio(s.growth, s.disk["dirty_bytes"]) for s in round_steps]
            mean = statistics.mean(ratios)
            print(
                f"{rounds} rounds of 300×4K + incremental: growth/dirty mean {mean:.2f}×, "
                f"min {min(ratios):.2f}×, max {max(ratios):.2f}×; objects added mean "
                f"{statistics.mean(s.objects for s in round_steps):.1f}; duration mean "
                f"{statistics.mean(s.result['duration_s'] for s in round_steps):.2f}s; "
                f"repository {mib(round_steps[-1].after.total)} MiB in "
                f"{round_steps[-1].after.count} objects"
            )
        print("targets:")
        targets(steps, full)
        if round_steps:
            # No target: the price of the restore bound is a region rewritten whole once
            # its fragments pass a quarter of its data (docs/repository-format.md, 24).
            print(f"info rounds: mean growth {mean:.2f}× dirty")

        # Restores: the newest backup (the end of the chain) and the first full.
        new_wall, new_doc = bench.restore(newest.backup_id, work / "restore-newest")
        current = vm.capture(DISK, work / "current.raw")
        same = (
            subprocess.run(
                [
                    "qemu-img",
                    "compare",
                    "-q",
                    "-f",
                    "raw",
                    "-F",
                    "qcow2",
                    str(current),
                    str(work / "restore-newest" / f"{DISK}.qcow2"),
                ],
                check=False,
            ).returncode
            == 0
        )
        current.unlink()
        shutil.rmtree(work / "restore-newest")
        full_wall, full_doc = bench.restore(first, work / "restore-full")
        shutil.rmtree(work / "restore-full")
        print(
            f"restore --to DIR: newest {new_wall:.2f}s wall ({new_doc['duration_s']:.2f}s "
            f"duration_s), first full {full_wall:.2f}s wall ({full_doc['duration_s']:.2f}s); "
            f"newest/full {new_wall / full_wall:.2f}×; newest restore "
            f"{'identical to' if same else 'DIFFERS FROM'} the VM's disk"
        )

        for label, backup_id in (("newest", newest.backup_id), ("first full", first)):
            got, gets, data, secs = bench.fetched(backup_id)
            per = ratio(got, data)
            target = f" (target ≤ {FETCH_PER_DATA}×)" if label == "newest" else ""
            print(
                f"{verdict(per <= FETCH_PER_DATA) if label == 'newest' else 'info'} read_disk "
                f"of the {label}: fetched {mib(got)} MiB in {gets} GETs for {mib(data)} MiB "
                f"of data (non-zero 64 KiB sub-blocks) = {per:.2f}×{target}, {secs:.2f}s"
            )
        print(f"load average at end: {'{:.2f} {:.2f} {:.2f}'.format(*os.getloadavg())}")
        if not same:
            raise SystemExit("the newest backup did not restore to the VM's disk content")
    finally:
        if vm is not None:
            vm.stop()
        if weed is not None:
            weed.stop()
        if bench is not None:
            shutil.rmtree(bench.state, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
