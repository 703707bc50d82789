"""``vmvault restore`` end to end in-process: JSON document, exit codes, messages."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from tests.restore.conftest import MiB, images_equal, make_image, short_tmp, write_backup
from vmvault.scheduler.cli import main
from vmvault.storage.repository import Repository


@pytest.fixture
def cli_setup(tmp_path: Path, file_repo: Repository) -> tuple[Path, str, Path]:
    """A config file, the id of the one backup of web1, and its vda reference image."""
    ref = make_image(tmp_path / "vda.raw", 3 * MiB, 5, [(MiB, MiB)])
    manifest = write_backup(file_repo, "web1", {"vda": ref})
    config = tmp_path / "vmvault.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "repository": {"url": file_repo.url},
                "state_dir": str(tmp_path / "state"),
                "domains": {"web1": {"host": "hv1", "qmp": str(tmp_path / "web1.qmp")}},
            }
        )
    )
    return config, manifest.backup_id, ref


def test_restore_json(
    tmp_path: Path, cli_setup: tuple[Path, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, backup_id, ref = cli_setup
    out = tmp_path / "out"
    code = main(["restore", "web1", "--to", str(out), "--json", "--config", str(config)])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["backup_id"] == backup_id and doc["domain"] == "web1"
    assert doc["duration_s"] > 0
    [disk] = doc["disks"]
    assert disk["name"] == "vda" and disk["path"] == str(out / "vda.qcow2")
    assert disk["virtual_size"] == 3 * MiB and disk["bytes_written"] == 2 * MiB
    assert disk["verified"] is True
    assert images_equal(ref, out / "vda.qcow2")


def test_restore_errors_and_exit_codes(
    tmp_path: Path, cli_setup: tuple[Path, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, backup_id, _ = cli_setup
    base = ["--config", str(config)]
    out = tmp_path / "out"
    assert main(["restore", "web1", "--to", str(out), *base]) == 0
    capsys.readouterr()
    # Target exists: refused, says how to go on.
    assert main(["restore", "web1", "--to", str(out), *base]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["restore", "web1", "--to", str(out), "--force", "--backup", backup_id, *base]) == 0
    capsys.readouterr()
    # Unknown backup id; time before the first backup.
    assert main(["restore", "web1", "--to", str(out), "--backup", "nope", *base]) == 1
    assert "no backup 'nope'" in capsys.readouterr().err
    assert main(["restore", "web1", "--to", str(out), "--at", "2001-01-01T00:00:00Z", *base]) == 1
    assert "no backup at or before 2001-01-01T00:00:00+00:00" in capsys.readouterr().err
    # Usage problems exit 2 before anything runs.
    assert main(["restore", "web1", *base]) == 2
    assert "--to DIR" in capsys.readouterr().err
    assert main(["restore", "web1", "--to", str(out), "--boot", *base]) == 2
    assert "--boot needs --incoming" in capsys.readouterr().err
    assert main(["restore", "db9", "--to", str(out), *base]) == 2
    assert "unknown domain 'db9'" in capsys.readouterr().err
    # --incoming without a launch description is an error naming the key to add.
    assert main(["restore", "web1", "--incoming", *base]) == 1
    assert "domains.web1.launch.argv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["restore", "web1", "--to", str(out), "--at", "yesterday", *base])
    assert "bad time 'yesterday'" in capsys.readouterr().err


def test_restore_incoming_json_names_qmp_socket(
    tmp_path: Path, cli_setup: tuple[Path, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config_file, backup_id, ref = cli_setup
    sockdir = short_tmp()
    doc = yaml.safe_load(config_file.read_text())
    doc["domains"]["web1"] = {
        "host": "hv1",
        "qmp": str(sockdir / "web1.qmp"),
        "launch": {
            "argv": [
                "qemu-system-x86_64",
                "-M",
                "q35",
                "-accel",
                "tcg",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
                "unix:{qmp},server=on,wait=off",
                "-drive",
                "file={disk:vda},format=qcow2,if=none,id=d0,node-name=fmt-vda",
                "-device",
                "virtio-blk-pci,drive=d0,id=vda",
            ],
            "image_dir": str(tmp_path / "images"),
        },
    }
    config_file.write_text(yaml.safe_dump(doc))
    pid = None
    try:
        code = main(["restore", "web1", "--incoming", "--json", "--config", str(config_file)])
        out = json.loads(capsys.readouterr().out)
        assert code == 0
        pid = out["qemu_pid"]
        assert out["backup_id"] == backup_id and out["state"] == "paused-incoming"
        assert out["qmp"] == str(sockdir / "web1.qmp")
        assert out["disks"][0]["path"] == str(tmp_path / "images" / "vda.qcow2")
        assert images_equal(ref, tmp_path / "images" / "vda.qcow2")
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        shutil.rmtree(sockdir, ignore_errors=True)
