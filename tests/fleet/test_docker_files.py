"""docker/ checked statically (no Docker engine here): compose structure, Dockerfile, config."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from tests.fixtures.common import (
    free_port,
    port_open,
    require_binary,
    stop_process,
    wait_until,
)
from vmvault.scheduler.cli import build_parser
from vmvault.worker.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"

_KNOWN_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
_COMPOSE_TOP = {"name", "services", "volumes", "networks", "configs", "secrets"}
_SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "volumes", "ports",
    "depends_on", "healthcheck", "restart", "stop_grace_period", "env_file", "networks",
    "secrets",
}  # fmt: skip
SECRET = "/run/secrets/redis_password"


def _interpolate(text: str) -> str:
    """Compose variable syntax: ``${VAR:-default}`` -> default (no environment in tests),
    ``$$`` -> ``$`` (a dollar sign the container's shell sees)."""
    text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", text)
    return text.replace("$$", "$")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(_interpolate((DOCKER / "compose.yaml").read_text()))
    return data


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


def _deb_pkgs() -> set[str]:
    match = re.search(r"^DEB_PKGS\s*:?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match is not None
    return set(match.group(1).split())


def test_dockerfile_parses_and_runs_make_setup() -> None:
    instructions = _dockerfile()
    words = [word for word, _ in instructions]
    assert set(words) <= _KNOWN_INSTRUCTIONS, set(words) - _KNOWN_INSTRUCTIONS
    assert words[0] == "FROM"
    assert instructions[0][1].startswith("debian:")
    runs = [args for word, args in instructions if word == "RUN"]
    # The image is built by the same target as a developer machine: `make setup`.
    setup = next(i for i, (w, a) in enumerate(instructions) if w == "RUN" and "make setup" in a)
    copied: set[str] = set()
    for word, args in instructions[:setup]:
        if word == "COPY":
            *sources, _dest = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY source {src} missing"
                copied.add(src.rstrip("/"))
    # Everything `make setup` reads is in the image before it runs.
    assert {
        "Makefile",
        "pyproject.toml",
        "scripts",
        "vmvault",
        "scheduler",
        "storage",
        "worker",
    } <= copied
    assert any("install" in r and "make" in r for r in runs[:1])
    entry = next(args for word, args in instructions if word == "ENTRYPOINT")
    assert entry.startswith("[") and ".venv/bin/vmvault" in entry


def test_make_setup_installs_what_workers_need() -> None:
    """The Dockerfile takes its Debian packages from DEB_PKGS via `make setup`."""
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"setup-debian\.sh \$\(DEB_PKGS\)", makefile)
    assert {"qemu-system-x86", "qemu-utils", "python3-libnbd", "python3-venv"} <= _deb_pkgs()
    assert "--system-site-packages" in makefile  # python3-libnbd is only in Debian


def test_compose_structure() -> None:
    compose = _compose()
    top = {k for k in compose if not k.startswith("x-")}
    assert top <= _COMPOSE_TOP
    services = compose["services"]
    assert {"redis", "s3", "scheduler", "worker"} <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        assert set(svc) <= _SERVICE_KEYS, (name, set(svc) - _SERVICE_KEYS)
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file()
        for dep in svc.get("depends_on") or {}:
            assert dep in services, (name, dep)
        for volume in svc.get("volumes") or []:
            source, target = volume.split(":")[:2]
            assert target.startswith("/"), volume
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: bind source {source} missing"
            elif not source.startswith("/"):
                assert source in declared_volumes, f"{name}: volume {source} not declared"


@pytest.mark.parametrize("service", ["scheduler", "worker"])
def test_compose_commands_are_real_vmvault_commands(service: str) -> None:
    svc = _compose()["services"][service]
    assert svc["image"] == "vmvault:latest"
    args = build_parser().parse_args(svc["command"])
    assert args.command == service
    # The handler is the fleet command itself, not a help fallback.
    assert args.func.__module__ == "vmvault.scheduler.commands.fleet"
    env = svc["environment"]
    config_mount = next(v for v in svc["volumes"] if v.split(":")[1] == env["VMVAULT_CONFIG"])
    assert config_mount.startswith("./vmvault.yaml:")


def test_compose_config_points_at_compose_services() -> None:
    compose = _compose()
    config = load_config(DOCKER / "vmvault.yaml")
    assert config.broker is not None and "//redis:" in config.broker
    assert config.repository.endpoint_url is not None
    assert "//s3:" in config.repository.endpoint_url
    worker = compose["services"]["worker"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    # QEMU on the host and the worker in the container must see the same paths.
    assert mounts[str(config.state_dir)] == str(config.state_dir)
    for domain in config.domains.values():
        qmp_dir = str(domain.qmp_socket("docker example").parent)
        assert mounts.get(qmp_dir) == qmp_dir, f"QMP dir {qmp_dir} not mounted at the same path"
    host = worker["command"][worker["command"].index("--host") + 1]
    assert host in {d.host for d in config.domains.values()}


def test_compose_redis_needs_a_password_kept_in_a_secret() -> None:
    compose = _compose()
    services = compose["services"]
    # One secret file, created by the operator, never committed.
    assert compose["secrets"]["redis_password"] == {"file": "./secrets/redis_password"}
    assert "secrets/" in (DOCKER / ".gitignore").read_text().split()
    # Not sent to the image build either (the build context is the repository root).
    assert "docker/secrets" in (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert not (DOCKER / "secrets" / "redis_password").exists()
    redis_svc = services["redis"]
    assert redis_svc["secrets"] == ["redis_password"]
    script = " ".join(redis_svc["command"])
    assert "requirepass" in script and SECRET in script
    # Never on a command line: `ps` on the host shows container command lines to everyone.
    assert "--requirepass" not in script and "-a " not in script
    assert SECRET in " ".join(redis_svc["healthcheck"]["test"])
    # Not published: reachable from the compose network only.
    assert "ports" not in redis_svc
    for name in ("scheduler", "worker"):
        assert services[name]["secrets"] == ["redis_password"], name
    config = load_config(DOCKER / "vmvault.yaml")
    assert config.broker is not None and urlsplit(config.broker).password is None
    assert config.broker_password_file == Path(SECRET)
    # No password-looking value anywhere in the committed files.
    for name in ("compose.yaml", "vmvault.yaml"):
        text = re.sub(r"(?m)^\s*#.*$", "", (DOCKER / name).read_text())  # comments aside
        assert not re.search(r"rediss?://[^/\s]*:[^/\s@]+@", text), name
        assert not re.search(r"requirepass\s+[^\s\"$]", text), name


def test_compose_redis_command_and_healthcheck_run_with_the_secret(tmp_path: Path) -> None:
    """Run the compose file's own redis command and healthcheck against a real redis-server.

    The image's ``docker-entrypoint.sh`` (drops to the redis user, then execs its
    arguments) is replaced by one that adds a private port and directory.
    """
    binary = require_binary("redis-server")
    redis_svc = _compose()["services"]["redis"]
    password = f"pw-{uuid.uuid4().hex}"
    secret = tmp_path / "redis_password"
    secret.write_text(password + "\n")
    port = free_port()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    entrypoint = bindir / "docker-entrypoint.sh"
    entrypoint.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = redis-server ] && shift && exec {binary} --port {port} --bind 127.0.0.1 '
        f'--dir {tmp_path} "$@"\n'
        'exec "$@"\n'
    )
    entrypoint.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    argv = [arg.replace(SECRET, str(secret)) for arg in redis_svc["command"]]
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: port_open(port), 20, "redis from the compose command", proc)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert redis.Redis(port=port, password=password).ping()
        # The password is not on the server's command line.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline

        test = redis_svc["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"

        def healthcheck(secret_file: Path) -> int:
            script = test[1].replace(SECRET, str(secret_file))
            script = script.replace("redis-cli", f"redis-cli -p {port}")
            return subprocess.run(["sh", "-c", script], env=env, timeout=30).returncode

        assert healthcheck(secret) == 0
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-password\n")
        assert healthcheck(wrong) != 0

        # vmvault's side of the compose config reaches it with the same secret.
        data = yaml.safe_load((DOCKER / "vmvault.yaml").read_text())
        data["broker"] = data["broker"].replace("redis:6379", f"127.0.0.1:{port}")
        data["broker_password_file"] = str(secret)
        url = parse_config(data, "vmvault.yaml").broker_url()
        assert url is not None
        assert redis.Redis.from_url(url).ping()
    finally:
        stop_process(proc)
