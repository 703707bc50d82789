"""Instant access benchmark: ``serve`` + ``nbdcopy`` and ``restore --live`` vs ``restore --to``.

One backup of a ``--size`` disk (default 2 GiB; 4 MiB chunks, mixed content: 21 % zero
chunks, 33 % random, 32 % low-entropy, 14 % half data half zero: 2 GiB hold 1418 MiB of
non-zero data, 69 %) in a ``file://`` repository, or with ``--s3`` in an ``s3://`` one (a
private SeaweedFS on loopback, as tests/fixtures/s3.py starts it). Per round, interleaved:

1. ``vmvault restore bench --to DIR``: the whole disk fetched, checked, written as qcow2,
   read back and verified (wall time of the command).
2. ``vmvault serve bench --socket S --json``: time until the export accepts connections
   (what "instant" means), then ``nbdcopy URI null:`` (every region fetched, checked and
   sent over NBD; holes skipped by block status), the same with one connection and one
   request at a time (a sequential reader, served by the read-ahead), ``nbdinfo --map``.
3. ``vmvault restore bench --live --json``: the domain's QEMU (the blank VM of
   vmvault/scheduler/blank_vm.py, TCG, no guest OS) started on overlays of the backup,
   the backup copied in at full speed; its ``guest_started_s`` (time until the VM runs)
   and ``duration_s`` (until the images stand alone). The VM is then stopped (QMP
   ``quit``) and its images deleted.
4. The same while, from the moment the VM runs until the copy ends, the "guest" reads
   random 64 KiB blocks: HMP ``qemu-io`` on the virtio device's block backend (as the
   live restore tests do guest I/O), one at a time, through a second QMP monitor. The
   latency of a read includes the QMP/HMP round trip.

Throughput is virtual bytes per second of wall time; medians of ``--rounds``. The machine
is shared: compare within one run only. Run:
.venv/bin/python bench/instant_bench.py [--size 2G] [--rounds 3] [--s3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.common import free_port
from tests.fixtures.s3 import SeaweedS3
from vmvault.scheduler import blank_vm
from vmvault.storage.repository import Repository, init_repository
from vmvault.worker.qmp import QmpError, QmpSession

MiB = 1024 * 1024
CHUNK = 4 * MiB
_LOW_ENTROPY = bytes.maketrans(bytes(range(256)), bytes(i & 0x0F for i in range(256)))


def chunk_content(index: int) -> bytes | None:
    """Deterministic mixed content of chunk ``index`` (restore_bench's kinds, less zero:
    about 70 % of the disk is data, as issue 13 asks); None: zeros."""
    rnd = random.Random(index)
    kind = rnd.random()
    if kind < 0.21:
        return None
    if kind < 0.54:
        return rnd.randbytes(CHUNK)
    if kind < 0.86:
        return rnd.randbytes(CHUNK).translate(_LOW_ENTROPY)
    return rnd.randbytes(CHUNK // 2) + bytes(CHUNK // 2)


def store_backup(repo: Repository, size: int) -> int:
    """One full backup of domain ``bench``; returns its data bytes (non-zero bytes: the
    zero half of a half-data chunk is not data)."""
    writer = repo.open_backup("bench", None, "full", "instant benchmark", None)
    disk = writer.open_disk("vda", size, "qcow2")
    data_bytes = 0
    for index in range(size // CHUNK):
        data = chunk_content(index)
        if data is None:
            disk.put_zero(index * CHUNK, CHUNK)
        else:
            disk.put_chunk(index * CHUNK, data)
            data_bytes += len(data.rstrip(b"\0"))
    disk.finish()
    writer.commit()
    return data_bytes


def vmvault(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmvault", "--config", str(config), *args]


def time_restore(config: Path, work: Path) -> float:
    out = work / "restored"
    started = time.monotonic()
    subprocess.run(
        vmvault(config, "restore", "bench", "--to", str(out)),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # "records no checkpoint": the bench backup has none
    )
    elapsed = time.monotonic() - started
    shutil.rmtree(out)
    return elapsed


def time_serve(config: Path) -> tuple[float, float, float, float]:
    """Seconds until the export is ready, for ``nbdcopy URI null:``, for the same with
    one connection and one request at a time (a strictly sequential reader: what the
    read-ahead is for), for ``nbdinfo --map``."""
    sock = Path(tempfile.mkdtemp(prefix="vmvi")) / "nbd.sock"
    started = time.monotonic()
    proc = subprocess.Popen(
        vmvault(config, "serve", "bench", "--socket", str(sock), "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        while line := proc.stdout.readline():
            lines.append(line)
            if line.rstrip() == "}":
                break
        ready = time.monotonic() - started
        uri = json.loads("".join(lines))["exports"][0]["uri"]
        started = time.monotonic()
        subprocess.run(["nbdcopy", uri, "null:"], check=True)
        copy = time.monotonic() - started
        started = time.monotonic()
        subprocess.run(["nbdcopy", "--connections=1", "--requests=1", uri, "null:"], check=True)
        sequential = time.monotonic() - started
        started = time.monotonic()
        subprocess.run(["nbdinfo", "--map", uri], check=True, stdout=subprocess.DEVNULL)
        mapped = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(sock.parent, ignore_errors=True)
    return ready, copy, sequential, mapped


@dataclass
class GuestReads:
    """What the reader thread did during a live restore's copy."""

    latencies: list[float] = field(default_factory=list)
    error: BaseException | None = None


def guest_reader(ctl: Path, size: int, proc: subprocess.Popen[str], reads: GuestReads) -> None:
    """Random 64 KiB reads of vda, one at a time, from the moment the VM runs until the
    copy (the mirror job) is gone or the live restore exits."""
    rnd = random.Random(13)
    session: QmpSession | None = None
    try:
        while True:  # QEMU and its monitors appear once the live restore starts it
            session = QmpSession("bench", ctl)  # a closed session cannot connect again
            try:
                session.connect(timeout=1)
                if session.query_status() == "running":
                    break
            except QmpError:
                pass
            session.close()
            session = None
            if proc.poll() is not None:
                return
            time.sleep(0.01)
        qdev = blank_vm.qdev("vda")
        seen_copy = False
        while proc.poll() is None:
            if len(reads.latencies) % 8 == 0:
                copying = any(j["type"] == "mirror" for j in session.block_jobs())
                if seen_copy and not copying:
                    return
                seen_copy = seen_copy or copying
            offset = rnd.randrange(size // (64 * 1024)) * 64 * 1024
            started = time.monotonic()
            session.hmp(f'qemu-io -d {qdev} "read {offset} 65536"')
            reads.latencies.append(time.monotonic() - started)
    except BaseException as err:  # reported by the caller
        reads.error = err
    finally:
        if session is not None:
            session.close()


def time_live(
    config: Path, work: Path, ctl: Path, size: int, read: bool
) -> tuple[dict[str, Any], float, GuestReads | None, int]:
    """``vmvault restore bench --live --json`` into a fresh image directory: its JSON,
    its wall time, the guest's reads when ``read``, and the failed reads in QEMU's log."""
    images = work / "live-images"
    reads = GuestReads() if read else None
    started = time.monotonic()
    proc = subprocess.Popen(
        vmvault(config, "restore", "bench", "--live", "--json", "--to", str(images)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # "records no checkpoint": the bench backup has none
        text=True,
    )
    reader = None
    if reads is not None:
        reader = threading.Thread(target=guest_reader, args=(ctl, size, proc, reads))
        reader.start()
    out, _ = proc.communicate()
    wall = time.monotonic() - started
    if reader is not None:
        reader.join()
    doc: dict[str, Any] = {}
    try:
        if proc.returncode != 0:
            raise SystemExit(f"vmvault restore --live exited {proc.returncode}")
        doc = json.loads(out)
        if reads is not None and reads.error is not None:
            raise SystemExit(f"guest reads failed: {reads.error!r}")
        log = Path(doc["qemu_log"])
        failed = log.read_text(errors="replace").count("failed") if log.exists() else 0
    finally:
        stop_vm(ctl, doc.get("qemu_pid"))
        shutil.rmtree(images, ignore_errors=True)
    if doc.get("qemu_log"):
        Path(doc["qemu_log"]).unlink(missing_ok=True)
    return doc, wall, reads, failed


def stop_vm(ctl: Path, pid: int | None) -> None:
    """QMP ``quit`` to the VM a live restore left running; SIGKILL if it lingers."""
    if ctl.exists():
        session = QmpSession("bench", ctl)
        try:
            session.connect(timeout=5)
            session.execute("quit")
        except QmpError:
            pass
        finally:
            session.close()
    if pid is None:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def start_seaweed(work: Path) -> tuple[SeaweedS3, str]:
    """A private SeaweedFS with its S3 gateway (as bench/incremental_bench.py starts it);
    the credentials go to the environment, which the vmvault commands inherit."""
    binary = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
    (work / "s3").mkdir()
    weed = SeaweedS3(
        binary,
        work / "s3",
        free_port(),
        {n: free_port() for n in names},
        "VMVBENCH" + secrets.token_hex(4).upper(),
        secrets.token_hex(20),
    )
    weed.start()
    bucket = weed.new_bucket()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": weed.access_key,
            "AWS_SECRET_ACCESS_KEY": weed.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    return weed, f"s3://{bucket}/repo"


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].isalpha() else int(text)


def rounds_of(values: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in values)


def loadavg() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=2048 * MiB)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="a SeaweedFS s3:// repository")
    args = parser.parse_args()
    print(f"load average at start: {loadavg()} on {os.cpu_count()} cores")
    work = Path(tempfile.mkdtemp(prefix="vmvault-instant-"))
    ctl = work / "ctl.sock"  # the bench's own QMP monitor of the live-restored VM
    weed: SeaweedS3 | None = None
    try:
        repository: dict[str, str] = {"url": f"file://{work}/repo"}
        if args.s3:
            weed, url = start_seaweed(work)
            repository = {"url": url, "endpoint_url": weed.endpoint_url}
        started = time.monotonic()
        repo = init_repository(
            repository["url"], endpoint_url=repository.get("endpoint_url"), chunk_size=CHUNK
        )
        data_bytes = store_backup(repo, args.size)
        repo.close()
        stored = time.monotonic() - started
        config = work / "vmvault.yaml"
        config.write_text(
            json.dumps(
                {
                    "repository": repository,
                    "state_dir": str(work / "state"),
                    "domains": {
                        "bench": {
                            "host": "hv1",
                            "qmp": str(work / "bench.qmp"),
                            "launch": {
                                "argv": blank_vm.launch_argv(["vda"], str(ctl), name="bench"),
                                "image_dir": str(work / "images"),
                            },
                        }
                    },
                }
            )
        )
        restores, readies, copies, sequentials, maps = [], [], [], [], []
        live_up, live_total, live_copy, live_wall = [], [], [], []
        read_up, read_total, read_copy, read_wall = [], [], [], []
        read_counts, read_means, read_failed = [], [], []
        for _ in range(args.rounds):
            restores.append(time_restore(config, work))
            ready, copy, sequential, mapped = time_serve(config)
            readies.append(ready)
            copies.append(copy)
            sequentials.append(sequential)
            maps.append(mapped)
            doc, wall, _, _ = time_live(config, work, ctl, args.size, read=False)
            live_up.append(doc["guest_started_s"])
            live_total.append(doc["duration_s"])
            live_copy.append(doc["duration_s"] - doc["guest_started_s"])
            live_wall.append(wall)
            doc, wall, reads, failed = time_live(config, work, ctl, args.size, read=True)
            assert reads is not None
            read_up.append(doc["guest_started_s"])
            read_total.append(doc["duration_s"])
            read_copy.append(doc["duration_s"] - doc["guest_started_s"])
            read_wall.append(wall)
            read_counts.append(float(len(reads.latencies)))
            read_means.append(
                statistics.mean(reads.latencies) * 1000 if reads.latencies else float("nan")
            )
            read_failed.append(float(failed))
        size_mib = args.size / MiB
        restore_s = statistics.median(restores)
        copy_s = statistics.median(copies)
        where = "s3:// (SeaweedFS, loopback)" if args.s3 else "file://"
        print(
            f"disk {size_mib:.0f} MiB virtual, {data_bytes / MiB:.0f} MiB data, {where},"
            f" backup stored in {stored:.1f} s, medians of {args.rounds}"
        )
        print(
            f"vmvault restore --to      {restore_s:6.2f} s  {size_mib / restore_s:7.0f} MiB/s"
            f"   rounds {rounds_of(restores)}"
        )
        print(
            f"serve: ready after        {statistics.median(readies):6.2f} s"
            f"                rounds {rounds_of(readies)}"
        )
        print(
            f"serve: nbdcopy to null:   {copy_s:6.2f} s  {size_mib / copy_s:7.0f} MiB/s"
            f"   rounds {rounds_of(copies)}"
        )
        seq_s = statistics.median(sequentials)
        print(
            f"serve: nbdcopy 1 conn 1 req {seq_s:4.2f} s  {size_mib / seq_s:7.0f} MiB/s"
            f"   rounds {rounds_of(sequentials)}"
        )
        print(
            f"serve: nbdinfo --map      {statistics.median(maps):6.2f} s"
            f"                rounds {rounds_of(maps)}"
        )
        for label, up, copy_d, total, wall_d in (
            ("live", live_up, live_copy, live_total, live_wall),
            ("live+reads", read_up, read_copy, read_total, read_wall),
        ):
            total_s = statistics.median(total)
            print(
                f"{label + ': VM running after':33}{statistics.median(up):6.2f} s"
                f"                rounds {rounds_of(up)}"
            )
            print(
                f"{label + ': copy (running->done)':33}{statistics.median(copy_d):6.2f} s"
                f"                rounds {rounds_of(copy_d)}"
            )
            print(
                f"{label + ': duration_s':33}{total_s:6.2f} s  {size_mib / total_s:7.0f} MiB/s"
                f"   rounds {rounds_of(total)} (command wall {rounds_of(wall_d)})"
            )
        per_round = zip(read_counts, read_means, strict=True)
        print(
            f"live+reads: guest reads   {statistics.median(read_counts):6.0f} of 64 KiB,"
            f" mean latency {statistics.median(read_means):.1f} ms, failed in QEMU log"
            f" {statistics.median(read_failed):.0f}"
            f"   rounds {', '.join(f'{n:.0f} @ {m:.1f} ms' for n, m in per_round)}"
        )
        print(
            f"time until the VM runs (live) {statistics.median(live_up):.2f} s vs full restore"
            f" {restore_s:.2f} s; live copy {statistics.median(live_copy):.2f} s without,"
            f" {statistics.median(read_copy):.2f} s with guest reads"
        )
        print(f"load average at end: {loadavg()}")
    finally:
        stop_vm(ctl, None)
        if weed is not None:
            weed.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
