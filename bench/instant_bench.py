"""Instant access benchmark: ``vmvault serve`` + ``nbdcopy`` vs ``vmvault restore --to``.

One backup of a ``--size`` disk (default 1 GiB; 4 MiB chunks, mixed content: 35 % zero
chunks, 25 % random, 25 % low-entropy, 15 % half data half zero) in a ``file://``
repository. Per round, interleaved:

1. ``vmvault restore bench --to DIR``: the whole disk fetched, checked, written as qcow2,
   read back and verified (wall time of the command).
2. ``vmvault serve bench --socket S --json``: time until the export accepts connections
   (what "instant" means), then ``nbdcopy URI null:`` (every region fetched, checked and
   sent over NBD; holes skipped by block status), the same with one connection and one
   request at a time (a sequential reader, served by the read-ahead), ``nbdinfo --map``.

Throughput is virtual bytes per second of wall time; medians of ``--rounds``. The machine
is shared: compare within one run only. Run:
.venv/bin/python bench/instant_bench.py [--size 1G] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmvault.storage.repository import Repository, init_repository

MiB = 1024 * 1024
CHUNK = 4 * MiB
_LOW_ENTROPY = bytes.maketrans(bytes(range(256)), bytes(i & 0x0F for i in range(256)))


def chunk_content(index: int) -> bytes | None:
    """Deterministic mixed content of chunk ``index`` (restore_bench's mix); None: zeros."""
    rnd = random.Random(index)
    kind = rnd.random()
    if kind < 0.35:
        return None
    if kind < 0.60:
        return rnd.randbytes(CHUNK)
    if kind < 0.85:
        return rnd.randbytes(CHUNK).translate(_LOW_ENTROPY)
    return rnd.randbytes(CHUNK // 2) + bytes(CHUNK // 2)


def store_backup(repo: Repository, size: int) -> int:
    """One full backup of domain ``bench``; returns its data bytes."""
    writer = repo.open_backup("bench", None, "full", "instant benchmark", None)
    disk = writer.open_disk("vda", size, "qcow2")
    data_bytes = 0
    for index in range(size // CHUNK):
        data = chunk_content(index)
        if data is None:
            disk.put_zero(index * CHUNK, CHUNK)
        else:
            disk.put_chunk(index * CHUNK, data)
            data_bytes += len(data)
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


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].isalpha() else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1024 * MiB)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vmvault-instant-"))
    try:
        repo = init_repository(f"file://{work}/repo", chunk_size=CHUNK)
        data_bytes = store_backup(repo, args.size)
        repo.close()
        config = work / "vmvault.yaml"
        config.write_text(
            json.dumps(
                {
                    "repository": {"url": f"file://{work}/repo"},
                    "state_dir": str(work / "state"),
                    "domains": {"bench": {"host": "hv1", "qmp": str(work / "bench.qmp")}},
                }
            )
        )
        restores, readies, copies, sequentials, maps = [], [], [], [], []
        for _ in range(args.rounds):
            restores.append(time_restore(config, work))
            ready, copy, sequential, mapped = time_serve(config)
            readies.append(ready)
            copies.append(copy)
            sequentials.append(sequential)
            maps.append(mapped)
        size_mib = args.size / MiB
        restore_s = statistics.median(restores)
        copy_s = statistics.median(copies)
        print(
            f"disk {size_mib:.0f} MiB virtual, {data_bytes / MiB:.0f} MiB data, file://,"
            f" medians of {args.rounds}"
        )
        print(
            f"vmvault restore --to      {restore_s:6.2f} s  {size_mib / restore_s:7.0f} MiB/s"
            f"   rounds {', '.join(f'{t:.2f}' for t in restores)}"
        )
        print(
            f"serve: ready after        {statistics.median(readies):6.2f} s"
            f"                rounds {', '.join(f'{t:.2f}' for t in readies)}"
        )
        print(
            f"serve: nbdcopy to null:   {copy_s:6.2f} s  {size_mib / copy_s:7.0f} MiB/s"
            f"   rounds {', '.join(f'{t:.2f}' for t in copies)}"
        )
        seq_s = statistics.median(sequentials)
        print(
            f"serve: nbdcopy 1 conn 1 req {seq_s:4.2f} s  {size_mib / seq_s:7.0f} MiB/s"
            f"   rounds {', '.join(f'{t:.2f}' for t in sequentials)}"
        )
        print(
            f"serve: nbdinfo --map      {statistics.median(maps):6.2f} s"
            f"                rounds {', '.join(f'{t:.2f}' for t in maps)}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
