"""CLI start-up benchmark: ``vmvault --version`` and ``vmvault list`` wall times.

Each command runs as a fresh process, as an operator runs it, several times; the median
wall time is printed next to the same figure for ``python3 -c pass`` (the interpreter's
own start-up, measured in the same run) and the ratio to it. ``list`` reads a
``file://`` repository holding 20 backups of one domain, made here with the storage API,
first unverified, then with a verification record per backup (``list`` reads them too).
Targets on this machine class (2 cores): ``--version`` ≤ 0.15 s, ``list`` ≤ 0.3 s.

    .venv/bin/python bench/cli_bench.py [--runs 9]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmvault.storage.format import Manifest
from vmvault.storage.repository import init_repository

BACKUPS = 20
CHUNK = 64 * 1024


def _make_repository(root: Path) -> str:
    """A file:// repository with ``BACKUPS`` small backups of domain ``web1``."""
    url = f"file://{root / 'repo'}"
    with init_repository(url, chunk_size=CHUNK) as repo:
        parent: Manifest | None = None
        for n in range(BACKUPS):
            if parent is None:
                writer = repo.open_backup("web1", None, "full", "bench", f"cp-{n}")
            else:
                writer = repo.open_backup("web1", parent, "incremental", "bench", f"cp-{n}")
            disk = writer.open_disk("vda", 4 * CHUNK, "qcow2")
            for offset in range(0, 4 * CHUNK, CHUNK):
                disk.put_chunk(offset, bytes([n + 1]) * CHUNK)
            disk.finish()
            parent = writer.commit({"disks": ["vda"]})
    return url


def _verify_all(url: str) -> None:
    """A verification record for every backup (what ``vmvault verify`` leaves)."""
    from vmvault.storage.repository import open_repository
    from vmvault.storage.verify import verify

    with open_repository(url) as repo:
        assert verify(repo).ok


def _median_wall(argv: list[str], runs: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="runs per command (median)")
    args = parser.parse_args()
    vmvault = str(Path(sys.executable).parent / "vmvault")
    workdir = Path(tempfile.mkdtemp(prefix="vmvault-cli-bench-"))
    try:
        url = _make_repository(workdir)
        config = workdir / "vmvault.yaml"
        config.write_text(f"repository:\n  url: {url}\nstate_dir: {workdir / 'state'}\n")
        env = {**os.environ, "VMVAULT_CONFIG": str(config)}
        reference = _median_wall([sys.executable, "-c", "pass"], args.runs, env)
        print(f"{'command':<28} {'median wall s':>13} {'x python -c pass':>17}")
        print(f"{'python3 -c pass':<28} {reference:>13.3f} {1.0:>17.1f}")
        for label, argv, target in [
            ("vmvault --version", [vmvault, "--version"], 0.15),
            (f"vmvault list ({BACKUPS} backups)", [vmvault, "list"], 0.3),
            (f"vmvault list ({BACKUPS} verified)", [vmvault, "list"], 0.3),
        ]:
            if "verified" in label:
                _verify_all(url)
            wall = _median_wall(argv, args.runs, env)
            verdict = "ok" if wall <= target else f"over the {target} s target"
            print(f"{label:<28} {wall:>13.3f} {wall / reference:>17.1f}  {verdict}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
