"""Fleet config: the documented shape loads; every mistake is reported precisely, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmvault.scheduler.cli import main
from vmvault.worker.config import ConfigError, FleetConfig, UnknownDomainError, load_config

GOOD = """\
repository:
  url: s3://backups/vmvault
  endpoint_url: http://127.0.0.1:8333
  region: us-east-1
  passphrase_file: /etc/vmvault/pass
broker: redis://127.0.0.1:6379/0
state_dir: /var/lib/vmvault
domains:
  web1:
    host: hv1
    qmp: /run/vmvault/web1.qmp
    disks: [vda, vdb]
  web2:
    host: hv2
    qmp: /run/vmvault/web2.qmp
  db1:
    host: hv2
    qmp: /run/vmvault/db1.qmp
schedules:
  nightly:
    cron: "0 2 * * *"
    domains: ["web*"]
    retention: {keep_last: 7, keep_daily: 14, keep_weekly: 8, keep_monthly: 12}
"""

BAD = """\
repository:
  url: ftp://example/backups
  colour: blue
broker: amqp://localhost
state_dir: relative/dir
domains:
  web1:
    host: hv1
    qmp: run/web1.qmp
  "../evil":
    host: hv1
    qmp: /run/evil.qmp
  db1:
    qmp: /run/db1.qmp
schedules:
  nightly:
    cron: "0 25 * * *"
    domains: ["web*"]
    retention: {keep_last: 0}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vmvault.yaml"
    path.write_text(text)
    return path


def test_documented_shape_loads(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD))
    assert isinstance(config, FleetConfig)
    assert config.repository.url == "s3://backups/vmvault"
    assert config.domains["web1"].disks == ["vda", "vdb"]
    assert config.domains["web2"].disks is None
    assert config.domains_matching(["web*"]) == ["web1", "web2"]
    nightly = config.schedules["nightly"]
    assert nightly.retention is not None and nightly.retention.keep_daily == 14


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    path = _write(tmp_path, BAD)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = err.value.problems
    text = "\n".join(problems)
    expected = [
        "repository.url: unsupported repository URL 'ftp://example/backups'",
        "repository.colour: unknown key",
        "broker: bad broker URL",
        "state_dir: state_dir must be an absolute path",
        "domains.web1.qmp: QMP socket path must be absolute",
        "domains.../evil (the name): bad name '../evil'",
        "domains.db1.host: required key is missing",
        "schedules.nightly.cron: bad cron expression '0 25 * * *'",
        "schedules.nightly.retention.keep_last: must be at least 1, got 0",
    ]
    for fragment in expected:
        assert fragment in text, f"missing {fragment!r} in:\n{text}"
    assert all(p.startswith(f"{path}: ") for p in problems)


def test_duplicate_domain_is_named_with_its_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "repository: {url: 'file:///srv/repo'}\n"
        "domains:\n"
        "  web1: {host: hv1, qmp: /run/a.qmp}\n"
        "  web1: {host: hv2, qmp: /run/b.qmp}\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "duplicate key 'web1' (first defined on line 3)" in str(err.value)
    assert "line 4" in str(err.value)


def test_schedule_glob_matching_nothing_is_an_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "repository: {url: 'file:///srv/repo'}\n"
        "domains: {web1: {host: hv1, qmp: /run/a.qmp}}\n"
        "schedules: {nightly: {cron: '0 2 * * *', domains: ['db*']}}\n",
    )
    with pytest.raises(ConfigError, match=r"'db\*' matches no configured domain"):
        load_config(path)


def test_missing_file_names_the_remedy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_domain_lists_known_ones(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD))
    with pytest.raises(UnknownDomainError, match=r"unknown domain 'web9'.*db1, web1, web2"):
        config.domain("web9")


def test_config_env_var_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, GOOD)
    monkeypatch.setenv("VMVAULT_CONFIG", str(path))
    monkeypatch.chdir(tmp_path.parent)
    assert load_config().domains["db1"].host == "hv2"


def test_cli_bad_config_exit_2_with_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, BAD)
    code = main(["--config", str(path), "config"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("vmvault: config: ")]
    assert len(lines) >= 9, err
    assert "domains.web1.qmp" in err


def test_cli_flags_after_command_and_json(tmp_path: Path) -> None:
    # `vmvault config` checks that the passphrase file is there (tests/storage/test_cli.py).
    (tmp_path / "pass").write_text("secret\n")
    path = _write(tmp_path, GOOD.replace("/etc/vmvault/pass", str(tmp_path / "pass")))
    proc = subprocess.run(
        [sys.executable, "-m", "vmvault", "config", "--config", str(path), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["domains"]["web1"]["qmp"] == "/run/vmvault/web1.qmp"


def test_cli_version_and_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vmvault", "--version"], capture_output=True, text=True, check=True
    )
    assert proc.stdout.startswith("vmvault ")
    helptext = subprocess.run(
        [sys.executable, "-m", "vmvault", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "config" in helptext
