"""Scheduler benchmark: one tick for 10,000 domains over 100 hosts on a real private Redis.

Measures the planning + enqueue time of a tick that releases every domain's backup,
the enqueue rate, Redis memory per queued job, the cost of an idle tick and of a fresh
replica's first tick (it must look up every claim), and the end-to-end overhead of an
empty job (enqueue -> a real ``vmvault worker`` starts it -> result visible).

    .venv/bin/python bench/scheduler_bench.py [--domains 10000] [--hosts 100] [--pings 50]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmvault.scheduler.planner import plan_slot  # noqa: E402
from vmvault.scheduler.scheduler_loop import Scheduler  # noqa: E402
from vmvault.worker.celery_app import configure  # noqa: E402
from vmvault.worker.config import parse_config  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _used_memory(client: redis.Redis) -> int:
    info: dict[str, Any] = client.info("memory")
    return int(info["used_memory"])


def _fleet(
    domains: int, hosts: int, broker: str, workdir: Path, max_concurrent: int | None = None
) -> dict[str, Any]:
    per_host = max_concurrent or -(-domains // hosts)
    return {
        "repository": {"url": f"file://{workdir}/repo"},
        "broker": broker,
        "state_dir": str(workdir / "state"),
        "domains": {
            f"vm{i:05d}": {"host": f"hv{i % hosts:03d}", "qmp": f"/run/vmv/vm{i:05d}.qmp"}
            for i in range(domains)
        },
        # Default: every backup of the slot may start at once, the tick enqueues them all.
        "hosts": {f"hv{h:03d}": {"max_concurrent": per_host} for h in range(hosts)},
        "schedules": {"nightly": {"cron": "0 2 * * *", "domains": ["*"]}},
        "scheduler": {"gc_interval_seconds": None},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--pings", type=int, default=50)
    opts = parser.parse_args()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        print("redis-server not found: run 'make setup'", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="vmvbench"))
    port = _free_port()
    server = subprocess.Popen(
        [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    worker: subprocess.Popen[bytes] | None = None
    try:
        broker = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(broker)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        data = _fleet(opts.domains, opts.hosts, broker, workdir)
        t = time.perf_counter()
        config = parse_config(data, "bench")
        parse_s = time.perf_counter() - t
        app = configure(config)
        now = datetime(2026, 3, 1, 2, 0, 1, tzinfo=UTC)
        t = time.perf_counter()
        plan = plan_slot(config, "nightly", now.replace(second=0))
        plan_s = time.perf_counter() - t

        mem0 = _used_memory(client)
        sched = Scheduler(config, client, app, name="bench-a")
        cpu0 = time.process_time()
        report = sched.tick(now)
        cpu_s = time.process_time() - cpu0
        mem1 = _used_memory(client)
        idle = sched.tick(now + timedelta(seconds=15))
        sched.leadership.resign()
        fresh = Scheduler(config, client, app, name="bench-b")
        takeover = fresh.tick(now + timedelta(seconds=30))
        fresh.leadership.resign()
        assert len(report.enqueued) == opts.domains, len(report.enqueued)
        assert idle.enqueued == [] and takeover.enqueued == []

        print(f"fleet: {opts.domains} domains over {opts.hosts} hosts, one schedule")
        print(f"config parse+validate:          {parse_s:8.3f} s")
        print(f"plan one slot (pure):           {plan_s:8.3f} s ({len(plan)} backups)")
        print(f"tick, plan+claim+enqueue all:   {report.seconds:8.3f} s")
        print(
            f"enqueue rate:                   {len(report.enqueued) / report.seconds:8.0f} jobs/s"
        )
        print(f"  CPU time of that tick:        {cpu_s:8.3f} s (this process, all threads)")
        print(f"idle tick (all claimed):        {idle.seconds:8.3f} s")
        print(f"new leader's first tick:        {takeover.seconds:8.3f} s (no duplicates)")
        print(
            f"Redis memory: {mem0 / 2**20:.1f} -> {mem1 / 2**20:.1f} MiB "
            f"({(mem1 - mem0) / opts.domains:.0f} B per queued job incl. record and claim)"
        )

        # The usual tick: plan all domains, release max_concurrent=2 per host.
        client.flushdb()
        limited = parse_config(_fleet(opts.domains, opts.hosts, broker, workdir, 2), "bench")
        sched = Scheduler(limited, client, configure(limited), name="bench-c")
        usual = sched.tick(now)
        sched.leadership.resign()
        print(
            f"tick with max_concurrent=2:     {usual.seconds:8.3f} s "
            f"(plans {usual.planned}, enqueues {len(usual.enqueued)})"
        )

        # End-to-end overhead of an empty job through a real worker.
        client.flushdb()
        cfg_file = workdir / "vmvault.yaml"
        small = _fleet(2, 1, broker, workdir)
        cfg_file.write_text(yaml.safe_dump(small))
        app = configure(parse_config(small, "bench"))
        with open(workdir / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [str(ROOT / ".venv/bin/vmvault"), "worker", "--host", "hv000",
                 "--config", str(cfg_file)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        app.send_task("vmvault.ping", queue="host.hv000").get(timeout=60)  # warm
        starts: list[float] = []
        rounds: list[float] = []
        for _ in range(opts.pings):
            sent = time.time()
            result = app.send_task("vmvault.ping", kwargs={"sent": sent}, queue="host.hv000")
            out = result.get(timeout=30, interval=0.005)
            rounds.append(time.time() - sent)
            starts.append(out["latency"])
        starts.sort()
        rounds.sort()
        p95 = int(len(starts) * 0.95) - 1
        print(
            f"empty job, enqueue -> worker start: median {statistics.median(starts) * 1000:.1f} ms"
            f", p95 {starts[p95] * 1000:.1f} ms ({opts.pings} jobs, prefork worker, prefetch 1)"
        )
        print(
            f"empty job, enqueue -> result seen:  median {statistics.median(rounds) * 1000:.1f} ms"
            f", p95 {rounds[p95] * 1000:.1f} ms"
        )
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
