"""Copy benchmark: ``copy_backups`` file:// → s3:// against a plain boto3 upload of the same bytes.

What is measured, in one run on this machine:

1. A file:// repository (4 MiB chunks, unencrypted) holding one full backup of ``--size``
   bytes of mixed content (random, text-like and zero regions) and one incremental.
2. Reference: every chunk and pack object of that repository uploaded with boto3
   ``put_object`` into a fresh bucket of a private SeaweedFS on loopback, from as many
   threads as the copy uses (what ``aws s3 cp --recursive`` would do, minus its CLI).
3. ``copy_backups`` into an empty s3:// repository on the same SeaweedFS (raw mode: same
   key material), which also lists both sides, copies indexes and manifests and reads
   every region back on the target to verify it; then the same copy again into an
   encrypted target (rebuild mode: decode, re-hash, re-seal, verify).

Throughput is stored source bytes (chunks and packs) per second of wall time; rounds are
interleaved and medians printed (the machine is shared). Run:
.venv/bin/python bench/copy_bench.py [--size 512M] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmvault.storage.copy import copy_backups, select_backups
from vmvault.storage.repository import Repository, init_repository, open_repository

MiB = 1024 * 1024
CHUNK = 4 * MiB
THREADS = 8


def mixed(size: int, seed: int) -> bytearray:
    rnd = random.Random(seed)
    out = bytearray()
    line = b"2026-12-03 log line: the service answered in 12 ms\n"
    text = (line * (CHUNK // len(line) + 1))[:CHUNK]
    for i in range(size // CHUNK):
        kind = i % 4
        out += rnd.randbytes(CHUNK) if kind in (0, 1) else text if kind == 2 else bytes(CHUNK)
    return out


def store(repo: Repository, size: int) -> None:
    data = mixed(size, 1)
    w = repo.open_backup("bench", None, "full", "bench", None)
    d = w.open_disk("vda", len(data), "raw")
    for off in range(0, len(data), CHUNK):
        d.put_chunk(off, bytes(data[off : off + CHUNK]))
    d.finish()
    parent = w.commit()
    # An incremental: a quarter of the regions rewritten.
    w = repo.open_backup("bench", parent, "incremental", "bench", None)
    d = w.open_disk("vda", len(data), "raw")
    rnd = random.Random(2)
    for off in range(0, len(data), CHUNK):
        if (off // CHUNK) % 4 == 1:
            d.put_chunk(off, rnd.randbytes(CHUNK))
        else:
            d.keep_parent(off, CHUNK)
    d.finish()
    w.commit()


def boto3_upload(root: Path, client: object, bucket: str) -> tuple[float, int]:
    files = [p for sub in ("chunks", "packs") for p in (root / sub).rglob("*") if p.is_file()]

    def put(path: Path) -> int:
        body = path.read_bytes()
        key = f"ref-{secrets.token_hex(4)}/{path.relative_to(root)}"
        client.put_object(Bucket=bucket, Key=key, Body=body)  # type: ignore[attr-defined]
        return len(body)

    started = time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        total = sum(pool.map(put, files))
    return time.monotonic() - started, total


def timed_copy(src_url: str, dst_url: str, endpoint: str, passphrase: bytes | None) -> float:
    init_repository(
        dst_url, endpoint_url=endpoint, chunk_size=CHUNK, passphrase=passphrase, scrypt_n=2**12
    ).close()
    with (
        open_repository(src_url, concurrency=THREADS) as src,
        open_repository(
            dst_url, endpoint_url=endpoint, passphrase=passphrase, concurrency=THREADS
        ) as dst,
    ):
        started = time.monotonic()
        report = copy_backups(src, dst, select_backups(src))
        elapsed = time.monotonic() - started
    assert len(report.copied) == 2, report
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="MiB of the full backup's disk")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from tests.fixtures.common import free_port
    from tests.fixtures.s3 import SeaweedS3

    work = Path(tempfile.mkdtemp(prefix="vmv-copy-bench-", dir="/var/tmp"))
    server = None
    try:
        src_url = f"file://{work / 'src'}"
        with init_repository(src_url, chunk_size=CHUNK) as repo:
            store(repo, args.size * MiB)
        (work / "s3").mkdir()
        binary = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        ports = {n: free_port() for n in ("master", "master_grpc", "volume", "volume_grpc",
                                          "filer", "filer_grpc", "s3_grpc")}  # fmt: skip
        access = "VMVCOPY" + secrets.token_hex(4)
        server = SeaweedS3(binary, work / "s3", free_port(), ports, access, secrets.token_hex(20))
        server.start()
        os.environ.update(
            AWS_ACCESS_KEY_ID=server.access_key,
            AWS_SECRET_ACCESS_KEY=server.secret_key,
            AWS_DEFAULT_REGION="us-east-1",
        )
        bucket = server.new_bucket()
        client = server.client()
        stored = sum(
            p.stat().st_size
            for s in ("chunks", "packs")
            for p in (work / "src" / s).rglob("*")
            if p.is_file()
        )
        print(
            f"source: {args.size} MiB disk, 2 backups, {stored / MiB:.0f} MiB of chunks and packs"
        )
        times: dict[str, list[float]] = {"boto3 put_object": [], "copy raw": [], "copy rebuild": []}
        for n in range(1, args.rounds + 1):
            ref, total = boto3_upload(work / "src", client, bucket)
            raw = timed_copy(src_url, f"s3://{bucket}/raw-{n}", server.endpoint_url, None)
            enc = timed_copy(src_url, f"s3://{bucket}/enc-{n}", server.endpoint_url, b"bench")
            assert total == stored
            times["boto3 put_object"].append(ref)
            times["copy raw"].append(raw)
            times["copy rebuild"].append(enc)
            print(f"round {n}: boto3 {ref:.2f}s, copy raw {raw:.2f}s, copy rebuild {enc:.2f}s")
        base = statistics.median(times["boto3 put_object"])
        for label, values in times.items():
            med = statistics.median(values)
            print(
                f"{label:>18}: median {med:.2f}s = {stored / MiB / med:.0f} MiB/s "
                f"({base / med:.2f}x the boto3 upload)"
            )
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
