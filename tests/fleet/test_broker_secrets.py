"""The broker's password: read from a file, used by every fleet process, printed by none.

A private Redis with ``requirepass`` (real Redis, real Celery worker). Every CLI command's
stdout and stderr, the worker's log and every value Redis holds are searched for the
password, both when the broker works and when it refuses the password or is down.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.fixtures.common import (
    VENV_BIN,
    free_port,
    port_open,
    require_binary,
    stop_process,
    wait_until,
)
from tests.fleet.conftest import Fleet
from vmvault.scheduler.enqueue import JobRequest, enqueue
from vmvault.storage.repository import init_repository
from vmvault.worker.jobs import FINAL_STATES, JobStore


def _vmvault(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMVAULT_CONFIG=str(config))
    return subprocess.run(
        [str(VENV_BIN / "vmvault"), *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _protect(fleet: Fleet) -> tuple[str, redis.Redis]:
    """Give the fleet's Redis a password kept in a file the config points at."""
    password = f"Pw-{uuid.uuid4().hex}"
    secret = fleet.tmp / "redis_password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    fleet.redis.client().config_set("requirepass", password)
    fleet.write(broker_password_file=str(secret))
    client = redis.Redis(host="127.0.0.1", port=fleet.redis.port, password=password)
    return password, client


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _all_redis_text(client: redis.Redis) -> str:
    """Every key and value Redis holds, as one text (binary values decoded leniently)."""
    parts: list[str] = []
    for key in client.scan_iter(count=1000):
        kind = _text(client.type(key))
        parts.append(_text(key))
        values: Any = []
        if kind == "string":
            values = [client.get(key)]
        elif kind == "hash":
            values = list(client.hgetall(key).values())
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "zset":
            values = client.zrange(key, 0, -1)
        elif kind == "set":
            values = client.smembers(key)
        parts += [_text(v) for v in values]
    return "\n".join(parts)


def _wait(store: JobStore, job_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = store.get(job_id)
        if record is not None and record.state in FINAL_STATES:
            return record.state
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not end")


def test_password_file_protects_the_fleet_and_never_shows(fleet: Fleet) -> None:
    init_repository(fleet.data["repository"]["url"]).close()
    password, client = _protect(fleet)
    # Without the password Redis answers nothing.
    with pytest.raises(redis.AuthenticationError):
        fleet.redis.client().ping()
    fleet.start_worker("hv1", "--storage")
    store = JobStore(client)
    outputs: dict[str, str] = {}
    gc = _vmvault(fleet.config_file, "gc", "--json")
    assert gc.returncode == 0, gc.stderr
    outputs["gc"] = gc.stdout + gc.stderr
    for args in (["config"], ["config", "--json"], ["jobs"], ["status"], ["status", "--json"]):
        out = _vmvault(fleet.config_file, *args, "-vv")
        assert out.returncode == 0, (args, out.stderr)
        outputs[" ".join(args)] = out.stdout + out.stderr
    assert f"redis://127.0.0.1:{fleet.redis.port}/0" in outputs["config"]
    assert "password from " + str(fleet.tmp / "redis_password") in outputs["config"]
    doc = json.loads(_vmvault(fleet.config_file, "config", "--json").stdout)
    assert doc["broker"] == f"redis://127.0.0.1:{fleet.redis.port}/0"
    # A job whose error carries a broker URL keeps no password in its record.
    [job_id] = enqueue(fleet.app(), store, [JobRequest(type="gc", kwargs={"grace": 1.0})])
    assert _wait(store, job_id) == "failed"
    store.update(job_id, error=f"cannot reach redis://:{password}@10.0.0.1:6379/0")
    record = store.get(job_id)
    assert record is not None and "redis://:***@10.0.0.1:6379/0" in record.error
    outputs["worker log"] = fleet.log("worker-hv1.log")
    outputs["redis"] = _all_redis_text(client)
    assert "celery" in outputs["worker log"]  # the banner, with its transport URL
    for name, text in outputs.items():
        assert password not in text, f"password printed by {name}:\n{text}"


_BROKER_COMMANDS = [
    ["config"],
    ["config", "--json"],
    ["jobs"],
    ["jobs", "--json"],
    ["status"],
    ["status", "--json"],
    ["backup", "web1"],
    ["backup", "web1", "--json"],
    ["restore", "web1", "--to", "/tmp/vmvault-never-made"],
    ["verify"],
    ["prune", "--keep-last", "1"],
    ["gc"],
    ["worker", "--host", "hv1"],
    ["scheduler", "--once"],
]


@pytest.mark.parametrize("failure", ["wrong password", "no password", "broker down"])
def test_no_cli_output_shows_the_password_when_the_broker_fails(fleet: Fleet, failure: str) -> None:
    init_repository(fleet.data["repository"]["url"]).close()
    secret = f"Sec-{uuid.uuid4().hex}"
    data = dict(fleet.data)
    if failure == "wrong password":
        # The password written in the URL itself (allowed, discouraged): masked all the same.
        fleet.redis.client().config_set("requirepass", f"other-{secret}")
        data["broker"] = f"redis://:{secret}@127.0.0.1:{fleet.redis.port}/0"
    elif failure == "no password":
        fleet.redis.client().config_set("requirepass", secret)
        data["broker"] = f"redis://127.0.0.1:{fleet.redis.port}/0"
        secret = f"other-{secret}"  # nothing to leak but the server's: must not appear either
    else:
        (fleet.tmp / "pw").write_text(secret)
        data["broker"] = f"redis://127.0.0.1:{free_port()}/0"
        data["broker_password_file"] = str(fleet.tmp / "pw")
    config = fleet.tmp / "failing.yaml"
    config.write_text(yaml.safe_dump(data))
    # Concurrently: each is a fresh Python process, mostly start-up time.
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda args: _vmvault(config, *args, "-vv"), _BROKER_COMMANDS))
    for args, out in zip(_BROKER_COMMANDS, runs, strict=True):
        text = out.stdout + out.stderr
        assert secret not in text, f"vmvault {' '.join(args)} printed the password:\n{text}"
        assert "Traceback" not in text, text
        if args[0] == "config":
            assert out.returncode == 0, text
            if failure == "wrong password":
                assert f"redis://:***@127.0.0.1:{fleet.redis.port}/0" in text
        else:
            assert out.returncode == 1, (args, text)
    if failure == "broker down":
        out = _vmvault(config, "status")
        assert "cannot reach the broker redis://:***@127.0.0.1:" in out.stderr
    else:
        out = _vmvault(config, "jobs")
        assert "password" in out.stderr.lower(), out.stderr


def _certificates(where: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1: (ca.crt, server.crt, .key)."""
    openssl = require_binary("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=where, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=vmvault-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    # Python 3.13 verifies strictly (VERIFY_X509_STRICT): the CA needs keyUsage, the server
    # certificate an authority key identifier.
    (where / "san.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.cnf")  # fmt: skip
    return where / "ca.crt", where / "server.crt", where / "server.key"


def test_tls_broker_with_password_file(fleet: Fleet, tmp_path: Path) -> None:
    """rediss:// as docs/fleet.md describes it: TLS to Redis, password from a file."""
    init_repository(fleet.data["repository"]["url"]).close()
    certs = tmp_path / "tls"
    certs.mkdir()
    ca, cert, key = _certificates(certs)
    # Another CA, not the server's own certificate: Python 3.13 accepts a trusted leaf
    # certificate as a partial chain.
    (tmp_path / "other").mkdir()
    other_ca, _, _ = _certificates(tmp_path / "other")
    password = f"tls-{uuid.uuid4().hex}"
    secret = tmp_path / "redis_password"
    secret.write_text(password + "\n")
    port = free_port()
    argv = [require_binary("redis-server"), "--port", "0", "--tls-port", str(port),
            "--bind", "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "",
            "--appendonly", "no", "--dir", str(tmp_path), "-"]  # fmt: skip
    # The password on stdin ('-'), as the compose file passes it.
    server = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert server.stdin is not None
    server.stdin.write(f'requirepass "{password}"\n'.encode())
    server.stdin.close()
    try:
        wait_until(lambda: port_open(port), 20, "redis-server with TLS", server)
        url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
        fleet.write(broker=url, broker_password_file=str(secret))
        fleet.start_worker("hv1", "--storage")  # Celery broker and results over TLS
        gc = _vmvault(fleet.config_file, "gc", "--json")
        assert gc.returncode == 0, gc.stderr
        assert json.loads(gc.stdout)["dry_run"] is False
        jobs = _vmvault(fleet.config_file, "jobs", "--json")
        assert jobs.returncode == 0, jobs.stderr
        assert [j["state"] for j in json.loads(jobs.stdout)["jobs"]] == ["succeeded"]
        # Plain TCP, or TLS to a server this CA did not sign, gets nowhere: clear errors.
        for bad in (
            f"redis://127.0.0.1:{port}/0",
            f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={other_ca}",
        ):
            fleet.write(broker=bad)
            out = _vmvault(fleet.config_file, "jobs")
            assert out.returncode == 1, out
            assert out.stderr.startswith("vmvault: error: cannot reach the broker "), out.stderr
            assert "Traceback" not in out.stderr and password not in out.stderr
        assert password not in fleet.log("worker-hv1.log")
    finally:
        fleet.stop_all()
        stop_process(server)


def test_acl_user_without_dangerous_commands_runs_the_fleet(fleet: Fleet) -> None:
    """The ACL docs/fleet.md recommends: a vmvault user, -@dangerous, the default user off."""
    init_repository(fleet.data["repository"]["url"]).close()
    password = f"acl-{uuid.uuid4().hex}"
    secret = fleet.tmp / "redis_password"
    secret.write_text(password + "\n")
    admin = fleet.redis.client()
    admin.acl_setuser(
        "vmvault",
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-@dangerous"],
    )
    admin.acl_setuser("default", enabled=False)
    fleet.write(
        broker=f"redis://vmvault@127.0.0.1:{fleet.redis.port}/0",
        broker_password_file=str(secret),
        schedules={"nightly": {"cron": "0 2 * * *", "domains": ["web*"]}},
    )
    port = free_port()
    fleet.start_worker("hv1", "--storage", "--metrics-port", str(port))
    for args in (["gc", "--json"], ["scheduler", "--once"], ["jobs"], ["status"]):
        out = _vmvault(fleet.config_file, *args)
        assert out.returncode == 0, (args, out.stderr)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert "vmvault_redis_up 1.0" in metrics
    # Counters written by the worker as the vmvault user (the CLI's gc and the scheduler's).
    assert 'vmvault_jobs_total{outcome="succeeded",type="gc"} 2.0' in metrics, metrics
    log = fleet.log("worker-hv1.log")
    assert "NOPERM" not in log and password not in log


def test_missing_password_file_is_a_config_error_for_every_command(fleet: Fleet) -> None:
    fleet.write(broker_password_file=str(fleet.tmp / "no-such-secret"))
    for args in (["config"], ["jobs"]):
        out = _vmvault(fleet.config_file, *args)
        assert out.returncode == 2, (args, out)
        assert out.stderr == (
            f"vmvault: config: broker_password_file: cannot read {fleet.tmp}/no-such-secret: "
            "No such file or directory\n"
        )
