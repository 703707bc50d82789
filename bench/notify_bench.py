"""Notification benchmark: what events cost a job and a tick, on a real private Redis.

Measures the cost a job's end pays (``job_ended``: one Lua script) when nothing changes
and when it opens a problem, the overdue check of one tick for N scheduled domains with
nothing late, and the leader's fan-out + webhook delivery rate to a local HTTP server.

    .venv/bin/python bench/notify_bench.py [--jobs 5000] [--domains 10000] [--events 500]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmvault.scheduler.notify_delivery import Notifier  # noqa: E402
from vmvault.scheduler.notify_overdue import check_overdue  # noqa: E402
from vmvault.worker.config import parse_config  # noqa: E402
from vmvault.worker.notify_events import job_ended  # noqa: E402
from vmvault.worker.redis_keys import (  # noqa: E402
    METRICS_LAST_SUCCESS,
    NOTIFY_OUTBOX,
    NOTIFY_QUEUE_PREFIX,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=500)
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
    hook_port = _free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", hook_port), _Hook)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)

        t = time.perf_counter()
        for i in range(opts.jobs):
            job_ended(client, "backup", f"vm{i % 100}", "succeeded")
        quiet = (time.perf_counter() - t) / opts.jobs
        t = time.perf_counter()
        for i in range(opts.jobs):
            job_ended(client, "backup", f"vm{i}", "failed", "QmpError: socket gone")
        opening = (time.perf_counter() - t) / opts.jobs
        print(f"job end, nothing changes : {quiet * 1e6:8.0f} us per job")
        print(f"job end, opens a problem : {opening * 1e6:8.0f} us per job")

        domains = {f"vm{i}": {"host": f"hv{i % 100}", "qmp": f"/run/vm{i}.qmp"}
                   for i in range(opts.domains)}  # fmt: skip
        now = datetime(2026, 3, 1, 2, 30, tzinfo=UTC)
        client.hset(METRICS_LAST_SUCCESS, mapping=dict.fromkeys(domains, now.timestamp()))
        config = parse_config(
            {
                "repository": {"url": f"file://{workdir}/repo"},
                "domains": domains,
                "schedules": {"nightly": {"cron": "0 2 * * *", "domains": ["*"]}},
                "notifications": {"webhooks": {"ops": {"url": f"http://127.0.0.1:{hook_port}/"}}},
            },
            "bench",
        )
        check_overdue(config, client, now)  # first sight of every domain
        t = time.perf_counter()
        late = check_overdue(config, client, now)
        overdue_s = time.perf_counter() - t
        print(f"overdue check, {opts.domains} domains, none late: {overdue_s * 1e3:6.1f} ms")
        assert not late

        client.delete(NOTIFY_OUTBOX, NOTIFY_QUEUE_PREFIX + "ops")
        for i in range(opts.events):
            job_ended(client, "verify", f"d{i}", "failed", "VerifyError: chunk")
        notifier = Notifier(config, client)
        t = time.perf_counter()
        notifier.pump()
        notifier.join()
        delivered_s = time.perf_counter() - t
        left = client.llen(NOTIFY_QUEUE_PREFIX + "ops")
        print(
            f"fan-out + webhook delivery: {opts.events - left} events in {delivered_s:.2f} s "
            f"({(opts.events - left) / delivered_s:.0f} events/s, one target)"
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
