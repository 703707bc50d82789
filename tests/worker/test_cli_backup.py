"""``vmvault backup``, ``vmvault checkpoints`` and ``vmvault demo`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.qemu import MiB
from tests.worker.conftest import BackupEnv
from vmvault.scheduler.cli import main as cli_main


def _config_file(env: BackupEnv, tmp_path: Path) -> str:
    path = tmp_path / "vmvault.yaml"
    path.write_text(json.dumps(env.config.model_dump(mode="json")))
    return str(path)


def test_backup_and_checkpoints_json(
    backup_env: BackupEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config_file(backup_env, tmp_path)
    backup_env.vm.write("vda", 0, 2 * MiB, pattern=0x5A)
    assert cli_main(["backup", "vm", "--config", cfg, "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["kind"] == "full" and full["parent"] is None
    assert full["reason"] == "first backup of domain vm"
    assert {d["name"] for d in full["disks"]} == {"vda", "vdb"}
    for disk in full["disks"]:
        assert set(disk) >= {"name", "virtual_size", "dirty_bytes", "bytes_read", "bytes_uploaded"}
    assert full["duration_s"] > 0

    assert cli_main(["checkpoints", "vm", "--config", cfg, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["next"]["kind"] == "incremental"
    assert report["next"]["parent"] == full["backup_id"]
    for disk in report["disks"]:
        (point,) = disk["checkpoints"]
        assert point["usable"] and point["recording"] and point["backup_id"] == full["backup_id"]

    assert cli_main(["backup", "vm", "--config", cfg, "--mode", "incremental", "--json"]) == 0
    inc = json.loads(capsys.readouterr().out)
    assert inc["kind"] == "incremental" and inc["parent"] == full["backup_id"]

    # Human output on stdout names the backup and its kind.
    assert cli_main(["backup", "vm", "--config", cfg]) == 0
    assert "incremental" in capsys.readouterr().out


def test_demo_runs_end_to_end() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vmvault", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    kinds = [b["kind"] for b in report["backups"]]
    assert kinds == ["full", "incremental"]
    assert report["results"][1]["parent"] == report["results"][0]["backup_id"]
