"""Restore benchmark: a 2 GiB mixed-content backup restored from file:// and s3://, vs nbdcopy.

What is measured, in one run on this machine:

1. A raw image of ``--size`` bytes with mixed content per 4 MiB chunk (35 % zero chunks,
   25 % random, 25 % low-entropy "binary-like" data, 15 % half data / half zero) is written
   sparse, and stored as one backup in a ``file://`` repository and in an ``s3://`` one
   (a private SeaweedFS on loopback).
2. Baseline: ``nbdcopy --target-is-zero`` of the raw image into a fresh qcow2 served by
   ``qemu-nbd`` on a unix socket, started exactly as restore starts it (same options and
   environment), plus the same final ``fsync`` of the image (the same durability promise).
3. ``vmvault restore --to DIR`` from each repository, in a child process (so its peak RSS
   is its own): fetch + decompress + digest check, NBD writes, flush, read back, verify.

Throughput is virtual disk bytes per second of wall time; the ratio is restore throughput
over nbdcopy throughput, medians of ``--rounds`` interleaved repetitions (the machine is
shared). CPU seconds (user + sys, qemu-nbd included on both sides) are printed too: on a
shared machine they move much less than wall times. Run:
.venv/bin/python bench/restore_bench.py [--size 2G] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmvault.storage.repository import Repository, init_repository
from vmvault.worker import qemu_nbd
from vmvault.worker.restore import durable

MiB = 1024 * 1024
CHUNK = 4 * MiB
_LOW_ENTROPY = bytes.maketrans(bytes(range(256)), bytes(i & 0x0F for i in range(256)))


def chunk_content(index: int) -> bytes | None:
    """Deterministic mixed content of chunk ``index``; None for an all-zero chunk."""
    rnd = random.Random(index)
    kind = rnd.random()
    if kind < 0.35:
        return None
    if kind < 0.60:
        return rnd.randbytes(CHUNK)
    if kind < 0.85:
        return rnd.randbytes(CHUNK).translate(_LOW_ENTROPY)
    return rnd.randbytes(CHUNK // 2) + bytes(CHUNK // 2)


def write_raw(path: Path, size: int) -> int:
    """The raw image, sparse where zero; returns the data bytes."""
    data_bytes = 0
    with path.open("wb") as out:
        out.truncate(size)
        for index in range(size // CHUNK):
            data = chunk_content(index)
            if data is not None:
                out.seek(index * CHUNK)
                out.write(data)
                data_bytes += len(data)
    return data_bytes


def store_backup(repo: Repository, size: int) -> str:
    writer = repo.open_backup("bench", None, "full", "restore benchmark", "20260101T000000Z-bench0")
    disk = writer.open_disk("vda", size, "qcow2")
    for index in range(size // CHUNK):
        data = chunk_content(index)
        if data is None:
            disk.put_zero(index * CHUNK, CHUNK)
        else:
            disk.put_chunk(index * CHUNK, data)
    disk.finish()
    return writer.commit().backup_id


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.02)


def children_cpu() -> float:
    """User + sys CPU seconds of every child process waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def nbdcopy_baseline(raw: Path, size: int, workdir: Path) -> tuple[float, float]:
    """Seconds nbdcopy takes to write ``raw`` into a fresh qcow2 behind qemu-nbd, and the
    CPU seconds of nbdcopy and that qemu-nbd."""
    target = workdir / "nbdcopy-target.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size)], check=True)
    sock = Path(tempfile.mkdtemp(prefix="vmvb")) / "nbd.sock"
    # The very qemu-nbd restore uses, kept up for nbdcopy's possibly several connections.
    argv = [*qemu_nbd.argv(target, sock, ""), "--persistent", "--shared=8"]
    cpu = children_cpu()
    proc = subprocess.Popen(argv, env=qemu_nbd.env())
    try:
        wait_for(sock, proc)
        started = time.monotonic()
        subprocess.run(
            ["nbdcopy", "--target-is-zero", str(raw), f"nbd+unix:///?socket={sock}"], check=True
        )
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(sock.parent, ignore_errors=True)
    # Restore's time includes making the image durable: so does the baseline's.
    durable(target)
    elapsed = time.monotonic() - started
    target.unlink()
    return elapsed, children_cpu() - cpu


def restore_in_child(config: dict[str, Any], out: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run the restore in a child process; its JSON result plus wall time and peak RSS."""
    cfg_file = out.with_suffix(".json")
    cfg_file.write_text(json.dumps(config))
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(cfg_file), str(out)],
        stdout=subprocess.PIPE,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"restore child failed with {proc.returncode}")
    result: dict[str, Any] = json.loads(output)
    result["wall_s"] = elapsed
    # The child's own CPU plus that of the children it waited for (qemu-nbd, qemu-img).
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def child(cfg_file: Path, out: Path) -> None:
    from vmvault.worker.config import parse_config
    from vmvault.worker.restore import run_restore

    config = parse_config(json.loads(cfg_file.read_text()), str(cfg_file))
    result = run_restore(config, "bench", to_dir=out)
    print(json.dumps(result.to_json()))


def start_seaweed(workdir: Path) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    """A private SeaweedFS with S3 gateway (same setup as tests/fixtures/s3.py)."""
    from tests.fixtures.s3 import SeaweedS3

    binary = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    from tests.fixtures.common import free_port

    ports = {n: free_port() for n in ("master", "master_grpc", "volume", "volume_grpc",
                                      "filer", "filer_grpc", "s3_grpc")}  # fmt: skip
    server = SeaweedS3(binary, workdir, free_port(), ports, "VMVBENCH" + secrets.token_hex(4),
                       secrets.token_hex(20))  # fmt: skip
    server.start()
    assert server.proc is not None
    bucket = server.new_bucket()
    env = {
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    return server.proc, f"s3://{bucket}/repo", {**env, "VMVB_ENDPOINT": server.endpoint_url}


def s3_get_rate(url: str, endpoint: str) -> str:
    """How fast this store serves the backup's chunk objects at all (GET only, no decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    from vmvault.storage.format import chunk_key
    from vmvault.storage.repository import open_repository

    with open_repository(url, endpoint_url=endpoint, concurrency=16) as repo:
        manifest = repo.list_manifests("bench")[-1]
        keys = sorted({chunk_key(d) for d in repo.chunk_names(manifest, "vda") if d})
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            stored = sum(pool.map(lambda key: len(repo.backend.get(key)), keys))
        elapsed = time.monotonic() - started
    return f"{stored / MiB:.0f} MiB stored in {elapsed:.2f}s ({stored / elapsed / MiB:.0f} MiB/s)"


def parse_size(text: str) -> int:
    units = {"M": MiB, "G": 1024 * MiB}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=2 * 1024 * MiB)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return
    size = args.size - args.size % CHUNK
    workdir = Path(tempfile.mkdtemp(prefix="vmv-restore-bench-", dir="/var/tmp"))
    weed: subprocess.Popen[bytes] | None = None
    try:
        raw = workdir / "source.raw"
        data_bytes = write_raw(raw, size)
        print(f"source: {size / MiB:.0f} MiB virtual, {data_bytes / MiB:.0f} MiB data ({raw})")
        targets: list[tuple[str, str, dict[str, Any], dict[str, str]]] = []
        file_url = f"file://{workdir / 'repo'}"
        repo = init_repository(file_url, chunk_size=CHUNK)
        t = time.monotonic()
        store_backup(repo, size)
        repo.close()
        print(f"stored backup in {file_url} in {time.monotonic() - t:.1f}s")
        targets.append(("file://", file_url, {}, {}))
        if not args.skip_s3:
            (workdir / "s3").mkdir()
            weed, s3_url, env = start_seaweed(workdir / "s3")
            endpoint = env.pop("VMVB_ENDPOINT")
            repo = init_repository(s3_url, endpoint_url=endpoint, chunk_size=CHUNK)
            t = time.monotonic()
            store_backup(repo, size)
            repo.close()
            print(f"stored backup in {s3_url} in {time.monotonic() - t:.1f}s")
            targets.append(("s3://", s3_url, {"endpoint_url": endpoint}, env))
            print(f"  S3 raw GET of the chunk objects, 16 threads: {s3_get_rate(s3_url, endpoint)}")

        # The machine is shared: interleave baseline and restores, report medians.
        times: dict[str, list[float]] = {"nbdcopy": []}
        cpus: dict[str, list[float]] = {"nbdcopy": []}
        rss: dict[str, float] = {}
        print("load average before the rounds: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        for round_no in range(1, args.rounds + 1):
            base, base_cpu = nbdcopy_baseline(raw, size, workdir)
            times["nbdcopy"].append(base)
            cpus["nbdcopy"].append(base_cpu)
            line = [f"round {round_no}: nbdcopy {base:.2f}s"]
            for label, url, extra, env in targets:
                out = workdir / f"restore-{label.rstrip(':/')}"
                config = {
                    "repository": {"url": url, **extra},
                    "state_dir": str(workdir / "state"),
                    "domains": {"bench": {"host": "h", "qmp": str(workdir / "q.sock")}},
                }
                result = restore_in_child(config, out, env)
                if not all(d["verified"] for d in result["disks"]):
                    raise RuntimeError("restore reported an unverified disk")
                check = subprocess.run(
                    ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw),
                     str(out / "vda.qcow2")], capture_output=True, text=True, check=False,
                )  # fmt: skip
                if check.returncode != 0:
                    raise RuntimeError(f"restored image differs: {check.stdout}{check.stderr}")
                times.setdefault(label, []).append(result["wall_s"])
                cpus.setdefault(label, []).append(result["cpu_s"])
                rss[label] = max(rss.get(label, 0.0), result["peak_rss_mib"])
                line.append(f"{label} {result['wall_s']:.2f}s")
                shutil.rmtree(out, ignore_errors=True)
            print(", ".join(line) + " (restores verified, qemu-img compare identical)")
        print("load average after the rounds: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        base_s = statistics.median(times["nbdcopy"])
        base_rate = size / base_s / MiB
        base_cpu = statistics.median(cpus["nbdcopy"])
        print(
            f"nbdcopy raw → qemu-nbd qcow2: median {base_s:.2f}s, {base_rate:.0f} MiB/s,"
            f" {base_cpu:.2f} CPU-s (nbdcopy + qemu-nbd)"
        )
        for label, _, _, _ in targets:
            wall = statistics.median(times[label])
            rate = size / wall / MiB
            print(
                f"restore from {label:<8} median {wall:.2f}s wall (child process, imports"
                f" included), {rate:.0f} MiB/s, ratio to nbdcopy {rate / base_rate:.2f}x,"
                f" peak RSS {rss[label]:.0f} MiB, {statistics.median(cpus[label]):.2f} CPU-s"
                " (restore + qemu-nbd)"
            )
    finally:
        if weed is not None:
            weed.terminate()
            try:
                weed.wait(10)
            except subprocess.TimeoutExpired:
                weed.kill()
                weed.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
