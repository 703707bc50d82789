"""Shared helpers of the fleet tests: config files for a two-host fleet."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery import Celery

from tests.fixtures.common import VENV_BIN, stop_process
from tests.fixtures.redis import RedisServer
from vmvault.worker.config import FleetConfig, parse_config
from vmvault.worker.jobs import FINAL_STATES, JobRecord, JobStore


def fleet_dict(tmp: Path, broker: str | None = None, **extra: Any) -> dict[str, Any]:
    """A two-host fleet (hv1: web1, web2; hv2: db1) on a file:// repository."""
    data: dict[str, Any] = {
        "repository": {"url": f"file://{tmp}/repo"},
        "state_dir": str(tmp / "state"),
        "domains": {
            "web1": {"host": "hv1", "qmp": "/run/vmv/web1.qmp"},
            "web2": {"host": "hv1", "qmp": "/run/vmv/web2.qmp"},
            "db1": {"host": "hv2", "qmp": "/run/vmv/db1.qmp"},
        },
    }
    if broker is not None:
        data["broker"] = broker
    data.update(extra)
    return data


def make_config(tmp: Path, broker: str | None = None, **extra: Any) -> FleetConfig:
    return parse_config(fleet_dict(tmp, broker, **extra), "test")


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class Fleet:
    """A config on a private Redis plus the worker/scheduler processes a test started."""

    tmp: Path
    redis: RedisServer
    data: dict[str, Any]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def config_file(self) -> Path:
        return self.tmp / "vmvault.yaml"

    def write(self, **extra: Any) -> FleetConfig:
        """(Re)write the config file with ``extra`` top-level keys merged in."""
        self.data.update(extra)
        write_config(self.config_file, self.data)
        return parse_config(self.data, "test")

    @property
    def config(self) -> FleetConfig:
        return parse_config(self.data, "test")

    def app(self) -> Celery:
        from vmvault.worker.celery_app import configure

        return configure(self.config)

    def vmvault(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        """Start ``vmvault ARGS --config FILE`` in its own session; output to ``log``."""
        env = dict(os.environ, VMVAULT_CONFIG=str(self.config_file))
        with open(self.tmp / log, "ab") as out:
            proc = subprocess.Popen(
                [str(VENV_BIN / "vmvault"), *args, "--config", str(self.config_file)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start_worker(self, host: str, *extra: str) -> subprocess.Popen[bytes]:
        """A real Celery worker for ``host``; returns once it answers a ping on its queue."""
        proc = self.vmvault("worker", "--host", host, "-v", *extra, log=f"worker-{host}.log")
        queue = f"host.{host}"
        result = self.app().send_task("vmvault.ping", kwargs={"sent": 0.0}, queue=queue)
        deadline = time.monotonic() + 40
        while not result.ready():
            if proc.poll() is not None:
                raise RuntimeError(f"worker {host} exited: {self.log(f'worker-{host}.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {host} not ready: {self.log(f'worker-{host}.log')}")
            time.sleep(0.1)
        return proc

    def wait_jobs(self, job_ids: list[str], timeout: float = 60) -> dict[str, JobRecord]:
        """Wait until every job is succeeded/failed; returns their records."""
        store = JobStore(self.redis.client())
        deadline = time.monotonic() + timeout
        while True:
            records = {job_id: store.get(job_id) for job_id in job_ids}
            if all(r is not None and r.state in FINAL_STATES for r in records.values()):
                return {k: v for k, v in records.items() if v is not None}
            if time.monotonic() > deadline:
                states = {k: (v.state if v else None) for k, v in records.items()}
                logs = "\n".join(self.log(p.name) for p in self.tmp.glob("worker-*.log"))
                raise TimeoutError(f"jobs not finished: {states}\n{logs}")
            time.sleep(0.1)

    def log(self, name: str) -> str:
        path = self.tmp / name
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs:
            stop_process(proc, timeout=10)


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    """Two hosts (hv1: web1, web2; hv2: db1) with the private Redis as broker."""
    (tmp_path / "repo").mkdir()
    # Short: the backup's NBD socket lives under state_dir (unix paths < 108 bytes).
    state_dir = Path(tempfile.mkdtemp(prefix="vmvf"))
    data = fleet_dict(tmp_path, broker=redis_server.url)
    data["state_dir"] = str(state_dir)
    f = Fleet(tmp_path, redis_server, data)
    f.write()
    try:
        yield f
    finally:
        f.stop_all()
        shutil.rmtree(state_dir, ignore_errors=True)
