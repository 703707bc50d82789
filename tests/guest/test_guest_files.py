"""``vmvault files`` on the backup of a running Linux guest: what it wrote, byte for byte.

The guest writes a file and fsyncs it on its ext4 data disk; an application-consistent
backup (agent freeze) goes to the repository; ``vmvault files`` then reads it back
through nbdkit and a libguestfs appliance, without the host mounting anything.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import yaml

from tests.guest.conftest import GuestEnv
from vmvault.worker.backup import run_backup


def test_files_get_returns_what_the_guest_wrote(
    guest_env: GuestEnv, guestfs_appliance: None
) -> None:
    env, guest = guest_env, guest_env.guest
    guest.shell(
        "mkdir -p /mnt/data/docs && head -c 3145728 /dev/urandom > /mnt/data/docs/report.bin"
    )
    guest.shell("sync")
    wrote = guest.shell("sha256sum /mnt/data/docs/report.bin").split()[0]
    result = run_backup(env.config(), "vm")
    assert result.consistency == "application"

    config = env.tmp / "vmvault.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "repository": {"url": env.repo_url},
                "state_dir": str(env.state_dir),
                "domains": {"vm": {"host": "hv1", "qmp": str(guest.qmp_path)}},
            }
        )
    )
    cli = [sys.executable, "-m", "vmvault", "--config", str(config), "files", "vm"]
    ls = subprocess.run(
        [*cli, "--disk", "vda", "ls", "/docs", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ls.returncode == 0, ls.stderr
    entries = json.loads(ls.stdout)["entries"]
    assert [(e["name"], e["type"], e["size"]) for e in entries] == [
        ("report.bin", "file", 3 * 2**20)
    ]
    out = env.tmp / "out"
    get = subprocess.run(
        [
            *cli,
            "--backup",
            result.backup_id,
            "--disk",
            "vda",
            "get",
            "/docs/report.bin",
            "--to",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert get.returncode == 0, get.stderr
    assert hashlib.sha256((out / "report.bin").read_bytes()).hexdigest() == wrote
