"""Storage benchmark: write and read back a mixed 1 GiB disk stream on file:// and s3://.

The stream is ⅓ random (incompressible), ⅓ text-like (log lines) and ⅓ zero chunks,
every non-zero chunk unique (no dedup). For each backend, with and without encryption,
it prints write and read-back throughput (MB/s of disk data, 1 MB = 10^6 bytes), the
compression ratio (non-zero bytes / stored bytes), the ratio of write throughput to the
raw single-thread cost of hash + compress of the same stream measured in the same run,
the process CPU time of the write (less sensitive than MB/s to other load on a shared
machine) and the peak RSS of the process so far.

    .venv/bin/python bench/storage_bench.py [--size-mib 1024] [--no-s3]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmvault.storage.format import DEFAULT_CHUNK_SIZE
from vmvault.storage.repository import Repository, init_repository, open_repository

MB = 1_000_000
PASSPHRASE = b"bench passphrase"


def _text_chunk(rnd: random.Random, size: int) -> bytes:
    words = [b"GET", b"POST", b"/api/v1/items", b"200", b"404", b"ok", b"user", b"cache", b"db"]
    lines = []
    total = 0
    n = 0
    while total < size:
        line = b"2026-11-25T02:%02d:%02d.%06d host-%03d %s %s latency=%dms id=%08x\n" % (
            n % 60,
            (n // 60) % 60,
            rnd.randrange(10**6),
            rnd.randrange(200),
            rnd.choice(words),
            rnd.choice(words),
            rnd.randrange(2000),
            rnd.getrandbits(32),
        )
        lines.append(line)
        total += len(line)
        n += 1
    return b"".join(lines)[:size]


class Stream:
    """The mixed stream, generated chunk by chunk (bounded memory, repeatable)."""

    def __init__(self, size: int, chunk_size: int) -> None:
        self.size = size
        self.chunk_size = chunk_size
        rnd = random.Random(42)
        # A pool of distinct chunks; each emitted chunk gets its index stamped into its
        # first 8 bytes, which makes every digest unique while keeping the content mix.
        self.random_pool = [rnd.randbytes(chunk_size) for _ in range(8)]
        self.text_pool = [_text_chunk(rnd, chunk_size) for _ in range(8)]
        self.zero = bytes(chunk_size)

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        cs = self.chunk_size
        for i, offset in enumerate(range(0, self.size, cs)):
            kind = i % 3
            if kind == 2:
                yield offset, self.zero
                continue
            pool = self.random_pool if kind == 0 else self.text_pool
            yield offset, i.to_bytes(8, "little") + pool[i % len(pool)][8:]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline(stream: Stream) -> float:
    """Raw single-thread hash + compress of the same stream (zeros skipped, as stored)."""
    cctx = zstandard.ZstdCompressor(level=1)
    started = time.perf_counter()
    cpu = time.process_time()
    for _, data in stream.chunks():
        if data == stream.zero:
            continue
        blake3.blake3(data, max_threads=1).digest()
        cctx.compress(data)
    elapsed = time.perf_counter() - started
    print(f"raw single-thread blake3 + zstd-1 CPU time: {time.process_time() - cpu:.2f} s")
    return stream.size / elapsed / MB


def run(
    stream: Stream, url: str, endpoint: str | None, passphrase: bytes | None, base: float
) -> dict[str, float]:
    repo: Repository = init_repository(
        url, endpoint_url=endpoint, passphrase=passphrase, chunk_size=stream.chunk_size
    )
    started = time.perf_counter()
    cpu_started = time.process_time()
    w = repo.open_backup("bench", None, "full", "benchmark", None)
    d = w.open_disk("vda", stream.size, "raw")
    for offset, data in stream.chunks():
        d.put_chunk(offset, data)
    stats = d.finish()
    manifest = w.commit()
    write_s = time.perf_counter() - started
    write_cpu = time.process_time() - cpu_started
    repo.close()

    repo = open_repository(url, endpoint_url=endpoint, passphrase=passphrase)
    started = time.perf_counter()
    nbytes = 0
    for _, chunk in repo.read_disk(manifest, "vda", prefetch=8):
        nbytes += len(chunk) if chunk is not None else 0
    read_s = time.perf_counter() - started
    repo.close()
    nonzero = stats.bytes_read - stats.chunks_zero * stream.chunk_size
    write_mbs = stream.size / write_s / MB
    return {
        "write_mbs": write_mbs,
        "read_mbs": stream.size / read_s / MB,
        "ratio": nonzero / max(1, stats.bytes_uploaded),
        "vs_raw": write_mbs / base,
        "stored_mb": stats.bytes_uploaded / MB,
        "rss": peak_rss_mib(),
        "cpu": write_cpu,
        "read_bytes": nbytes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS runs")
    parser.add_argument("--repeat", type=int, default=1, help="run every case N times")
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    stream = Stream(size, args.chunk_size)
    print(
        f"stream: {args.size_mib} MiB, chunk {args.chunk_size // 1024} KiB, "
        f"1/3 random, 1/3 text, 1/3 zero; cpus={os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    base = baseline(stream)
    print(f"raw single-thread blake3 + zstd-1 of the stream: {base:8.1f} MB/s")

    work = Path(tempfile.mkdtemp(prefix="vmvbench"))
    server = None
    try:
        targets: list[tuple[str, str, str | None]] = [("file", f"file://{work}/repo", None)]
        if not args.no_s3:
            from tests.fixtures.common import free_port
            from tests.fixtures.s3 import SeaweedS3

            names = (
                "master",
                "master_grpc",
                "volume",
                "volume_grpc",
                "filer",
                "filer_grpc",
                "s3_grpc",
            )
            (work / "s3").mkdir()
            server = SeaweedS3(
                binary=shutil.which("weed", path=str(Path(sys.executable).parent)) or "weed",
                workdir=work / "s3",
                s3_port=free_port(),
                ports={n: free_port() for n in names},
                access_key="BENCHKEY",
                secret_key="benchsecretbenchsecret",
            )
            server.start()
            bucket = server.new_bucket()
            os.environ.update(
                AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key
            )
            targets.append(("s3", f"s3://{bucket}/repo", server.endpoint_url))
        print(
            f"{'backend':<8}{'encrypted':<10}{'write MB/s':>11}{'read MB/s':>11}"
            f"{'compr.':>8}{'write/raw':>10}{'stored MB':>10}{'write CPU s':>12}"
            f"{'peak RSS MiB':>13}"
        )
        cases = [
            (k, u, e, p)
            for _ in range(args.repeat)
            for k, u, e in targets
            for p in (None, PASSPHRASE)
        ]
        zero_chunks = len(range(2, -(-size // args.chunk_size), 3))
        for n, (kind, url, endpoint, passphrase) in enumerate(cases):
            tag = "yes" if passphrase else "no"
            r = run(stream, f"{url}-{tag}-{n}", endpoint, passphrase, base)
            assert r["read_bytes"] == size - zero_chunks * args.chunk_size, "read-back size"
            print(
                f"{kind:<8}{tag:<10}{r['write_mbs']:>11.1f}{r['read_mbs']:>11.1f}"
                f"{r['ratio']:>8.2f}{r['vs_raw']:>10.2f}{r['stored_mb']:>10.1f}"
                f"{r['cpu']:>12.2f}{r['rss']:>13.0f}",
                flush=True,
            )
            if kind == "file":
                shutil.rmtree(work / f"repo-{tag}-{n}", ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f} (other processes share the cpus)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
